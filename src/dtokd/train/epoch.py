"""One training epoch: shuffled batches (order and augmentation fixed by seed and epoch), forward
under autocast if asked, named losses from the task, ``balancer.backward`` (the only place where
losses become gradients), optional gradient clipping, the optimizer step and the balancer's
after-step hook; the epoch's mean losses and loss weights summed on the device, read once."""

from __future__ import annotations

import functools
import time
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from dtokd.balancing.stepinfo import PerLoss, StepInfo
from dtokd.data import to_device, train_loader
from dtokd.models.norms import frozen_batchnorm_statistics
from dtokd.train.config import Config
from dtokd.train.parts import AMP_DTYPES, Parts
from dtokd.train.records import MetricLog


def train_epoch(
    config: Config, p: Parts, epoch: int, log: MetricLog, *, progress: bool = False, max_steps: int | None = None
) -> dict[str, Any]:
    """Epoch ``epoch`` (0-based) of the run built as ``p``: each rank trains on its shard of
    every global batch (``p.teacher_cache``: the teacher's outputs read or stored); every
    ``log_every``-th step's :class:`~dtokd.balancing.StepInfo`, with the balancer's
    ``diagnostics()``, goes to ``steps.jsonl`` in ``log``; ``progress``: a progress bar;
    ``max_steps``: stop after that many steps (a dry run). Returns the epoch's row: ``epoch``,
    ``lr``, ``epoch_seconds``, ``skipped_steps``, the mean ``loss/NAME`` and
    ``loss_weight/NAME`` over its steps, and ``train_loss`` (their sum)."""
    p.task.student.train()
    loader = train_loader(
        p.data.train,
        config.batch_size,
        config.seed,
        epoch,
        rank=p.ranks.rank,
        world=p.ranks.world,
        repeats=config.data.repeated_augmentation,
    )
    sums, skipped, start = _Sums(p.device), 0, time.perf_counter()
    mixup = make_mixup(config.data.mixup, p.data.num_classes)
    if p.teacher_cache is not None:
        p.teacher_cache.begin_epoch(epoch)
    batches = tqdm(
        loader, desc=f"{config.name} epoch {epoch + 1}/{config.epochs}", leave=False, disable=not progress, unit="batch"
    )
    for i, (x, y) in enumerate(batches):
        x, y = _local_batch(config, p, x, y, mixup)
        step = epoch * len(loader) + i
        diagnose = step % config.log_every == 0
        info, applied = _step(config, p, x, y, epochs_done=epoch + (i + 1) / len(loader), diagnose=diagnose)
        skipped += not applied
        sums.add(info)
        if diagnose:
            row = {"epoch": epoch, "step": step, **info.as_dict(), **p.balancer.diagnostics()}
            log.write("steps.jsonl", row, step)
        if max_steps is not None and sums.count >= max_steps:
            break
    if p.teacher_cache is not None:
        p.teacher_cache.end_epoch(complete=max_steps is None or sums.count < max_steps)
    p.balancer.check_deferred()  # before the epoch's checkpoint
    return _epoch_row(p, epoch, time.perf_counter() - start, skipped, sums)


def _local_batch(config: Config, p: Parts, x: Any, y: Any, mixup: Any) -> tuple[Any, Any]:
    """This rank's part of a training batch on the training device: mixed (``mixup``) on the
    global batch before the rank takes its part (a streamed set's batch is this rank's already)."""
    if mixup is not None:
        x, y = mixup(to_device(x, p.device), to_device(y, p.device))
    if not p.data.train.streams:
        shard = p.ranks.shard(x.shape[0])
        x, y = x[shard], y[shard]
    return to_device(x, p.device, config.channels_last), to_device(y, p.device)


