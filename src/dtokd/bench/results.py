"""The aggregate of a matrix (:func:`aggregate`): a row per (pair, method) with a finished or a
diverged cell, its statistics over seeds (:mod:`dtokd.bench.stats`) compared with the reference's
and the grid's choice, written as ``results.csv`` (the scalar figures), ``results.md``
(:mod:`dtokd.bench.tables`) and the plots (:mod:`dtokd.bench.plots`) into the output folder.
Reads the cells' records; runs nothing."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from dtokd.bench.folders import cell_folder, shared_runs
from dtokd.bench.grid import grid_choice
from dtokd.bench.matrix import Cell, Matrix
from dtokd.bench.plots import results_plots
from dtokd.bench.stats import cell_statistics, paired_differences
from dtokd.bench.tables import results_markdown
from dtokd.tasks.names import LOWER_IS_BETTER

SERIES = frozenset(
    {"curve", "curve_std", "curve_epochs", "weight_curve", "weight_curve_name", "update_ratio_curve", "other_metrics"}
)
"""The row keys that hold lists (curves over epochs or steps, the other metrics' names): plotted
or read by the table, not CSV values."""


def aggregate(matrix: Matrix, out: Path) -> Path:
    """Write ``results.csv``, ``results.md`` and the plots into ``out`` from every cell that has
    ended there so far; returns the markdown path."""
    shared = shared_runs(matrix)
    rows = [row for pair in matrix.pairs for row in _pair_rows(matrix, out, pair, shared)]
    csv_path, md_path = out / "results.csv", out / "results.md"
    _write_csv(rows, csv_path)
    plots = results_plots(matrix, rows, out)
    md_path.write_text(results_markdown(matrix, rows, plots))
    return md_path


def _pair_rows(matrix: Matrix, out: Path, pair: str, shared: dict[Cell, Cell]) -> list[dict[str, Any]]:
    """The rows of one pair, in the matrix's order of methods: a method none of whose cells has
    ended has none; one whose every cell diverged has a row without figures."""
    folders = {m: [cell_folder(out, (pair, m, s), shared) for s in matrix.seeds] for m in matrix.methods}
    cells = {m: cell_statistics(folders[m]) for m in matrix.methods}
    reference = cells[matrix.reference]
    target = reference["curve"][-1] if reference["curve"] else math.nan
    tuned = grid_choice(matrix, out / pair)
    rows = []
    for method, cell in cells.items():
        if not cell["seeds"] and not cell["diverged"]:
            continue
        reach = next(
            (epoch for epoch, value in zip(cell["curve_epochs"], cell["curve"]) if _reaches(value, target, cell)),
            None,
        )
        run_in = _run_in(pair, folders[method])
        if not cell["seeds"]:
            rows.append(
                {
                    "pair": pair,
                    "method": method + run_in,
                    **cell,
                    "epochs_to_reference_final": None,
                    "time_vs_reference": math.nan,
                }
            )
            continue
        versus_reference = list(zip(folders[method], folders[matrix.reference]))
        versus_tuned = list(zip(folders[method], folders[tuned])) if tuned is not None else None
        for other in cell["other_metrics"]:
            difference = paired_differences(versus_reference, other)
            cell[f"paired_{other}_vs_reference"], cell[f"paired_{other}_vs_reference_std"] = difference[:2]
        method_name = method + (" (tuned on val)" if method == tuned else "") + run_in
        rows.append(
            {"pair": pair, "method": method_name, **_compared(cell, reach, reference, versus_reference, versus_tuned)}
        )
    return rows


def _compared(
    cell: dict[str, Any],
    reach: int | None,
    reference: dict[str, Any],
    versus_reference: list[tuple[Path, Path]],
    versus_tuned: list[tuple[Path, Path]] | None,
) -> dict[str, Any]:
    """A finished method's figures (``cell``) and their comparisons: epochs to the reference's
    final value (``reach``), the time per epoch over the reference's, the paired differences
    against the reference and against the grid's choice (seed by seed: ``versus_*``)."""
    paired = paired_differences(versus_reference, cell["metric"])
    tuned = paired_differences(versus_tuned, cell["metric"]) if versus_tuned is not None else (None, None, 0)
    return {
        **cell,
        "epochs_to_reference_final": reach,
        "time_vs_reference": cell["seconds_per_epoch_min"] / reference["seconds_per_epoch_min"],
        "paired_vs_reference": paired[0],
        "paired_vs_reference_std": paired[1],
        "paired_seeds": paired[2],
        "paired_vs_tuned": tuned[0],
        "paired_vs_tuned_std": tuned[1],
        "paired_tuned_seeds": tuned[2],
    }


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """``rows``' scalar figures as CSV: the first row's keys first, then any other row's, each
    group in alphabetical order."""
    scalar_keys = [k for k in rows[0] if k not in SERIES] if rows else []
    all_keys = sorted({k for r in rows for k in r if k not in SERIES}, key=lambda k: (k not in scalar_keys, k))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=all_keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in all_keys})


def _reaches(value: float, target: float, cell: dict[str, Any]) -> bool:
    """Whether a curve's ``value`` is as good as ``target`` (as high, or as low for a perplexity or loss)."""
    return value <= target if cell["metric"] in LOWER_IS_BETTER else value >= target


def _run_in(pair: str, folders: list[Path]) -> str:
    """`` (run in <pair>)`` for a row whose runs are another pair's (:func:`~dtokd.bench.folders.shared_runs`)."""
    sources = sorted({f.parent.parent.name for f in folders} - {pair})
    return f" (run in {', '.join(sources)})" if sources else ""
