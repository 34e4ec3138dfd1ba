"""The training state a checkpoint holds: one object, one ``state_dict`` / ``load_state_dict``.

A resumed run continues bit for bit because everything that changes during training is here:
the student (and the task's projectors), the optimizer, the schedule, the balancer (learned
weights, names), the GradScaler, the EMA model when there is one, every random generator, the
epochs done and the metric history. The checkpoint's keys are spelled in this module only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from dtokd.train import checkpoint as ckpt


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


@dataclass
class TrainingState:
    """The parts of a run that a checkpoint saves and restores (``ema`` may be None), plus the
    number of epochs done and the history of their metric rows."""

    student: Stateful
    projectors: Stateful
    optimizer: Stateful
    scheduler: Stateful
    balancer: Stateful
    scaler: Stateful
    ema: Stateful | None = None
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    PARTS = ("student", "projectors", "optimizer", "scheduler", "balancer", "scaler", "ema")

    def state_dict(self) -> dict[str, Any]:
        """Every part's state (``ema`` only when present), ``epoch``, ``history`` and ``rng`` (the
        random generators' states now)."""
        parts = {name: getattr(self, name).state_dict() for name in self.PARTS if getattr(self, name) is not None}
        return {**parts, "epoch": self.epoch, "history": self.history, "rng": ckpt.rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore every part, the random generators, the epochs done and the history."""
        for name in self.PARTS:
            part = getattr(self, name)
            if part is not None:
                part.load_state_dict(state[name])
        ckpt.set_rng_state(state["rng"])
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
