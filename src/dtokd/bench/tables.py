"""``results.md``'s text: what the figures mean (commit, machine, seeds, reference, how pairs and
the grid's choice are compared), then one table row per (pair, method) from the rows
:func:`~dtokd.bench.results.aggregate` computes, then the plots' links. Numbers and the table
layout are :mod:`dtokd.report`'s (:func:`~dtokd.report.fmt`, :func:`~dtokd.report.markdown_table`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dtokd.bench.matrix import Matrix
from dtokd.report import fmt, markdown_table
from dtokd.train.records import git_commit, machine


def results_markdown(matrix: Matrix, rows: list[dict[str, Any]], plots: list[Path]) -> str:
    """The whole of ``results.md``: the notes, the table (a row per entry of ``rows``), the plots."""
    m = metric_of(rows)
    others = list(dict.fromkeys(x for r in rows for x in r["other_metrics"]))
    header = ["pair", "method", f"test {m} at best val", "paired vs ref. (n)", "paired vs tuned (n)"]
    header += [f"best test {m}", f"last test {m}"]
    header += [column for x in others for column in (f"test {x} at best val", f"paired {x} vs ref.", f"last test {x}")]
    header += ["epochs to ref. final", "s / epoch (min)", "time / ref.", "mean weights (on raw loss grads)"]
    header += ["conflict", "dominance", "step length / ref."]
    lines = [*_notes(matrix, rows, m, others), "", *markdown_table(header, (_cells(r, m, others) for r in rows))]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def metric_of(rows: list[dict[str, Any]]) -> str:
    """The metric of the matrix's runs (``top1``, or ``AP`` for detection)."""
    return rows[0]["metric"] if rows else "top1"


def _notes(matrix: Matrix, rows: list[dict[str, Any]], m: str, others: list[str]) -> list[str]:
    """The title and the bullet points above the table: where and how the figures were made."""
    return [
        f"# Accuracy benchmark: {matrix.name}",
        "",
        f"- commit `{git_commit()[:10]}`; machine: {machine()}",
        f"- seeds {matrix.seeds}; shared overrides: `{' '.join(matrix.base)}`; "
        f"run config `{Path(matrix.student_config).name}`",
        f"- reference for time ratios and convergence: `{matrix.reference}`; "
        "accuracies: mean ± standard deviation over seeds; "
        "time: the fastest seed's mean seconds per epoch (other load on the machine only adds time)",
        "- paired: the mean ± standard deviation over seeds of (method - reference) in test "
        f"{m} at best val, same seed = same initialisation and batches (n: seeds both finished with the same "
        "teacher); paired vs "
        f"tuned: the same against the grid's choice on seed {matrix.seeds[0]}'s validation "
        "(marked tuned on val; it and the reference alone run on the other seeds); epochs to "
        f"ref. final: on the {rows[0]['curve_split'] if rows else 'test'} curve; step length / ref.: the "
        "geometric mean over logged steps of the update's length over the reference weights' at the same step",
        *(
            [
                f"- also reported: {', '.join(others)} on the test split at the epoch chosen on validation {m} and "
                "at the last, and its paired difference (method - reference) over the same seeds (for a perplexity, "
                "lower is better)"
            ]
            if others
            else []
        ),
    ]


def _cells(r: dict[str, Any], m: str, others: list[str]) -> list[str]:
    """One row's table cells, in the header's order."""
    weights = ", ".join(f"{k.split('/', 1)[1]} {v:.3g}" for k, v in r.items() if k.startswith("loss_weight/"))
    return [
        r["pair"],
        f"{r['method']}{_diverged(r)}",
        _fmt(r[f"test_{m}_at_best_val"], r[f"test_{m}_at_best_val_std"]),
        f"{_fmt(r.get('paired_vs_reference'), r.get('paired_vs_reference_std'))} ({r.get('paired_seeds', 0)})",
        f"{_fmt(r.get('paired_vs_tuned'), r.get('paired_vs_tuned_std'))} ({r.get('paired_tuned_seeds', 0)})",
        _fmt(r[f"best_test_{m}"], r[f"best_test_{m}_std"]),
        _fmt(r[f"last_test_{m}"], r[f"last_test_{m}_std"]),
        *(cell for x in others for cell in _other_metric_cells(r, x)),
        f"{r['epochs_to_reference_final'] or '-'}",
        _fmt(r["seconds_per_epoch_min"], None, 1),
        _fmt(r["time_vs_reference"], None),
        weights or "-",
        _fmt(r["conflict"], None, 3),
        _fmt(r["dominance"], None, 3),
        _fmt(r["update_ratio"], None, 3),
    ]


def _other_metric_cells(row: dict[str, Any], metric: str) -> list[str]:
    """The cells of a metric reported beside the choosing one: at the chosen epoch, paired
    against the reference, and at the last epoch (``-`` where the row lacks it)."""
    keys = (f"test_{metric}_at_best_val", f"paired_{metric}_vs_reference", f"last_test_{metric}")
    return [_fmt(row.get(key), row.get(key + "_std")) for key in keys]


def _fmt(mean: float | None, std: float | None = None, digits: int = 2) -> str:
    """:func:`~dtokd.report.fmt`, where NaN (a mean over no seeds) is no value either."""
    return fmt(None if isinstance(mean, float) and math.isnan(mean) else mean, std, digits)


def _diverged(row: dict[str, Any]) -> str:
    """What the method's name says of its diverged seeds (nothing where none diverged)."""
    if not row["diverged"]:
        return ""
    return f" (**{row['diverged']} of {row['diverged'] + row['seeds']} seeds diverged**; stats over the rest)"
