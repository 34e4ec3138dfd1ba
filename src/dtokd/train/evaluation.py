"""A run's evaluations: which epochs are evaluated, a model (and its EMA) on named splits, and
the end-of-run test of ``eval.test=end`` (:func:`final_test`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import cast

from torch import nn

from dtokd.train import checkpoint as ckpt
from dtokd.train.config import Config
from dtokd.train.parts import Parts
from dtokd.train.sharding import FullState


def evaluates(config: Config, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) is evaluated: every ``eval.every`` epochs and the last."""
    return (epoch + 1) % config.eval.every == 0 or epoch + 1 == config.epochs


def evaluate(
    config: Config, p: Parts, model: nn.Module, ema: nn.Module | None, splits: tuple[str, ...]
) -> dict[str, float]:
    """``model`` (and the EMA model, as ``ema_<split>_...``) on each of ``splits``."""
    row: dict[str, float] = {}
    for split in splits:
        for prefix, net in ((split, model), (f"ema_{split}", cast(nn.Module, ema.module) if ema is not None else None)):
            if net is not None:
                row.update(
                    prefixed(
                        prefix,
                        p.task.evaluate(
                            net,
                            getattr(p.data, split),
                            config.eval_batch_size,
                            p.device,
                            channels_last=config.channels_last,
                        ),
                    )
                )
    return row


def final_test(config: Config, folder: Path, p: Parts) -> dict[str, dict[str, float]]:
    """``eval.test=end``: the test split on the last model (and its EMA) and on ``best.pt`` (the
    checkpoint chosen on the validation split), as ``{"last": ..., "best": ..., "best_epoch": k}``."""
    last = evaluate(config, p, p.student, p.ema, ("test",))
    best_state = ckpt.load_checked(folder / "best.pt", p.identity)
    if config.parallel == "fsdp":  # a sharded student is not copied: it takes the chosen weights itself, at the end
        chosen = p.student
        FullState(chosen).load_state_dict(best_state["model"])
    else:
        chosen = copy.deepcopy(p.student)
        chosen.load_state_dict(best_state["model"])
    return {"last": last, "best": evaluate(config, p, chosen, None, ("test",)), "best_epoch": best_state["epoch"]}


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` with their names prefixed: ``{"<prefix>_<name>": value}``."""
    return {f"{prefix}_{k}": v for k, v in metrics.items()}
