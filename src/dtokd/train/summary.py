"""A run's figures from its history of epoch rows: the epoch chosen, the summary it ends with
and the line each epoch prints."""

from __future__ import annotations

from typing import Any

from dtokd.tasks import task_kind
from dtokd.tasks.names import LOWER_IS_BETTER
from dtokd.train.config import Config, selection_metric


def summarize(history: list[dict[str, Any]], config: Config, final: dict[str, Any] | None = None) -> dict[str, Any]:
    """Best epoch (by the validation metric, :func:`~dtokd.train.config.selection_metric`, among
    the evaluated epochs: the highest, or the lowest for a perplexity or loss, the latest of ties
    as ``best.pt`` keeps; by the test one when there is no validation split), its test metric,
    the best and last test metric, and the mean training seconds per epoch; keys name the metric
    (``best_val_top1``, ``last_test_AP``, ``best_val_ppl``, ...); a causal LM's summary adds
    next-token top-1 and perplexity at the chosen and the last epoch, whichever chose.
    ``final``: the end-of-run
    test evaluation of ``eval.test=end`` (:func:`~dtokd.train.evaluation.final_test`), which gives
    the test figures (no best-of-test figure: the test split was not seen per epoch)."""
    method = config.balancer.method if config.teacher.name else "student alone"
    m = selection_metric(config)
    summary: dict[str, Any] = {
        "name": config.name,
        "method": method,
        "seed": config.seed,
        "metric": m,
        "epochs_run": len(history),
    }
    evaluated = [i for i, row in enumerate(history) if selection_key(row, m)]
    if not evaluated:
        return summary
    key = selection_key(history[evaluated[-1]], m)
    assert key is not None  # an evaluated row
    sign = orientation(m)
    best = max(evaluated, key=lambda i: (sign * history[i][key], i))
    summary.update(_test_figures(history, config, final, evaluated, best))
    if final and final["best_epoch"] != best + 1:
        raise RuntimeError(
            f"best.pt holds epoch {final['best_epoch']}, but the validation history chooses epoch {best + 1}"
        )
    return summary


def _test_figures(
    history: list[dict[str, Any]], config: Config, final: dict[str, Any] | None, evaluated: list[int], best: int
) -> dict[str, Any]:
    """The summary's figures once epoch ``best`` (0-based) is chosen among the ``evaluated``
    ones, in the order :func:`summarize` writes them."""
    m = selection_metric(config)
    best_of = min if m in LOWER_IS_BETTER else max
    tested = final["last"] if final else history[evaluated[-1]]
    at_best = final["best"] if final else history[best]
    figures: dict[str, Any] = {
        "best_epoch": best + 1,
        f"best_val_{m}": history[best].get(f"val_{m}"),
        f"test_{m}_at_best_val": at_best.get(f"test_{m}"),
    }
    if not final:
        tests = (history[i][f"test_{m}"] for i in evaluated if f"test_{m}" in history[i])
        figures[f"best_test_{m}"] = best_of(tests, default=None)
    figures[f"last_test_{m}"] = tested.get(f"test_{m}")  # None: the metric is undefined on this test split
    if "test_top5" in tested:
        figures["last_test_top5"] = tested["test_top5"]
    for other in task_kind(config.task).reported_metrics:
        if other != m:
            figures[f"test_{other}_at_best_val"] = at_best.get(f"test_{other}")
            figures[f"last_test_{other}"] = tested.get(f"test_{other}")
    figures["seconds_per_epoch"] = sum(r["epoch_seconds"] for r in history) / len(history)
    figures["test_evaluated"] = config.eval.test
    figures["eval_every"] = config.eval.every
    if f"ema_test_{m}" in tested:
        figures[f"ema_last_test_{m}"] = tested[f"ema_test_{m}"]
        if not final:
            figures[f"ema_best_test_{m}"] = best_of(history[i][f"ema_test_{m}"] for i in evaluated)
    return figures


def selection_key(row: dict[str, Any], metric: str) -> str | None:
    """The key a checkpoint is chosen by in an evaluated epoch's row (None: not evaluated)."""
    return next((k for k in (f"val_{metric}", f"test_{metric}") if k in row), None)


def is_best(history: list[dict[str, Any]], metric: str) -> bool:
    """Whether the last epoch is the best evaluated so far (ties: the later), as :func:`summarize` chooses."""
    key = selection_key(history[-1], metric)
    if key is None:
        return False
    sign = orientation(metric)
    return sign * history[-1][key] >= max(sign * r[key] for r in history if key in r)


def orientation(metric: str) -> float:
    """1 for a metric whose higher value is better (accuracy, AP), -1 for a perplexity or loss."""
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


def epoch_line(config: Config, row: dict[str, Any], epoch: int) -> str:
    """The line a verbose run prints after epoch ``epoch`` (0-based): the training loss, the
    selection metric on each evaluated split (and the perplexity of a causal LM chosen by
    another metric) and the epoch's seconds."""
    m = selection_metric(config)
    scores = "".join(
        f" {split} {m} {row[f'{split}_{m}']:.2f}"
        + (f" ppl {row[f'{split}_ppl']:.2f}" if f"{split}_ppl" in row and m != "ppl" else "")
        for split in ("val", "test")
        if f"{split}_{m}" in row
    )
    return (
        f"[{config.name}] epoch {epoch + 1}/{config.epochs}: loss {row['train_loss']:.4f}{scores} "
        f"({row['epoch_seconds']:.1f}s)"
    )
