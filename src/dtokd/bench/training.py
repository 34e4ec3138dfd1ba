"""Training in this process: one cell (:func:`run_cell`, resumed from its checkpoint; a run whose
losses become non-finite recorded as ``diverged.json``), the pairs' teachers
(:func:`ensure_teachers`, trained once per teacher name into ``OUT/teachers/<name>``, and their
offline outputs written once per pair where the matrix asks), and a
list of cells one after another (:func:`run_here`). The parallel bench runs each cell as
``dtokd bench MATRIX --cell ...``, which is :func:`run_cell` in a process of its own."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from dtokd.balancing import NonFiniteStepError
from dtokd.bench.folders import cell_finished, shared_runs, teacher_outputs_folder
from dtokd.bench.grid import grid_gate, say_skipped
from dtokd.bench.matrix import Cell, Matrix, cell_config, needs_teacher
from dtokd.data.teacher_outputs import FORMAT, MANIFEST
from dtokd.train import load_config, train
from dtokd.train.offline_outputs import write_run_teacher_outputs
from dtokd.train.records import read_jsonl


def run_cell(
    matrix: Matrix, out: Path, pair: str, method: str, seed: int, teacher: Path | None = None, *, progress: bool = False
) -> None:
    """One cell (resumed from its checkpoint if one exists); a run whose losses become
    non-finite is recorded as diverged (``diverged.json``) rather than failing the matrix."""
    for name, value, allowed in (
        ("pair", pair, matrix.pairs),
        ("method", method, matrix.methods),
        ("seed", seed, matrix.seeds),
    ):
        if value not in allowed:
            raise ValueError(f"{name} {value!r} is not in the matrix; allowed: {list(allowed)}")
    pair, method, seed = shared_runs(matrix).get((pair, method, seed), (pair, method, seed))
    folder = out / pair / method / f"seed{seed}"
    if cell_finished(folder):
        return
    given = matrix.pairs[pair]
    teacher = teacher or teacher_checkpoint(matrix, out, pair)
    if needs_teacher(matrix, pair, method, seed) and not teacher.is_file():
        raise FileNotFoundError(
            f"teacher {given.teacher!r} of pair {pair!r} is not trained yet ({teacher}); "
            "run the matrix without --cell first"
        )
    outputs = teacher_outputs_folder(out, matrix, pair, method)
    config = cell_config(matrix, pair, method, seed, teacher, outputs)
    if config.teacher.outputs is not None and not (Path(config.teacher.outputs) / MANIFEST).is_file():
        raise FileNotFoundError(
            f"the offline outputs of pair {pair!r}'s teacher are not written yet ({outputs}); "
            "run the matrix without --cell first"
        )
    try:  # the bench owns its cell folders: a cell killed before its first checkpoint starts afresh
        train(
            config, folder, resume=(folder / "checkpoint.pt").is_file(), force=True, progress=progress, verbose=progress
        )
    except NonFiniteStepError as error:
        folder.mkdir(parents=True, exist_ok=True)
        epochs = len(read_jsonl(folder / "metrics.jsonl"))
        (folder / "diverged.json").write_text(json.dumps({"error": str(error), "epochs_completed": epochs}) + "\n")
        print(f"[bench] {pair} {method} seed {seed} diverged in epoch {epochs + 1}: {error}", flush=True)


def teacher_checkpoint(matrix: Matrix, out: Path, pair: str) -> Path:
    """The checkpoint ``pair``'s cells distil from: the pair's given one, else its teacher's
    ``best.pt`` in ``OUT/teachers/<name>`` (where :func:`ensure_teachers` trains it)."""
    given = matrix.pairs[pair]
    return Path(given.checkpoint or out / "teachers" / given.teacher / "best.pt")


def ensure_teachers(matrix: Matrix, out: Path, cells: list[Cell], progress: bool) -> dict[str, Path]:
    """The teacher checkpoint of every pair that one of ``cells`` distils from (a cell without a
    teacher waits for none): the pair's given checkpoint, else its teacher trained here (seed 0,
    from ``teacher_config``) into ``OUT/teachers/<name>`` unless it already has been; with
    ``teacher_topk``, the pair's offline outputs written too, once per ``k`` (:func:`_ensure_outputs`)."""
    used = [cell for cell in cells if needs_teacher(matrix, *cell)]
    teachers = {
        name: Path(pair.checkpoint)
        if pair.checkpoint is not None
        else _ensure_teacher(matrix, out / "teachers" / pair.teacher, pair.teacher, progress)
        for name, pair in matrix.pairs.items()
        if name in {cell[0] for cell in used}
    }
    for pair, method, seed in used:
        _ensure_outputs(matrix, out, pair, method, teachers[pair])
    return teachers


def _ensure_outputs(matrix: Matrix, out: Path, pair: str, method: str, teacher: Path) -> None:
    """The pair's teacher run once over the whole training split (``data.limit_train=null``, so
    that every seed's subset is among the blocks) of ``method``'s first-seed cell, its top-k (the
    method's ``k``) written to the pair's outputs folder for that ``k`` unless a finished write of
    this format is there (an unfinished one, or one of an older format, is written again)."""
    folder, k = teacher_outputs_folder(out, matrix, pair, method), matrix.topk(method)
    if folder is None or k is None or outputs_written(folder / MANIFEST):
        return
    config = cell_config(matrix, pair, method, matrix.seeds[0], teacher)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, limit_train=None))
    print(f"[bench] writing the top-{k} outputs of pair {pair}'s teacher into {folder}", flush=True)
    write_run_teacher_outputs(config, folder, k=k, dtype="float16", batch_size=None, overwrite=True)


def outputs_written(manifest: Path) -> bool:
    """Whether ``manifest`` is there and of this dtokd's format (a damaged one is the reader's to refuse)."""
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except ValueError:
        return True


def _ensure_teacher(matrix: Matrix, folder: Path, name: str, progress: bool) -> Path:
    if not (folder / "summary.json").is_file():
        config = load_config(matrix.teacher_config, [f"student.name={name}", f"name=teacher-{name}", "seed=0"])
        print(f"[bench] training teacher {name} into {folder}", flush=True)
        train(
            config, folder, resume=(folder / "checkpoint.pt").is_file(), force=True, progress=progress, verbose=progress
        )
    return folder / "best.pt"


def run_here(matrix: Matrix, out: Path, pending: list[Cell], teachers: dict[str, Path], *, progress: bool) -> int:
    """Run ``pending`` in this process, one after another, in order (pair by pair, seed by seed,
    so that this invocation's first-seed cells have run before a later seed's :func:`grid_gate`),
    skipping a grid member the grid did not choose; returns how many ran."""
    began = time.perf_counter()
    ran = 0
    for k, (pair, method, seed) in enumerate(pending):
        gate, choice = grid_gate(matrix, out, (pair, method, seed), ())
        if gate == "skip":  # chosen while this invocation ran the first seed
            say_skipped(matrix, (pair, method, seed), str(choice))
            continue
        elapsed = time.perf_counter() - began
        print(
            f"[bench] {k + 1}/{len(pending)} to run: {pair} {method} seed {seed} (elapsed {elapsed / 60:.1f} min)",
            flush=True,
        )
        run_cell(matrix, out, pair, method, seed, teachers.get(pair), progress=progress)
        ran += 1
    return ran
