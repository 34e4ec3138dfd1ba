"""Statistics over a cell's seeds, read from the finished runs' records (``summary.json``,
``metrics.jsonl``, ``steps.jsonl``, ``teacher.json``): mean and standard deviation of each
figure (:func:`cell_statistics`), the curve over epochs, the logged balancer quantities, and the
paired difference of two methods seed by seed (:func:`paired_differences`) over the seeds whose
runs learned from the same teacher (:func:`same_teacher`). Reads; writes nothing."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from dtokd.train.records import read_jsonl


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN and NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell_statistics(folders: list[Path]) -> dict[str, Any]:
    """Mean and standard deviation over seeds, and the means of the logged balancer quantities."""
    summaries = [json.loads((f / "summary.json").read_text()) for f in folders if (f / "summary.json").is_file()]
    diverged = sum((f / "diverged.json").is_file() for f in folders)
    metrics = [read_jsonl(f / "metrics.jsonl") for f in folders if (f / "summary.json").is_file()]
    steps = [row for f in folders if (f / "summary.json").is_file() for row in read_jsonl(f / "steps.jsonl")]
    m = summaries[0].get("metric", "top1") if summaries else "top1"
    others = other_metrics(summaries, m)
    cell: dict[str, Any] = {"seeds": len(summaries), "diverged": diverged, "metric": m, "other_metrics": others}
    keys = [f"test_{m}_at_best_val", f"best_val_{m}", f"best_test_{m}", f"last_test_{m}", "seconds_per_epoch"]
    keys += [key for x in others for key in (f"test_{x}_at_best_val", f"last_test_{x}")]
    for key in keys:
        cell[key], cell[key + "_std"] = mean_std([s[key] for s in summaries if s.get(key) is not None])
    times = [s["seconds_per_epoch"] for s in summaries]
    cell["seconds_per_epoch_min"] = min(times) if times else math.nan  # interference only adds time
    split = _curve_split(metrics, m)
    rows = [[row for row in run if f"{split}_{m}" in row] for run in metrics]  # the evaluated epochs
    count = min((len(r) for r in rows), default=0)
    cell["curve_split"] = split
    cell["curve_epochs"] = [rows[0][e]["epoch"] + 1 for e in range(count)]
    cell["curve"] = [statistics.fmean(run[e][f"{split}_{m}"] for run in rows) for e in range(count)]
    cell["curve_std"] = [
        statistics.stdev([run[e][f"{split}_{m}"] for run in rows]) if len(rows) > 1 else 0.0 for e in range(count)
    ]
    cell.update(_step_statistics(steps))
    return cell


def _step_statistics(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The logged balancer quantities of a cell's runs (``steps`` of all its seeds together): the
    mean of each coefficient (``loss_weight/...``, ``weight/...``), the first loss's coefficient
    and the update length against the reference's over steps (means over seeds), the update
    length's geometric mean, the mean conflict and the geometric mean dominance."""
    cell: dict[str, Any] = {}
    for key in sorted({k for row in steps for k in row if k.startswith(("loss_weight/", "weight/"))}):
        cell[key] = statistics.fmean(row[key] for row in steps if key in row)
    first_weight = next((k for k in sorted({k for row in steps for k in row}) if k.startswith("loss_weight/")), None)
    by_step: dict[int, list[float]] = {}
    for row in steps:
        if first_weight in row:
            by_step.setdefault(row["step"], []).append(row[first_weight])
    cell["weight_curve_name"] = first_weight
    cell["weight_curve"] = [(step, statistics.fmean(v)) for step, v in sorted(by_step.items())]
    ratios: dict[int, list[float]] = {}
    for row in steps:
        if "update_ratio" in row and math.isfinite(row["update_ratio"]):
            ratios.setdefault(row["step"], []).append(row["update_ratio"])
    cell["update_ratio_curve"] = [(step, statistics.fmean(v)) for step, v in sorted(ratios.items())]
    cell["update_ratio"] = (
        math.exp(statistics.fmean(math.log(r) for v in ratios.values() for r in v if r > 0)) if ratios else None
    )  # geometric mean over the logged steps
    conflicts = [row["conflict"] for row in steps if "conflict" in row]
    dominances = [row["dominance"] for row in steps if "dominance" in row and 0 < row["dominance"] < math.inf]
    cell["conflict"] = statistics.fmean(conflicts) if conflicts else None
    cell["dominance"] = math.exp(statistics.fmean(math.log(d) for d in dominances)) if dominances else None
    return cell


def other_metrics(summaries: list[dict[str, Any]], metric: str) -> list[str]:
    """The test metrics the summaries report besides the one that chooses the epoch (``ppl``
    for causal LMs: ``test_ppl_at_best_val`` is the perplexity at the epoch chosen on
    validation ``metric``), in the order the first summary lists them."""
    keys = summaries[0] if summaries else {}
    found = [
        k[len("test_") : -len("_at_best_val")] for k in keys if k.startswith("test_") and k.endswith("_at_best_val")
    ]
    return [x for x in found if x != metric]


def _curve_split(metrics: list[list[dict[str, Any]]], metric: str) -> str:
    """``test`` when the runs evaluated the test split per epoch (``eval.test=every``), else ``val``."""
    rows = [row for run in metrics for row in run if f"val_{metric}" in row or f"test_{metric}" in row]
    return "test" if rows and all(f"test_{metric}" in row for row in rows) else "val"


def paired_differences(folders: list[tuple[Path, Path]], metric: str) -> tuple[float, float, int]:
    """Mean and standard deviation over seeds of :func:`paired_values`, and how many seeds that is."""
    differences = paired_values(folders, metric)
    mean, std = mean_std(differences)
    return mean, std, len(differences)


def paired_values(folders: list[tuple[Path, Path]], metric: str) -> list[float]:
    """``method - reference`` in test metric at the epoch chosen on validation, seed by seed, from
    one (method's, reference's) pair of cell folders per seed, over the seeds both finished with
    the same teacher (same seed: same initialisation and batches; see :func:`same_teacher`)."""
    differences = []
    for method_folder, reference_folder in folders:
        pair = [method_folder / "summary.json", reference_folder / "summary.json"]
        if all(p.is_file() for p in pair) and same_teacher(method_folder, reference_folder):
            values = [json.loads(p.read_text()).get(f"test_{metric}_at_best_val") for p in pair]
            if None not in values:
                differences.append(values[0] - values[1])
    return differences


def same_teacher(first: Path, second: Path) -> bool:
    """Whether two finished runs can be paired as far as their teachers go: one of them
    distilled from none (the student alone), or both from the same teacher, by the SHA-256 of
    its weights in ``teacher.json`` where both have it, otherwise by its name and every figure
    measured on its validation and test splits (a teacher trained again need not be
    bit-identical: a record restored into a fresh checkout keeps its cells, not the teacher's
    weights)."""
    paths = [first / "teacher.json", second / "teacher.json"]
    if not all(p.is_file() for p in paths):
        return True
    a, b = (json.loads(p.read_text()) for p in paths)
    if "weights" in a and "weights" in b:
        return a["weights"] == b["weights"]
    measured = [{k: v for k, v in t.items() if k not in ("checkpoint", "weights")} for t in (a, b)]
    return measured[0] == measured[1]
