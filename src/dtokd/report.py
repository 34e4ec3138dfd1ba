"""Plots and tables from run folders: accuracy and loss curves, the balancer's weights, conflict
and dominance over training (PNG), and a markdown summary with several runs side by side."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dtokd.train.config import Config, load_config  # noqa: E402
from dtokd.train.loop import summarize  # noqa: E402
from dtokd.train.records import read_jsonl  # noqa: E402


def load_run(folder: Path) -> dict[str, Any]:
    """A run folder's records; an unfinished run's summary is computed from its epochs so far."""
    folder = Path(folder)
    summary_path = folder / "summary.json"
    if not (folder / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{folder} is not a run folder (no metrics.jsonl)")
    metrics = read_jsonl(folder / "metrics.jsonl")
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
    else:
        config = load_config(folder / "config.yaml") if (folder / "config.yaml").is_file() else Config()
        summary = {**summarize(metrics, config), "unfinished": True}
    return {
        "folder": folder,
        "name": folder.name + ("" if summary_path.is_file() else " (unfinished)"),
        "summary": summary,
        "metrics": metrics,
        "steps": read_jsonl(folder / "steps.jsonl"),
        "teacher": json.loads((folder / "teacher.json").read_text()) if (folder / "teacher.json").is_file() else {},
    }


def report(folders: Sequence[str | Path], out: str | Path) -> Path:
    """Write ``report.md`` and its PNG plots into ``out``; return the markdown path."""
    if not folders:
        raise ValueError("report needs at least one run folder")
    runs = [load_run(Path(f)) for f in folders]
    metric = run_metric(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = [
        _curves(runs, out / "accuracy.png", f"test_{metric}", METRIC_LABELS[metric]),
        _curves(
            runs, out / "val_accuracy.png", f"val_{metric}", METRIC_LABELS[metric].replace("test", "validation", 1)
        ),
        _curves(runs, out / "loss.png", "train_loss", "training loss (sum of the losses)"),
        _step_plot(runs, out / "weights.png", "loss_weight/", "coefficient on each loss gradient"),
        _step_plot(runs, out / "conflict.png", "conflict", "conflict cos(g_1, g_2)"),
        _step_plot(runs, out / "dominance.png", "dominance", "dominance ||g_1|| / ||g_2||", log=True),
    ]
    lines = ["# dtokd report", "", table(runs), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots if p is not None]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


METRIC_LABELS = {
    "top1": "test top-1 (%)",
    "top5": "test top-5 (%)",
    "AP": "test box AP (COCO, %)",
    "AP50": "test box AP50 (COCO, %)",
    "AP75": "test box AP75 (COCO, %)",
    "ppl": "test perplexity",
    "loss": "test next-token cross-entropy",
}
"""Axis labels of the metrics a run can be chosen on (``eval.select``)."""
DETECTION_DETAILS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
"""The COCO figures a detection report lists beside the choosing one."""


def run_metric(runs: list[dict[str, Any]]) -> str:
    """The metric the runs are compared on (the one that chose their ``best.pt``: ``top1``, ``AP``
    for detection, or their ``eval.select``); one for all."""
    metrics = sorted({r["summary"].get("metric", "top1") for r in runs})
    if len(metrics) > 1:
        raise ValueError(
            f"the runs report different metrics {metrics} (other tasks or eval.select); report them separately"
        )
    return metrics[0]


def table(runs: list[dict[str, Any]]) -> str:
    """One row per run; the teacher's val / test metric as measured before its distillation;
    for detection also the last epoch's AP50, AP75, APs, APm, APl."""
    m = run_metric(runs)
    details = tuple(d for d in DETECTION_DETAILS if d != m) if m in DETECTION_DETAILS else ()
    rows = [
        f"| run | method | seed | epochs | teacher val / test {m} | best val {m} | test {m} at best val | "
        f"best test {m} | last test {m} | " + "".join(f"last test {d} | " for d in details) + "s / epoch |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(details) + "---|",
    ]
    for run in runs:
        s, t = run["summary"], run["teacher"]
        last = run["metrics"][-1] if run["metrics"] else {}
        teacher = f"{_fmt(t.get(f'val_{m}'))} / {_fmt(t.get(f'test_{m}'))}" if t else "-"
        rows.append(
            f"| {run['name']} | {s.get('method', '?')} | {s.get('seed', '?')} "
            f"| {s.get('epochs_run', len(run['metrics']))} | "
            f"{teacher} | {_fmt(s.get(f'best_val_{m}'))} | {_fmt(s.get(f'test_{m}_at_best_val'))} | "
            f"{_fmt(s.get(f'best_test_{m}'))} | {_fmt(s.get(f'last_test_{m}'))} | "
            + "".join(f"{_fmt(last.get(f'test_{d}'))} | " for d in details)
            + f"{_fmt(s.get('seconds_per_epoch'), 1)} |"
        )
    return "\n".join(rows)


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _curves(runs: list[dict[str, Any]], path: Path, key: str, label: str) -> Path | None:
    series = [
        (r["name"], [m["epoch"] + 1 for m in r["metrics"] if key in m], [m[key] for m in r["metrics"] if key in m])
        for r in runs
    ]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, x, y in series:
        ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _step_plot(runs: list[dict[str, Any]], path: Path, key: str, label: str, log: bool = False) -> Path | None:
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for run in runs:
        keys = sorted({k for row in run["steps"] for k in row if k == key or (key.endswith("/") and k.startswith(key))})
        for k in keys:
            points = [(row["step"], row[k]) for row in run["steps"] if k in row]
            if points:
                suffix = f" {k[len(key) :]}" if key.endswith("/") else ""
                ax.plot(*zip(*points), label=f"{run['name']}{suffix}")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
