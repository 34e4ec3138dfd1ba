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
the Gram of the summed gradients). The amortized rule learns once per optimizer step
(``balancer.after_step``), same-batch from the last micro-batch re-evaluated after that step.

Validation and test sets (``trainer.fit(module, train, val)``, ``trainer.validate``,
``trainer.test``): the student's top-1 accuracy and each named loss against the teacher, logged
as ``val/accuracy``, ``val/loss/<name>`` (``test/...``), averaged over the set. The teacher is
the caller's module, run frozen (:class:`~dtokd.tasks.teacher.Teacher`: eval mode
and no gradients for its forward only; the caller's object keeps its flags), on the student's
device and dtype; one whose logits do not match the student's is refused at the first batch.
Batches are ``(inputs, labels)`` pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning
import torch
from torch import Tensor, nn

from dtokd.balancing import make_balancer
from dtokd.integrations.common import (
    LossFn,
    check_balanced_parameters,
    default_losses,
    with_distillation_form,
)
from dtokd.models.norms import frozen_batchnorm_statistics
from dtokd.tasks.teacher import Teacher

SHARDING = (
    "sharding the student (FSDP2 in configure_model) is not supported by DistillationModule yet; "
    "use dtokd distill with parallel=fsdp"
)


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
        self.teacher = Teacher(teacher)  # not a submodule: not trained, not in state_dict
        self.losses = with_distillation_form(losses or default_losses(), method)
        self.engine = engine
        self.balancer = make_balancer(method, self.student.parameters(), engine=engine, **dict(balancer_options or {}))
        self._optimizer = optimizer or default_optimizer
        self._batch: tuple[Tensor, Tensor, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.student(x)

    def _losses(self, x: Tensor, y: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Mapping[str, Tensor]]:
        logits = self.student(x)
        return logits, self.losses(logits, teacher_logits, y)

    def _teacher_logits(self, x: Tensor, student_logits: Tensor | None = None) -> Tensor:
        teacher_logits = self.teacher(x)
        if student_logits is not None:
            self.teacher.check_fits(student_logits, teacher_logits)
            teacher_logits = teacher_logits.to(student_logits.dtype)
        return teacher_logits

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = _pair(batch)
        check_balanced_parameters(self.balancer, self.student.parameters(), SHARDING)
        logits = self.student(x)
        teacher_logits = self._teacher_logits(x, logits)
        losses = self.losses(logits, teacher_logits, y)
        loss = self.balancer.combine(losses, representation=logits)
        self._batch = (x, y, teacher_logits)
        info = self.balancer.last_info
        assert info is not None  # combine() has just set it
        self.log_dict(
            {f"dtokd/{k}": v for k, v in info.as_dict().items()}, on_step=True, on_epoch=False, batch_size=x.shape[0]
        )
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then ``balancer.after_step`` (the amortized rule learns there,
        same-batch from the step's last batch re-evaluated): inside the step, so that a
        checkpoint written after the batch holds no half-done balancer step."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        batch, self._batch = self._batch, None
        self.balancer.after_step(None if batch is None else lambda: self._losses_after(*batch))

    def _losses_after(self, x: Tensor, y: Tensor, teacher_logits: Tensor) -> Mapping[str, Tensor]:
        with frozen_batchnorm_statistics(self.student):  # as the dtokd trainer re-evaluates
            return self._losses(x, y, teacher_logits)[1]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def _evaluation_step(self, batch: Any, stage: str) -> None:
        """The student's top-1 accuracy and the named losses on an evaluation batch (Lightning
        averages them over the set, weighted by the batch sizes)."""
        x, y = _pair(batch)
        logits = self.student(x)
        losses = self.losses(logits, self._teacher_logits(x, logits), y)
        metrics = {f"{stage}/loss/{name}": loss.detach() for name, loss in losses.items()}
        if y.dim() == 1:  # integer labels
            metrics[f"{stage}/accuracy"] = (logits.argmax(-1) == y).float().mean()
        self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=x.shape[0])

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


def _pair(batch: Any) -> tuple[Tensor, Tensor]:
    """A batch as ``(inputs, labels)``; anything else is named."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        what = f"a {type(batch).__name__}" + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
        raise ValueError(
            f"DistillationModule takes batches (inputs, labels), got {what}: the task's cross-entropy needs the "
            "labels (a TensorDataset(x, y) gives such pairs)"
        )
    return batch[0], batch[1]
