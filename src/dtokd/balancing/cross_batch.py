"""Cross-batch weights (dtokd, beyond the paper; the one-default issue's rule design): each
objective weighted by how well its gradient served the task on a batch it had not seen.

The exact engine gives each objective's gradient ``g_i`` on this step's batch. With ``g_i'``
the gradients of the previous accepted step (another batch) and ``t`` the task loss::

    u_i  = cos(g_t, g_i')
    a_i <- (1 - rho) a_i + rho u_i              (where both norms are > 0; a starts at 0: equal weights)
    pi   = softmax(beta a)
    .grad += ||g_t|| sum_i pi_i g_i / ||g_i||   (c_i = pi_i ||g_t|| / ||g_i||; 0 where g_i = 0)

Why: to first order, a step ``-lr c_i g_i'`` changes the task loss on a new batch by
``-lr c_i <g_t, g_i'>``, so ``u_i`` is objective i's one-step hypergradient on held-out data,
made scale-free; ``a`` averages it over about ``1 / rho`` steps (the cosines of single
batches are noisy) and ``beta`` sets how far apart the weights go (``beta |a_i - a_j| = 1``:
weights 0.73 / 0.27). The update is a mixture of unit directions, at most as long as the
task's own gradient, so that no objective takes the step by its scale; ``rescale="norm"`` gives it the
length of the ``reference`` combination instead (the fixed weights a learning rate was tuned
for, as the other rules take it). A zero task gradient gives a zero step.

No loss value enters, only gradients: adding a constant to a loss changes nothing (the
failure of the rules that balance ``log L``: a KL to a weak teacher that nears 0 takes the
weight as ``1 / L``), and neither does multiplying a loss other than the task by a positive
factor. A teacher whose advice does not carry to new batches loses weight; one whose
advice carries better than the labels' own gradient (a cleaner signal) gains it.

Gradient accumulation: every accepted ``backward`` is a batch of its own, so micro-batches
compare with the one before them whether or not an optimizer step came between (the
cosine of two batches' gradients does not need one). A step refused as non-finite changes
nothing. Cost: the exact engine's (m backward passes) and m more gradients kept in memory
(the previous step's, as flat chunks; saved in :meth:`state_dict` so that a resumed run
continues the same). Under DDP (global mode) every rank sees the averaged gradients and
learns the same; under FSDP2 each rank keeps its shards (m shards, not m gradients), the dot
products are summed across ranks (m numbers), and a checkpoint gathers the kept gradients whole
(:mod:`~dtokd.balancing.kept_gradients`); ``sync="local"`` is refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from dtokd.balancing import flat, kept_gradients
from dtokd.balancing.base import Balancer
from dtokd.balancing.distributed import Sync
from dtokd.balancing.engines import ExactEngine, ObjectiveGradients, StoredGradients
from dtokd.balancing.kept_gradients import KeptGradients
from dtokd.balancing.rescale import Rescale

_TINY = torch.finfo(torch.float64).tiny


class KeepingEngine(ExactEngine):
    """The exact engine, keeping the last step's per-objective gradients for the balancer."""

    def __init__(self, engine: ExactEngine, method: str) -> None:
        super().__init__(engine.params, batched=engine.batched)
        self.method = method
        self.last: StoredGradients | None = None

    def gradients(self, *args: Any, **kwargs: Any) -> ObjectiveGradients:
        """:meth:`ExactEngine.gradients`, kept as :attr:`last`."""
        gradients = super().gradients(*args, **kwargs)
        assert isinstance(gradients, StoredGradients)  # the exact engine's
        self.last = gradients
        return gradients


