"""What a bench invocation would do, said before it does it (``dtokd bench MATRIX --dry-run``):
every cell's configuration checked, then the teachers it would train, the offline teacher
outputs it would write, and each selected cell's state (finished, resumed from its checkpoint
after N epochs, to run, left to the grid's choice, skipped by it, or running in another process). Reads files only: it
trains, writes and creates nothing."""

from __future__ import annotations

import json
from pathlib import Path

from dtokd.bench.folders import cell_finished, cell_folder, shared_runs, teacher_outputs_folder
from dtokd.bench.folders import the_runs as _the_runs
from dtokd.bench.grid import grid_gate
from dtokd.bench.matrix import Cell, Matrix, check_cells, needs_teacher
from dtokd.data.teacher_outputs import MANIFEST
from dtokd.interrupts import folder_holder
from dtokd.train.records import read_jsonl


def plan(matrix: Matrix, out: Path, cells: list[Cell]) -> list[str]:
    """The lines that say what running ``cells`` of ``matrix`` into ``out`` would do (after
    :func:`~dtokd.bench.matrix.check_cells`, whose refusals it raises as a run would)."""
    check_cells(matrix)
    runs = _the_runs(cells, shared_runs(matrix))
    distilling = [cell for cell in runs if needs_teacher(matrix, *cell)]
    lines = [_teacher_line(matrix, out, pair) for pair in dict.fromkeys(cell[0] for cell in distilling)]
    outputs = {
        teacher_outputs_folder(out, matrix, pair, method): (pair, matrix.topk(method)) for pair, method, _ in distilling
    }
    for folder, (pair, k) in outputs.items():
        if folder is not None:
            state = (
                "written" if (folder / MANIFEST).is_file() else "to write (the teacher over the whole training split)"
            )
            lines.append(f"offline outputs of pair {pair}, top-{k}: {folder}: {state}")
    unfinished = [cell for cell in runs if not cell_finished(cell_folder(out, cell, {}))]
    counts: dict[str, int] = {}
    for cell in runs:
        state = _cell_state(matrix, out, cell, unfinished)
        counts[state.split(" (")[0]] = counts.get(state.split(" (")[0], 0) + 1
        lines.append(f"cell {' '.join(map(str, cell))}: {state}")
    lines.append("in all: " + ", ".join(f"{n} {state}" for state, n in counts.items()) + "; nothing was run")
    return lines


def _teacher_line(matrix: Matrix, out: Path, pair: str) -> str:
    given = matrix.pairs[pair]
    if given.checkpoint is not None:
        found = "" if Path(given.checkpoint).is_file() else " (missing: a run would stop here)"
        return f"teacher of pair {pair}: given, {given.checkpoint}{found}"
    folder = out / "teachers" / given.teacher
    if (folder / "summary.json").is_file():
        state = "trained"
    elif (folder / "checkpoint.pt").is_file():
        state = f"resumes after {len(read_jsonl(folder / 'metrics.jsonl'))} epoch(s)"
    else:
        state = "to train (seed 0, from teacher_config)"
    return f"teacher of pair {pair}: {folder}: {state}"


def _cell_state(matrix: Matrix, out: Path, cell: Cell, unfinished: list[Cell]) -> str:
    """finished / diverged / running / skipped / waits for the grid / resumes / to run."""
    folder = cell_folder(out, cell, {})
    holder = folder_holder(folder)
    if holder is not None:
        return f"running (pid {holder}: a run now would be refused for this cell)"
    if (folder / "diverged.json").is_file():
        return f"diverged ({json.loads((folder / 'diverged.json').read_text()).get('error', '')[:80]})"
    if cell_finished(folder):
        return "finished"
    gate, choice = grid_gate(matrix, out, cell, unfinished)
    if gate == "skip":
        return f"skipped (the grid chose {choice} on seed {matrix.seeds[0]})"
    if gate == "wait":
        return f"waits for the grid (runs if the grid chooses it on seed {matrix.seeds[0]})"
    if (folder / "checkpoint.pt").is_file():
        return f"resumes (after {len(read_jsonl(folder / 'metrics.jsonl'))} epoch(s))"
    return "to run"
