"""Optimizers (SGD, AdamW) and per-epoch learning-rate schedules with linear warm-up."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from dtokd.train.config import CHOICES, OptimConfig


def make_optimizer(
    named_params: Iterable[tuple[str, torch.Tensor]],
    cfg: OptimConfig,
    batch_size: int,
    no_decay_names: Iterable[str] = (),
) -> torch.optim.Optimizer:
    """SGD or AdamW over the named parameters.

    ``lr_batch_scale`` N: the learning rate is ``lr * batch_size / N`` (DeiT: N = 512, the
    global batch). ``no_decay_1d``: no weight decay on one-dimensional parameters (norms,
    biases) and on the names in ``no_decay_names`` (a ViT's tokens and position embedding),
    as DeiT and timm train; two parameter groups then, in the order the parameters come.
    """
    if cfg.name not in CHOICES["optim.name"]:
        raise ValueError(f"optim.name={cfg.name!r} is not allowed; use one of {list(CHOICES['optim.name'])}")
    if cfg.lr_batch_scale is not None and cfg.lr_batch_scale < 1:
        raise ValueError(f"optim.lr_batch_scale={cfg.lr_batch_scale} must be a positive integer (e.g. 512)")
    lr = cfg.lr * batch_size / cfg.lr_batch_scale if cfg.lr_batch_scale else cfg.lr
    named = list(named_params)
    skip = set(no_decay_names)
    if cfg.no_decay_1d:
        decay = [p for n, p in named if p.ndim > 1 and n not in skip]
        plain = [p for n, p in named if p.ndim <= 1 or n in skip]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in named], "weight_decay": cfg.weight_decay}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=lr)


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
    raise ValueError(f"optim.schedule={cfg.schedule!r} is not allowed; use one of {list(CHOICES['optim.schedule'])}")


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, epochs: int
) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(cfg, 0, epochs)  # validate the schedule name before training starts
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch, epochs))