class CrossBatchUsefulness:
    """``a``: each objective's cosine with a later batch's task gradient, averaged (float64)::

        u_i  = cos(g_t, g_i')        (g_t: this step's task gradient, g_i': the kept step's gradients)
        a_i <- (1 - rho) a_i + rho u_i       (where both norms are > 0; a starts at 0)

    :meth:`observe` takes a step's gradients, learns from them against the kept ones (if any,
    and if they share its :func:`~dtokd.balancing.kept_gradients.signature`: a layer frozen or a
    dtype cast starts the comparison again),
    then keeps them or drops the kept ones. Under FSDP2 the gradients are this rank's shards:
    each dot product is the sum of the ranks' partial ones (``sync``, an all-reduce of m numbers)."""

    def __init__(self, rho: float, sync: Sync) -> None:
        self.rho, self.sync = rho, sync
        self.usefulness: Tensor | None = None
        self.previous: KeptGradients | None = None
        """The kept step's gradients and their norms."""

    def observe(self, current: StoredGradients, task: int, *, keep: bool = True) -> bool:
        """Learn ``a`` from ``current``'s task gradient; keep ``current`` (``keep``) or nothing.
        Whether ``a`` was learned from (a comparison was made)."""
        chunks = current.chunks
        if self.usefulness is None:
            self.usefulness = torch.zeros(len(chunks), dtype=torch.float64)
        # the engine's Gram has the chunks' own scale (a GradScaler's, which may differ by step)
        norms = current.gram.diagonal().clamp_min(0).sqrt()
        previous = self.previous
        compared = previous is not None and previous.signature == kept_gradients.signature(current)
        if previous is not None and compared:
            device = chunks[task][0].device
            dots = torch.stack([flat.dot(chunks[task], [c.to(device) for c in row]) for row in previous.chunks])
            if current.sharded and self.sync.global_mode:
                dots = self.sync.sum(dots)
            scale = norms[task] * previous.norms.to(norms.device)
            update = (1 - self.rho) * self.usefulness + self.rho * (dots / scale.clamp_min(_TINY)).cpu()
            self.usefulness = torch.where((scale > 0).cpu(), update, self.usefulness)
        self.previous = KeptGradients.of(current, norms) if keep else None
        return compared

    def diagnostics(self, names: tuple[str, ...] | None) -> dict[str, float]:
        """``usefulness/NAME``: ``a_i`` by the losses' ``names`` (none before the first observation)."""
        if self.usefulness is None or names is None:
            return {}
        return {f"usefulness/{n}": float(v) for n, v in zip(names, self.usefulness.tolist())}

    def state_dict(self) -> dict[str, Any]:
        """CPU copies of ``a`` and the kept gradients, where there are any (under FSDP2 a
        collective: see :mod:`~dtokd.balancing.kept_gradients`)."""
        state: dict[str, Any] = {}
        if self.usefulness is not None:
            state["usefulness"] = self.usefulness.clone()
        if self.previous is not None:
            state["previous"] = self.previous.state()
        return state

    def load_state_dict(self, state: Mapping[str, Any], m: int | None, params: list[Tensor], who: str) -> None:
        """Restore :meth:`state_dict`'s entries (absent ones: nothing learned, nothing kept) for
        ``m`` objectives, the kept gradients for the trainable ones of ``params`` (sharded or
        not, on any number of ranks; dropped where they no longer fit them)."""
        usefulness, previous = state.get("usefulness"), state.get("previous")
        rows = previous and (previous["full"] if "full" in previous else previous["chunks"])  # None: not gathered here
        for key, length in (("usefulness", usefulness), ("previous", rows)):
            if length is not None and len(length) != m:
                raise ValueError(f"{who} state: {key!r} holds {len(length)} objectives, its names {m}")
        self.usefulness = None if usefulness is None else usefulness.to(torch.float64).clone()
        self.previous = None if previous is None else kept_gradients.restore(previous, params, who)


def task_index(method: str, task: str, names: tuple[str, ...]) -> int:
    """The position of the task loss ``task`` among the losses ``names`` (refused by name if absent)."""
    if task not in names:
        raise ValueError(f"{method}: task={task!r} is not one of the losses {list(names)}")
    return names.index(task)


