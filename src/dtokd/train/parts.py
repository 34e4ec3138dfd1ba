"""What a run is built from: one typed object that the loop's steps receive whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dtokd.balancing import Balancer
from dtokd.data import DataBundle
from dtokd.tasks import Task
from dtokd.train import distributed
from dtokd.train.teacher_cache import CachedTeacher

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``amp``: the autocast dtype of each setting (None: no autocast)."""


@dataclass
class Parts:
    """Everything a run is built from, before it touches its folder (see
    :func:`dtokd.train.build.build_parts`).

    ``forward``: the task or its DDP wrapper (what a training step calls); ``teacher_input``:
    the map from the student's input normalisation to the teacher's (None: the same);
    ``identity``: what a checkpoint must match to be restored into these parts; ``ema``: the
    exponential moving average of the student (None: ``optim.ema_decay`` unset);
    ``teacher_cache``: the teacher's outputs read or stored (None: ``teacher.cache_outputs`` off).
    """

    ranks: distributed.Ranks
    device: torch.device
    data: DataBundle
    student: nn.Module
    teacher: nn.Module | None
    teacher_input: nn.Module | None
    task: Task
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    balancer: Balancer
    scaler: torch.amp.GradScaler
    identity: dict[str, Any]
    ema: torch.optim.swa_utils.AveragedModel | None
    teacher_cache: CachedTeacher | None