def _step(config: Config, p: Parts, x: Any, y: Any, *, epochs_done: float, diagnose: bool) -> tuple[StepInfo, bool]:
    """One training step on the batch ``(x, y)``, ``epochs_done`` epochs into training: the
    losses, their balanced gradient, clipping, the optimizer step (and the EMA's) unless the
    balancer skipped it, then the balancer's after-step hook. Returns the step's StepInfo and
    whether the optimizer stepped (under a GradScaler, ``scaler.step`` handles a skip itself)."""
    amp_dtype = AMP_DTYPES[config.amp]
    p.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(p.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits, losses = p.forward(x, y, epochs_done)
    info = p.balancer.backward(losses, representation=logits, scaler=p.scaler, diagnose=diagnose)
    if config.optim.grad_clip is not None:
        p.scaler.unscale_(p.optimizer)
        torch.nn.utils.clip_grad_norm_(p.task.parameters(), config.optim.grad_clip)
    applied = p.scaler.is_enabled() or not info.skipped
    if applied:
        p.scaler.step(p.optimizer)
        p.scaler.update()
        if p.ema is not None:
            p.ema.update_parameters(p.task.student)
    # what the method learns after the step (the paper's amortized rule: from the losses
    # re-evaluated on the same batch, which it asks for; nothing for most methods)
    p.balancer.after_step(functools.partial(_losses_after, p, x, y, epochs_done, amp_dtype))
    return info, applied


def _losses_after(p: Parts, x: Any, y: Any, epochs_done: float, amp_dtype: Any) -> dict[str, Tensor]:
    """The step's losses re-evaluated on its batch after the optimizer step (the teacher's
    outputs reused, batch-norm statistics untouched, under the step's autocast), for
    ``balancer.after_step``, which calls it under ``torch.no_grad()`` when it needs them."""
    with (
        frozen_batchnorm_statistics(p.task.student),
        torch.autocast(p.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None),
    ):
        _, after = p.forward(x, y, epochs_done, reuse_teacher=True)
    return after


class _Sums:
    """The sums of the steps' losses, weights and loss weights on the training device: every
    step's numbers are brought there, whichever path (host or device) the balancer took, and
    none is read on the host before :meth:`means` (see :class:`~dtokd.balancing.StepInfo`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.count = 0
        self._total: Tensor | None = None

    def add(self, info: StepInfo) -> None:
        values = info.per_loss_on_device.to(self.device, non_blocking=True)  # no host read
        if self._total is None:
            self._total = torch.zeros_like(values)
        self._total.add_(values)
        self.count += 1

    def means(self) -> PerLoss | None:
        """The means over the steps added, read on the host once (None: no step)."""
        if self._total is None:
            return None
        return StepInfo.read_per_loss((self._total / self.count).cpu())


def _epoch_row(p: Parts, epoch: int, seconds: float, skipped: int, sums: _Sums) -> dict[str, Any]:
    """The epoch's metrics row (before evaluation): its learning rate, seconds, skipped steps,
    mean loss and loss weight of each loss by name, and ``train_loss``, the sum of the mean losses."""
    row: dict[str, Any] = {
        "epoch": epoch,
        "lr": p.optimizer.param_groups[0]["lr"],
        "epoch_seconds": seconds,
        "skipped_steps": skipped,
    }
    means = sums.means()
    if means is not None:
        names = p.balancer.names
        assert names is not None  # fixed by the epoch's first step
        row.update({f"loss/{n}": v for n, v in zip(names, means.losses.tolist())})
        row.update({f"loss_weight/{n}": v for n, v in zip(names, means.loss_weights.tolist())})
    row["train_loss"] = sum(v for k, v in row.items() if k.startswith("loss/"))
    return row


def make_mixup(options: dict[str, Any] | None, num_classes: int) -> Any:
    """timm's ``Mixup`` with ``options`` (None: no mixing). Its random numbers come from numpy's
    global generator, which every run seeds and every checkpoint saves."""
    if not options:
        return None
    try:
        from timm.data import Mixup
    except ImportError:
        raise ValueError("data.mixup needs timm: pip install 'dtokd[timm]'") from None
    try:
        return Mixup(num_classes=num_classes, **options)
    except TypeError as error:
        raise ValueError(f"data.mixup={options!r}: {error}") from None
