"""Distillation as a LightningModule: the balanced loss returned from ``training_step``.

Under Lightning's automatic optimization the module returns
``balancer.combine(losses, representation=logits)`` (``sum_i c_i L_i`` with this step's
coefficients detached), so Lightning's precision plugins, gradient accumulation, clipping,
checkpointing and strategies apply unchanged to the balanced update::

    from dtokd.integrations.lightning import DistillationModule

    module = DistillationModule(student, teacher, method="dto", engine="representation",
                                optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    lightning.Trainer(max_epochs=30).fit(module, train_loader)

The losses are ``{"distill": kd_loss(student, teacher, T), "task": cross_entropy}`` by default;
give ``losses=fn(student_logits, teacher_logits, y) -> {name: loss}`` for others (the
distillation loss first: StepInfo's conflict and dominance compare the first two). The
balancer's state (the amortized rule's learned logits, GradNorm's weights) is saved in Lightning
checkpoints under ``"dtokd_balancer"`` and restored with them. StepInfo is logged through
``self.log`` every step (``dtokd/weight/distill``, ``dtokd/conflict``, ...).

``accumulate_grad_batches=N``: each micro-batch gets its own weights from its own gradients,
and Lightning sums the N micro-batches' balanced losses divided by N: the update is the mean of
the micro-batches' balanced updates (not the balanced update of their union, which would need
the Gram of the summed gradients). Same-batch amortized DTO learns once per optimizer step, from
the last micro-batch re-evaluated after that step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning
import torch
from torch import Tensor, nn

from dtokd.balancing import make_balancer
from dtokd.balancing.amortized import AmortizedDTOBalancer
from dtokd.integrations.common import LossFn, default_losses
from dtokd.models.norms import frozen_batchnorm_statistics


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """SGD, lr 0.1, momentum 0.9 (a module function, not a lambda: the module stays picklable)."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


class DistillationModule(lightning.LightningModule):
    """``student`` distilled from the frozen ``teacher`` with a dtokd balancer (``method``,
    ``engine`` and ``balancer_options`` as :func:`dtokd.make_balancer` takes them; the
    representation engine balances at the student's logits). ``optimizer``: a function of the
    student's parameters returning the optimizer (default SGD, lr 0.1, momentum 0.9). Under
    Lightning's ``ddp_spawn`` the module is pickled: give module-level functions, not lambdas."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        method: str = "dto",
        engine: str = "representation",
        balancer_options: Mapping[str, Any] | None = None,
        losses: LossFn | None = None,
        optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = [teacher.eval().requires_grad_(False)]  # a list: not a submodule, not in state_dict
        self.losses = losses or default_losses()
        self.engine = engine
        self.balancer = make_balancer(method, self.student.parameters(), engine=engine, **dict(balancer_options or {}))
        self._optimizer = optimizer or default_optimizer
        self._same_batch = (
            method == "dto-amortized" and dict(balancer_options or {}).get("update", "same-batch") == "same-batch"
        )
        self._batch: tuple[Tensor, Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def _losses(self, x: Tensor, y: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Mapping[str, Tensor]]:
        logits = self.student(x)
        return logits, self.losses(logits, teacher_logits, y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        teacher = self.teacher[0].to(x.device)
        with torch.no_grad():
            teacher_logits = teacher(x)
        logits, losses = self._losses(x, y, teacher_logits)
        loss = self.balancer.combine(losses, representation=logits if self.engine == "representation" else None)
        self._batch = (x, y, teacher_logits)
        info = self.balancer.last_info
        assert info is not None  # combine() has just set it
        self.log_dict(
            {f"dtokd/{k}": v for k, v in info.as_dict().items()}, on_step=True, on_epoch=False, batch_size=x.shape[0]
        )
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then (same-batch amortized DTO) the losses re-evaluated on the
        step's last batch and given to ``balancer.update``: inside the step, so that a
        checkpoint written after the batch holds no half-done balancer step."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self._same_batch and self._batch is not None and isinstance(self.balancer, AmortizedDTOBalancer):
            x, y, teacher_logits = self._batch
            with torch.no_grad(), frozen_batchnorm_statistics(self.student):  # as the dtokd trainer re-evaluates
                _, after = self._losses(x, y, teacher_logits)
            self.balancer.update(after)
        self._batch = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self._optimizer(self.student.parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dtokd_balancer"] = self.balancer.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "dtokd_balancer" not in checkpoint:
            raise ValueError(
                "this Lightning checkpoint holds no dtokd balancer state ('dtokd_balancer'): it was "
                "not written by a DistillationModule"
            )
        self.balancer.load_state_dict(checkpoint["dtokd_balancer"])
