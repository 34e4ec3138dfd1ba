"""Distillation with the Hugging Face ``Trainer``: ``compute_loss`` returns the balanced loss.

``DistillationTrainer`` is a ``transformers.Trainer`` with a frozen teacher, named losses and a
dtokd balancer; its ``compute_loss`` returns ``balancer.combine(losses, representation=logits)``,
so the Trainer's own backward (``accelerate``: mixed precision, gradient accumulation, DDP,
DeepSpeed, FSDP) applies the balanced update::

    from dtokd.integrations.transformers import DistillationTrainer

    trainer = DistillationTrainer(model=student, teacher=teacher, method="dto", engine="representation",
                                  args=TrainingArguments(...), train_dataset=...)
    trainer.train()

The losses are ``losses(student_logits, teacher_logits, labels) -> {name: loss}``, by default
``{"distill": T^2 KL at T = 4, "task": cross-entropy}`` on ``(B, C)`` logits; for causal LMs
give ``losses=causal_lm_losses(...)`` (:mod:`dtokd.integrations.common`: a token-level divergence
and the next-token cross-entropy over the tokens whose label is not -100, shifted as the model's
own loss). The model is called with the inputs but ``labels``
and must return ``logits`` (an output object or a dict with it, or a tensor); the teacher is
called with the same inputs. The balancer's state is saved in every checkpoint
(``dtokd_balancer.pt``) and restored by ``train(resume_from_checkpoint=...)``. The StepInfo of
the last step is added to each log (``dtokd/loss/task``, ``dtokd/weight/distill``,
``dtokd/conflict``, ...); the Trainer's own ``loss`` is the balanced loss's value (for DTO on
log losses always ``sum_i pi_i = 1``): read the losses from ``dtokd/loss/*``.
Gradient accumulation: each micro-batch is balanced on its own gradients and the Trainer averages
them; the amortized rule learns once per optimizer step. The amortized rule runs with
``update="next-step"`` here (``"same-batch"`` needs a re-evaluation after the optimizer step,
which the Trainer does not offer a hook for; refused). ``label_smoothing_factor`` smooths the
task's cross-entropy of the default losses (refused for a losses function of the user's, which
must smooth by itself). Evaluation (``eval_dataset``, ``trainer.evaluate()``,
``trainer.predict()``): no balancing and no balancer state changes; ``eval_loss`` is the task
loss (the losses' ``"task"`` entry, else their sum), and each named loss is logged as
``eval_dtokd/loss/<name>``. The teacher is the caller's module, run frozen
(:class:`~dtokd.tasks.teacher.Teacher`: eval mode and no gradients for its forward
only), on the student's device and dtype; one whose logits do not match the student's is refused
at the first batch, naming it. Checkpoints' balancer states are read with ``weights_only=True``
(a file carrying any other pickled object is refused, never run), and one saved by another
method is refused.

**Offline teacher outputs** (:mod:`dtokd.data.teacher_outputs`): ``teacher=None`` and a
dataset whose items carry the teacher's top-k as the columns ``teacher_topk_log_probs`` and
``teacher_topk_indices`` (``WithTeacherTopk(dataset, TeacherOutputs(folder, ...))``, by block
index); the losses receive the pair ``(log_probs, indices)`` instead of the teacher's logits
(``causal_lm_losses()`` compares over the k tokens and the tail). No teacher is in memory; a
batch without the columns is refused, and so is a live teacher given beside them.

TRL: ``class SFTDistillationTrainer(DistillationTrainer, trl.SFTTrainer)`` (this class first,
so its ``compute_loss`` is used) keeps TRL's data preparation and collation (``-100`` labels on
padding and prompts) under the balanced loss; give ``losses=causal_lm_losses()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from dtokd.balancing import make_balancer
from dtokd.balancing.balancers import options_without_losses_after
from dtokd.data.offline_teacher import WithTeacherTopk
from dtokd.integrations.common import (
    check_balanced_parameters,
    default_losses,
    with_distillation_form,
    with_label_smoothing,
)
from dtokd.tasks.teacher import Teacher

BALANCER_FILE = "dtokd_balancer.pt"
TOPK_COLUMNS = (WithTeacherTopk.LOG_PROBS, WithTeacherTopk.INDICES)
SHARDING = "sharded training is not supported in the Trainer yet; use dtokd distill with parallel=fsdp"
"""The batch columns that carry offline top-k teacher outputs."""


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = output["logits"] if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None:
        raise ValueError(f"the model's output {type(output).__name__} has no 'logits'")
    return logits


class DistillationTrainer(transformers.Trainer):
    """A ``Trainer`` that distils ``teacher`` into ``model`` with a dtokd balancer (``method``,
    ``engine``, ``balancer_options`` as :func:`dtokd.make_balancer` takes them)."""

    # The balanced loss is a mean over this micro-batch, not a sum normalised by the token count
    # of the accumulated batch: the Trainer must divide it by the accumulation steps (which it
    # would skip for a causal LM, whose forward takes loss keywords, or under a TRL parent).
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None,
        method: str = "dto",
        engine: str = "representation",
        balancer_options: Mapping[str, Any] | None = None,
        losses: Callable[[Tensor, Tensor, Tensor], Mapping[str, Tensor]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        options = options_without_losses_after(method, balancer_options or {}, "the Hugging Face Trainer")
        self.teacher = Teacher(teacher) if teacher is not None else None
        self.losses = with_label_smoothing(
            with_distillation_form(losses or default_losses(), method),
            self.args.label_smoothing_factor,
            "label_smoothing_factor",
        )
        self.label_smoother = None  # the smoothing is the losses', above
        if self.model is None:
            raise ValueError("DistillationTrainer needs model=, the student to distil into")
        self.balancer = make_balancer(method, self.model.parameters(), engine=engine, **options)
        self.model_accepts_loss_kwargs = False  # what transformers < 5.19 reads instead of loss_is_scaled_for_ga
        if "labels" not in self.label_names:  # kept for the losses even if the model's forward takes none
            self.label_names = [*self.label_names, "labels"]
        self._evaluation_losses: dict[str, list[float]] = {}

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, Any]:
        inputs = dict(inputs)
        if "labels" not in inputs:
            raise KeyError(f"the batch has no 'labels' (it has {sorted(inputs)}): the distillation losses need them")
        labels = inputs.pop("labels")
        teacher_topk = self._pop_teacher_topk(inputs)
        outputs = model(**inputs)
        logits = _logits(outputs)
        teacher: Any = teacher_topk
        if self.teacher is not None:
            teacher_logits = _logits(self.teacher(**inputs))
            self.teacher.check_fits(logits, teacher_logits)
            teacher = teacher_logits.to(logits.dtype)
        losses = self.losses(logits, teacher, labels)
        if model.training and torch.is_grad_enabled():
            check_balanced_parameters(self.balancer, model.parameters(), SHARDING)
            loss = self.balancer.combine(losses, representation=logits)
        else:  # evaluation: nothing to balance, and the balancer's state must not move
            for name, value in losses.items():
                self._evaluation_losses.setdefault(name, []).append(float(value.detach()))
            loss = losses["task"] if "task" in losses else torch.stack([v.reshape(()) for v in losses.values()]).sum()
        return (loss, outputs) if return_outputs else loss

    def _pop_teacher_topk(self, inputs: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        """The batch's offline top-k columns, taken out of ``inputs`` (the model is not given them)."""
        present = [name for name in TOPK_COLUMNS if name in inputs]
        if self.teacher is not None:
            if present:
                raise ValueError(
                    f"the batch carries offline teacher outputs ({present}) and a live teacher was given: "
                    "give one of them (teacher=None to distil from the outputs)"
                )
            return None
        if len(present) != len(TOPK_COLUMNS):
            raise KeyError(
                f"teacher=None, but the batch has no columns {list(TOPK_COLUMNS)} (it has {sorted(inputs)}): "
                "wrap the dataset in dtokd.data.offline_teacher.WithTeacherTopk, or give a teacher"
            )
        return inputs.pop(TOPK_COLUMNS[0]), inputs.pop(TOPK_COLUMNS[1])

    def _set_signature_columns_if_needed(self) -> None:
        """The model's inputs and labels, as the Trainer keeps them, and the top-k columns (which
        the Trainer would otherwise remove as unknown to the model's ``forward``)."""
        super()._set_signature_columns_if_needed()
        columns = self._signature_columns
        if columns is not None and not set(TOPK_COLUMNS) <= set(columns):
            self._signature_columns = [*columns, *TOPK_COLUMNS]

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's evaluation loop, with each named loss's mean over the batches added to
        its metrics (``<prefix>_dtokd/loss/<name>``; this process's batches)."""
        self._evaluation_losses = {}
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        metrics = output.metrics
        if metrics is not None:
            for name, values in self._evaluation_losses.items():
                metrics[f"{prefix}_dtokd/loss/{name}"] = sum(values) / len(values)
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        info = self.balancer.last_info
        if info is not None and "loss" in logs:  # a training log: the last step's balancer numbers
            logs = {**logs, **{f"dtokd/{k}": v for k, v in info.as_dict().items()}}
        super().log(logs, start_time)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        folder = (
            Path(self._get_output_dir(trial=trial))
            / f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        )
        state = self.balancer.state_dict()  # on every process: a collective for a cross-batch rule under FSDP2
        if self.args.should_save:
            torch.save(state, folder / BALANCER_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint) / BALANCER_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not written by a DistillationTrainer "
                "(its balancer state is needed to continue the run as it was)"
            )
        self.balancer.load_state_dict(torch.load(path, weights_only=True))
