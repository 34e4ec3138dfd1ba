"""Where a cell's run lives and whether it has ended: ``OUT/<pair>/<method>/seed<k>``, finished
once it holds ``summary.json`` (or ``diverged.json``); a cell without a teacher whose
configuration is an earlier pair's is that pair's run (:func:`shared_runs`), read from that
pair's folder (:func:`cell_folder`); a pair's offline teacher outputs live in
``OUT/teacher-outputs`` (:func:`teacher_outputs_folder`)."""

from __future__ import annotations

import json
from pathlib import Path

from dtokd.bench.matrix import Cell, Matrix, cell_config
from dtokd.train.config import to_dict


def teacher_outputs_folder(out: Path, matrix: Matrix, pair: str, method: str) -> Path | None:
    """Where the offline teacher outputs ``method``'s cells of ``pair`` read live
    (``OUT/teacher-outputs/<pair>-top<k>``, shared by every method at that ``k``), or None for a
    method that runs its teacher live (``Matrix.topk``)."""
    k = matrix.topk(method)
    return None if k is None else out / "teacher-outputs" / f"{pair}-top{k}"


def cell_finished(folder: Path) -> bool:
    """Whether the cell in ``folder`` has ended: its summary written, or recorded as diverged."""
    return (folder / "summary.json").is_file() or (folder / "diverged.json").is_file()


def shared_runs(matrix: Matrix) -> dict[Cell, Cell]:
    """The cells that are another pair's run: a cell without a teacher whose configuration, apart
    from the teacher section, equals the same method and seed's in an earlier pair maps to the
    first such pair's cell (the student alone of two pairs with one student is one run)."""
    shared: dict[Cell, Cell] = {}
    for method in matrix.methods:
        for seed in matrix.seeds:
            first: dict[str, str] = {}  # the configuration without its teacher -> its first pair
            for pair in matrix.pairs:
                config = to_dict(cell_config(matrix, pair, method, seed, "teacher.pt"))
                if config["teacher"]["name"] is not None:
                    continue
                identity = json.dumps({k: v for k, v in config.items() if k != "teacher"}, sort_keys=True, default=str)
                source = first.setdefault(identity, pair)
                if source != pair:
                    shared[(pair, method, seed)] = (source, method, seed)
    return shared


def the_runs(cells: list[Cell], shared: dict[Cell, Cell]) -> list[Cell]:
    """``cells`` with each shared one replaced by the run it is (said once), in order, without repeats."""
    for cell in cells:
        if cell in shared:
            print(
                f"[bench] {' '.join(map(str, cell))} is the run of pair {shared[cell][0]!r} (no teacher, "
                "the same configuration): it runs there once",
                flush=True,
            )
    return list(dict.fromkeys(shared.get(cell, cell) for cell in cells))


def cell_folder(out: Path, cell: Cell, shared: dict[Cell, Cell]) -> Path:
    """Where a cell's run lives (its own folder, or the shared run's: :func:`shared_runs`)."""
    pair, method, seed = shared.get(cell, cell)
    return out / pair / method / f"seed{seed}"
