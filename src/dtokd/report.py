"""Plots and tables from run folders: accuracy and loss curves, the balancer's weights, conflict
and dominance over training (PNG), and a markdown summary with several runs side by side.

Also the pieces every table and plot of the package is made of, which the bench's results
(:mod:`dtokd.bench`) use too: a number as a table shows it (:func:`fmt`), a markdown table
(:func:`markdown_table`), the metrics' axis labels (:data:`METRIC_LABELS`), matplotlib drawing
into files (:func:`pyplot`, imported when a plot is first drawn) and a labelled plot written to
its file (:func:`save_plot`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from dtokd.train.config import Config, load_config
from dtokd.train.loop import summarize
from dtokd.train.records import read_jsonl


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
    header = ["run", "method", "seed", "epochs", f"teacher val / test {m}", f"best val {m}", f"test {m} at best val"]
    header += [f"best test {m}", f"last test {m}", *(f"last test {d}" for d in details), "s / epoch"]
    rows = []
    for run in runs:
        s, t = run["summary"], run["teacher"]
        last = run["metrics"][-1] if run["metrics"] else {}
        teacher = f"{fmt(t.get(f'val_{m}'))} / {fmt(t.get(f'test_{m}'))}" if t else "-"
        rows.append(
            [
                run["name"],
                str(s.get("method", "?")),
                str(s.get("seed", "?")),
                str(s.get("epochs_run", len(run["metrics"]))),
                teacher,
                *(
                    fmt(s.get(key))
                    for key in (f"best_val_{m}", f"test_{m}_at_best_val", f"best_test_{m}", f"last_test_{m}")
                ),
                *(fmt(last.get(f"test_{d}")) for d in details),
                fmt(s.get("seconds_per_epoch"), digits=1),
            ]
        )
    return "\n".join(markdown_table(header, rows))


def fmt(value: Any, std: float | None = None, digits: int = 2) -> str:
    """A number as a table shows it: ``value`` to ``digits`` decimal places, with ``± std`` where
    a standard deviation is given; ``-`` where there is no value (``None``)."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: ``| a | b |`` for the header, its rule, and each row."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cells) + " |"

    return [line(header), "|---" * len(header) + "|", *(line(row) for row in rows)]


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` drawing into files (the Agg backend, no window), imported on first use
    so that importing this module, or the bench, does not load matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plot(
    fig: Any,
    ax: Any,
    path: Path,
    xlabel: str,
    ylabel: str,
    *,
    title: str | None = None,
    legend: dict[str, Any] | None = None,
) -> Path:
    """Label ``ax`` (axes, then ``title`` where given), draw its grid and, where ``legend`` is
    given, its legend with those options; write ``fig`` to ``path`` (PNG, 110 dpi), close it and
    return ``path``."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend is not None:
        ax.legend(**legend)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def _curves(runs: list[dict[str, Any]], path: Path, key: str, label: str) -> Path | None:
    series = [
        (r["name"], [m["epoch"] + 1 for m in r["metrics"] if key in m], [m[key] for m in r["metrics"] if key in m])
        for r in runs
    ]
    series = [s for s in series if s[1]]
    if not series:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for name, x, y in series:
        ax.plot(x, y, marker="o", label=name)
    return save_plot(fig, ax, path, "epoch", label, legend={})


def _step_plot(runs: list[dict[str, Any]], path: Path, key: str, label: str, log: bool = False) -> Path | None:
    plt = pyplot()
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
    return save_plot(fig, ax, path, "step", label, legend={"fontsize": 7})
