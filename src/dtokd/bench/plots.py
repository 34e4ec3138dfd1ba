"""The bench's plots, per pair, from the rows :func:`~dtokd.bench.results.aggregate` computes:
the metric over epochs (mean ± standard deviation over seeds; a collapsed or diverged row is left
out and named), the first loss's coefficient over steps, the update length against the
reference's (where logged) and the metric against the time per epoch. Drawn with
:mod:`dtokd.report`'s :func:`~dtokd.report.pyplot` and written by its :func:`~dtokd.report.save_plot`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dtokd.bench.matrix import Matrix
from dtokd.bench.tables import metric_of
from dtokd.report import METRIC_LABELS, pyplot, save_plot
from dtokd.tasks.names import LOWER_IS_BETTER

Row = dict[str, Any]
"""A row of the results (one pair and method), as :func:`~dtokd.bench.results.aggregate` builds it."""


def results_plots(matrix: Matrix, rows: list[Row], out: Path) -> list[Path]:
    """Draw each pair's plots into ``out`` (``accuracy_<pair>.png``, ``weights_<pair>.png``,
    ``update_length_<pair>.png`` where a row logged the update length, ``cost_<pair>.png``) and
    return their paths, in that order, pair by pair; a pair without a row gets none."""
    m = metric_of(rows)
    label = METRIC_LABELS.get(m, f"test {m}")
    paths = []
    for pair in matrix.pairs:
        pair_rows = [r for r in rows if r["pair"] == pair]
        if not pair_rows:  # no cell of this pair has run yet: no empty plots (and no links to them)
            continue
        paths.append(_accuracy(pair, pair_rows, m, label, out))
        paths.append(_weights(pair, pair_rows, out))
        if any(r["update_ratio_curve"] for r in pair_rows):
            paths.append(_update_length(pair, pair_rows, out))
        paths.append(_cost(pair, pair_rows, m, label, matrix.reference, out))
    return paths


def _save(fig: Any, ax: Any, path: Path, xlabel: str, ylabel: str, title: str, legend: bool = True) -> Path:
    """:func:`~dtokd.report.save_plot` with a title, and a small two-column legend where a line is labelled."""
    labelled = legend and ax.get_legend_handles_labels()[0]  # no legend without a labelled line
    return save_plot(
        fig, ax, path, xlabel, ylabel, title=title, legend={"fontsize": 6, "ncol": 2} if labelled else None
    )


def _accuracy(pair: str, pair_rows: list[Row], m: str, label: str, out: Path) -> Path:
    """The metric's curve of each row that did not collapse, with its band of ± one standard deviation."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(pair_rows) <= 20:
        ax.set_prop_cycle(color=[plt.get_cmap("tab20")(k) for k in range(len(pair_rows))])
    shown = _plotted(pair_rows, m)
    for r in pair_rows:
        if r not in shown:
            continue
        x = r["curve_epochs"]
        ax.plot(x, r["curve"], label=r["method"])
        ax.fill_between(
            x,
            [mean - s for mean, s in zip(r["curve"], r["curve_std"])],
            [mean + s for mean, s in zip(r["curve"], r["curve_std"])],
            alpha=0.12,
        )
    if len(shown) < len(pair_rows):
        ax.text(
            0.01,
            0.01,
            "not shown (collapsed or diverged): " + ", ".join(r["method"] for r in pair_rows if r not in shown),
            transform=ax.transAxes,
            fontsize=6,
        )
    split_label = (
        label if not pair_rows or pair_rows[0]["curve_split"] == "test" else label.replace("test", "validation")
    )
    ylabel = f"{split_label}, mean ± std over seeds"
    return _save(fig, ax, out / f"accuracy_{pair}.png", "epoch", ylabel, pair)


def _plotted(rows: list[Row], metric: str) -> list[Row]:
    """The rows whose curve is drawn: all but the collapsed or diverged, whose last value is less
    than half the best (an accuracy), or more than twice the best (a perplexity or loss)."""
    curves = [r for r in rows if r["curve"]]
    if metric in LOWER_IS_BETTER:
        best = min(min(r["curve"]) for r in curves) if curves else math.inf
        return [r for r in curves if r["curve"][-1] < 2 * best]
    best = max((max(r["curve"]) for r in curves), default=100.0)
    return [r for r in curves if r["curve"][-1] > 0.5 * best]


def _weights(pair: str, pair_rows: list[Row], out: Path) -> Path:
    """The first loss's coefficient over steps (mean over seeds), one line per row that logged it."""
    ylabel = "coefficient on the first loss (distill), mean over seeds"
    title = f"{pair}: weights over training"
    return _over_steps(pair_rows, "weight_curve", out / f"weights_{pair}.png", ylabel, title, "symlog", linthresh=0.1)


def _update_length(pair: str, pair_rows: list[Row], out: Path) -> Path:
    """The update's length over the reference weights' at the same step (mean over seeds)."""
    ylabel = "update length / the reference's at the same step (mean over seeds)"
    title = f"{pair}: how long each step is against the reference weights"
    return _over_steps(pair_rows, "update_ratio_curve", out / f"update_length_{pair}.png", ylabel, title, "log")


def _over_steps(
    pair_rows: list[Row], key: str, path: Path, ylabel: str, title: str, scale: str, **options: Any
) -> Path:
    """A line per row that logged the step curve ``key`` (means over seeds), on the y scale
    ``scale`` (with ``options``): the first loss's coefficient, or the update length against the
    reference weights'."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for r in pair_rows:
        if r[key]:
            ax.plot(*zip(*r[key]), label=r["method"])
    ax.set_yscale(scale, **options)
    return _save(fig, ax, path, "step", ylabel, title)


def _cost(pair: str, pair_rows: list[Row], m: str, label: str, reference: str, out: Path) -> Path:
    """Each row's metric at the epoch chosen on validation (± its standard deviation) against its
    time per epoch over the reference's."""
    fig, ax = pyplot().subplots(figsize=(6, 4.5))
    for r in pair_rows:
        ax.errorbar(r["time_vs_reference"], r[f"test_{m}_at_best_val"], yerr=r[f"test_{m}_at_best_val_std"], fmt="o")
        ax.annotate(r["method"], (r["time_vs_reference"], r[f"test_{m}_at_best_val"]), fontsize=6)
    return _save(
        fig,
        ax,
        out / f"cost_{pair}.png",
        f"time per epoch / {reference}",
        f"{label} at best val",
        f"{pair}: accuracy against cost",
        legend=False,
    )