class CrossBatchBalancer(Balancer):
    """Weights from each objective's cross-batch usefulness to the task (see the module)."""

    method = "cross-batch"
    needs_gram = True
    log_losses_by_default = False  # no loss value enters the rule
    learned_state = frozenset({"usefulness", "previous"})

    def __init__(
        self,
        engine: Any,
        *,
        task: str = "task",
        beta: float = 10.0,
        rho: float = 0.01,
        rescale: Rescale = "none",
        **kwargs: Any,
    ) -> None:
        if not isinstance(engine, ExactEngine):
            raise ValueError(f"cross-batch needs each objective's whole gradient: engine='exact', not {engine.name!r}")
        if kwargs.get("log_losses", False):
            raise ValueError(
                "cross-batch uses the gradients only (no loss value enters): log_losses=True is not allowed"
            )
        if rescale not in ("none", "norm"):
            raise ValueError(
                f"cross-batch: rescale={rescale!r} is not allowed; 'none' (the task gradient's length) or "
                "'norm' (the reference combination's)"
            )
        super().__init__(KeepingEngine(engine, self.method), rescale=rescale, **kwargs)
        if self.sync.mode == "local":
            raise ValueError("cross-batch needs the same gradients on every rank: sync='global' (or one process)")
        if not isinstance(task, str):
            raise TypeError(f"cross-batch: task must be the task loss's name, got {task!r}")
        if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"cross-batch: beta must be a finite number >= 0, got {beta!r}")
        check_rate("cross-batch: rho", rho)
        self.task, self.beta, self.rho = task, float(beta), float(rho)
        self._usefulness = CrossBatchUsefulness(self.rho, self.sync)

    @property
    def usefulness(self) -> Tensor | None:
        """``a``: each objective's cosine with the next batch's task gradient, averaged (float64)."""
        return self._usefulness.usefulness

    def diagnostics(self) -> dict[str, float]:
        """``usefulness/NAME``: ``a_i`` (none before the first step)."""
        return self._usefulness.diagnostics(self.names)

    def _current(self) -> StoredGradients:
        if self.engine.last is None:
            raise RuntimeError("cross-batch: no gradients for this step (a backward() through the balancer makes them)")
        return self.engine.last

    def _divisors(self, values: Tensor) -> Tensor:
        """``||g_i|| / ||g_t||`` (inf where ``g_i = 0``), so that the coefficient on a raw loss,
        ``pi_i`` over it, makes ``pi`` the weights of the unit directions in a step at most as
        long as the task's gradient (all inf when the task's gradient is zero: no step)."""
        norms = self._current().gram.diagonal().to(values.device).clamp_min(0).sqrt()
        divisors = norms / norms[task_index(self.method, self.task, self._names)]
        return torch.where(norms > 0, divisors, math.inf)

    def _weights(self, gram: Tensor | None, loss_values: Tensor) -> Tensor:
        """``pi = softmax(beta a)`` of an accepted step (called after its checks), after learning
        ``a`` from its task gradient against the previous step's gradients."""
        current = self._current()
        self.engine.last = None  # kept by the learner as the previous step's
        self._usefulness.observe(current, task_index(self.method, self.task, self._names))
        usefulness = self._usefulness.usefulness
        assert usefulness is not None  # made by observe
        return torch.softmax(self.beta * usefulness, 0)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        """A refused step's gradients are not kept (nor learned from)."""
        self.engine.last = None
        return super()._refuse(*args, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self._usefulness.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        m = None if self.names is None else len(self.names)
        self._usefulness.load_state_dict(state, m, self.engine.params, "cross-batch")


def check_rate(name: str, rho: object) -> None:
    """``rho``, a running mean's rate, must be a number in (0, 1]."""
    if isinstance(rho, bool) or not (isinstance(rho, (int, float)) and 0 < rho <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {rho!r}")
