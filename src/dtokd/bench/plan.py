"""What a bench invocation would do, said before it does it (``dtokd bench MATRIX --dry-run``):
every cell's configuration checked, then the teachers it would train, the offline teacher
outputs it would write, and each selected cell's state (finished, diverged, skipped by the
grid's choice, running in another process, waiting for the grid, resumed from its checkpoint,
unable to resume with the configuration it would be given now, or to run), decided in the order
a run decides it. Reads files only: it trains, writes, locks and creates nothing."""

from __future__ import annotations

import json
from pathlib import Path

from dtokd.bench.folders import cell_finished, cell_folder, shared_runs, teacher_outputs_folder
from dtokd.bench.folders import the_runs as _the_runs
from dtokd.bench.grid import grid_gate
from dtokd.bench.matrix import Cell, Matrix, cell_config, check_cells, needs_teacher
from dtokd.bench.training import outputs_written, teacher_checkpoint
from dtokd.data.teacher_outputs import MANIFEST
from dtokd.interrupts import folder_holder
from dtokd.train.config import ConfigError
from dtokd.train.run_folder import config_for_resume


def plan(matrix: Matrix, out: Path, cells: list[Cell]) -> list[str]:
    """The lines that say what running ``cells`` of ``matrix`` into ``out`` would do (after
    :func:`~dtokd.bench.matrix.check_cells`, whose refusals it raises as a run would)."""
    check_cells(matrix)
    runs = _the_runs(cells, shared_runs(matrix))
    distilling = [cell for cell in runs if needs_teacher(matrix, *cell)]
    teachers: dict[str, list[str]] = {}  # a teacher's line -> the pairs that share it
    for pair in dict.fromkeys(cell[0] for cell in distilling):
        teachers.setdefault(_teacher_state(matrix, out, pair), []).append(pair)
    lines = [f"teacher of pair(s) {', '.join(pairs)}: {state}" for state, pairs in teachers.items()]
    outputs = {teacher_outputs_folder(out, matrix, p, m): (p, matrix.topk(m)) for p, m, _ in distilling}
    for folder, (pair, k) in outputs.items():
        if folder is not None:
            lines.append(f"offline outputs of pair {pair}, top-{k}: {folder}: {_outputs_state(folder / MANIFEST)}")
    unfinished = [cell for cell in runs if not cell_finished(cell_folder(out, cell, {}))]
    counts: dict[str, int] = {}
    for cell in runs:
        kind, detail = _cell_state(matrix, out, cell, unfinished)
        counts[kind] = counts.get(kind, 0) + 1
        lines.append(f"cell {' '.join(map(str, cell))}: {kind}{f' ({detail})' if detail else ''}")
    lines.append("in all: " + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + "; nothing was run")
    return lines


def _teacher_state(matrix: Matrix, out: Path, pair: str) -> str:
    given = matrix.pairs[pair]
    if given.checkpoint is not None:
        found = "" if Path(given.checkpoint).is_file() else " (missing: the cells that distil would fail)"
        return f"given, {given.checkpoint}{found}"
    folder = out / "teachers" / given.teacher
    if (folder / "summary.json").is_file():
        return f"{folder}: trained"
    holder = folder_holder(folder)
    if holder is not None:
        return f"{folder}: training in another process (pid {holder}): a run now would stop there"
    if (folder / "checkpoint.pt").is_file():
        return f"{folder}: resumes from its last checkpoint"
    return f"{folder}: to train (seed 0, from teacher_config)"


def _outputs_state(manifest: Path) -> str:
    if outputs_written(manifest):
        return "written"
    if manifest.is_file():
        return "of an older format: written again (the teacher over the whole training split)"
    return "to write (the teacher over the whole training split)"


def _cell_state(matrix: Matrix, out: Path, cell: Cell, unfinished: list[Cell]) -> tuple[str, str]:
    """The cell's state (finished, diverged, running, skipped, waits for the grid, resumes, to
    run) and what to say of it, in the order a run decides it."""
    folder = cell_folder(out, cell, {})
    if (folder / "diverged.json").is_file():
        return "diverged", _diverged_error(folder / "diverged.json")
    if cell_finished(folder):
        return "finished", ""
    gate, choice = grid_gate(matrix, out, cell, unfinished)
    if gate == "skip":
        return "skipped", f"the grid chose {choice} on seed {matrix.seeds[0]}"
    holder = folder_holder(folder)
    if holder is not None:
        return "running", f"pid {holder}: a run now would stop at this cell"
    if gate == "wait":
        return "waits for the grid", f"runs if the grid chooses it on seed {matrix.seeds[0]}"
    if (folder / "checkpoint.pt").is_file():
        return _resume_state(matrix, out, cell, folder)
    return "to run", ""


def _resume_state(matrix: Matrix, out: Path, cell: Cell, folder: Path) -> tuple[str, str]:
    """Whether the cell's saved run resumes with the configuration a run would give it now (the
    run's own check, :func:`~dtokd.train.run_folder.config_for_resume`)."""
    pair, method, seed = cell
    teacher = teacher_checkpoint(matrix, out, pair)
    config = cell_config(matrix, pair, method, seed, teacher, teacher_outputs_folder(out, matrix, pair, method))
    try:
        config_for_resume(folder, config)
    except (ConfigError, FileNotFoundError) as error:
        reason = str(error).split("the configuration given differs: ")[-1]  # the differences, where that is why
        return "cannot resume", f"a run would stop here: {reason}"
    return "resumes", "from its last checkpoint"


def _diverged_error(path: Path) -> str:
    """The error a diverged cell recorded (its first 80 characters), or why it cannot be read."""
    try:
        recorded = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return "diverged.json is not JSON"
    return str(recorded.get("error", ""))[:80] if isinstance(recorded, dict) else "diverged.json is not a mapping"
