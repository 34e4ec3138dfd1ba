"""Optimizers (SGD, AdamW) and per-epoch learning-rate schedules with linear warm-up."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from dtokd.train.config import OptimConfig


def make_optimizer(params: Iterable[torch.Tensor], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"optim.name={cfg.name!r} is not allowed; use 'sgd' or 'adamw'")


def lr_factor(cfg: OptimConfig, epoch: int, epochs: int) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based): linear warm-up over ``warmup_epochs``, then
    ``cosine`` (to 0 at the end), ``step`` (times ``gamma`` at each of ``milestones``) or ``constant``."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.schedule == "cosine":
        span = max(1, epochs - cfg.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "constant":
        return 1.0
    raise ValueError(f"optim.schedule={cfg.schedule!r} is not allowed; use 'cosine', 'step' or 'constant'")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(cfg, 0, epochs)  # validate the schedule name before training starts
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch, epochs))
