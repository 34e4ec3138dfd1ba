"""The grid: the methods named with the matrix's ``grid_prefix``, and the reference, are one
hyperparameter search. Its choice is the member with the best validation score on the first seed
(:func:`grid_choice`, read from the finished cells' summaries), and it gates the other members'
later seeds (:func:`grid_gate`: run, skip, or wait for the first seed)."""

from __future__ import annotations

import json
from collections.abc import Container
from pathlib import Path

from dtokd.bench.matrix import Cell, Matrix
from dtokd.tasks.names import LOWER_IS_BETTER


def grid_members(matrix: Matrix) -> list[str]:
    """The methods of the matrix's grid: those named with ``grid_prefix``, and the reference."""
    if not matrix.grid_prefix:
        return []
    return [m for m in matrix.methods if m.startswith(matrix.grid_prefix) or m == matrix.reference]


def grid_choice(matrix: Matrix, pair_folder: Path) -> str | None:
    """The grid member with the best validation score on the first seed (the highest, the lowest
    for a perplexity or loss), once every member's first-seed cell has finished (a diverged one
    cannot be chosen; ties go to the first listed); ``None`` before that, or for a grid of fewer
    than two members."""
    members = grid_members(matrix)
    if len(members) < 2:
        return None
    scores: dict[str, float] = {}
    for method in members:
        folder = pair_folder / method / f"seed{matrix.seeds[0]}"
        if (folder / "diverged.json").is_file():
            continue
        if not (folder / "summary.json").is_file():
            return None
        summary = json.loads((folder / "summary.json").read_text())
        score = summary.get(f"best_val_{summary['metric']}")
        if score is not None:
            scores[method] = -score if summary["metric"] in LOWER_IS_BETTER else score
    return max(scores, key=lambda m: scores[m]) if scores else None


def grid_gate(matrix: Matrix, out: Path, cell: Cell, unfinished: Container[Cell]) -> tuple[str, str | None]:
    """Whether ``cell`` runs now: ``("run", None)``; ``("skip", choice)`` for a grid member the
    first seed did not choose (see :mod:`dtokd.bench`); ``("wait", None)`` while the choice is open
    and first-seed grid cells of its pair are among ``unfinished`` (this invocation's queued or
    running cells), so that cells run in parallel are the cells run one at a time."""
    pair, method, seed = cell
    first = matrix.seeds[0]
    if matrix.grid_all_seeds or seed == first or method == matrix.reference or method not in grid_members(matrix):
        return "run", None
    choice = grid_choice(matrix, out / pair)
    if choice is not None:
        return ("run", None) if choice == method else ("skip", choice)
    if any((pair, m, first) in unfinished for m in grid_members(matrix)):
        return "wait", None
    return "run", None


def say_skipped(matrix: Matrix, cell: Cell, choice: str) -> None:
    """Say in the log that ``cell`` does not run: the grid chose ``choice``."""
    pair, method, seed = cell
    print(
        f"[bench] skipped {pair} {method} seed {seed}: the {matrix.grid_prefix!r} grid chose {choice} "
        f"on seed {matrix.seeds[0]} (grid_all_seeds: true runs every member on every seed)",
        flush=True,
    )
