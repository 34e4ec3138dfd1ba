"""Accuracy benchmark: a matrix of (teacher -> student pair) x (method) x (seed) from one config.

Config (YAML)::

    name: fmnist-matrix
    seeds: [0, 1, 2]
    base: [epochs=8, data.limit_train=20000, ...]          # overrides shared by every run
    student_config: configs/fmnist_distill_mlp.yaml         # the run config the overrides apply to
    teacher_config: configs/fmnist_teacher.yaml             # how a missing teacher is trained
    pairs:
      cnn-mlp: {teacher: cnn, student: mlp}
      r56-r20: {teacher: resnet56, student: resnet20, checkpoint: ../shared/data/teachers/cifar10_resnet56.pth,
                overrides: [teacher.key_map=cifar-resnet-chenyaofo]}   # overrides: this pair's runs only
    methods:                                                # name -> overrides
      student-alone: [teacher.name=null, teacher.checkpoint=null, "losses={task: {type: ce}}", balancer.method=fixed]
      kd-fixed: [balancer.method=fixed, "balancer.options={weights: {distill: 0.9, task: 0.1}}"]
    reference: kd-fixed                                     # the baseline for time ratios and convergence
    grid_prefix: kd-grid                                    # methods tuned on the validation split
    grid_all_seeds: false                                   # true: every grid member on every seed

Relative ``student_config`` / ``teacher_config`` / ``checkpoint`` paths are read from the
repository root when the matrix file lives in ``configs/``, else from the current directory. A
pair with a ``checkpoint`` uses that teacher as it is (its ``key_map`` and ``normalize`` come
from the student config); the others get a teacher trained from ``teacher_config``.

Runs go to ``OUT/<pair>/<method>/seed<k>``, pair by pair, seed by seed, in the order the
methods are listed (so that a partial matrix holds every method for its first seeds); a finished run
(``summary.json``) is skipped and a killed one resumed, so rerunning the command finishes a partial
matrix. A run without a teacher (the student alone) is the same run in every pair whose cell has
the same configuration apart from the teacher: it runs once, in the first such pair, and the
others' tables read it (marked "run in <pair>").

**The grid** (``grid_prefix``): the methods whose names start with it, and the reference, are
one hyperparameter search (e.g. fixed KD's alpha). The first seed chooses: the member with the
best validation score on ``seeds[0]`` (once every member's first-seed cell has finished; a
diverged member cannot be chosen) is marked "(tuned on val)", and only it and the reference run
on the other seeds (``grid_all_seeds: true`` runs every member on every seed); a skipped cell
is said in the log. Each row is also compared, seed by seed, with the chosen member
(``paired_vs_tuned``). ``--pairs`` / ``--methods`` / ``--seeds`` run only some cells first (the aggregate covers
every finished cell). ``--parallel N`` runs N cells at once, each in its own process. A run whose losses
become NaN/inf is recorded as diverged (``diverged.json``) and reported as such, not retried. Teachers are trained
once per teacher name (seed 0) into ``OUT/teachers/<name>``. The aggregate is written as
``results.md`` / ``results.csv`` with plots next to them.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from dtokd.balancing import NonFiniteStepError
from dtokd.interrupts import Interrupted, StopRequest, deferred_stop
from dtokd.train import load_config, train
from dtokd.train.config import LOWER_IS_BETTER, ConfigError, from_dict, to_dict
from dtokd.train.records import git_commit, machine, read_jsonl

Cell = tuple[str, str, int]
"""A cell of a matrix: (pair, method, seed)."""
RunningCell = tuple[Cell, "subprocess.Popen[bytes]", IO[str]]
"""A cell's process and the log file it writes."""


@dataclass(frozen=True)
class Pair:
    """A teacher -> student pair of a matrix: the model names, the teacher's checkpoint when it
    is given rather than trained by the bench (relative to the project, like the configs), and
    the pair's own overrides."""

    teacher: str
    student: str
    checkpoint: str | None = None
    overrides: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Matrix:
    """A matrix file (see the module notes), read with the configuration machinery: unknown or
    missing keys and ill-typed values are errors naming the key."""

    name: str
    seeds: list[int]
    pairs: dict[str, Pair]
    methods: dict[str, list[str]]
    student_config: str
    teacher_config: str
    reference: str
    base: list[str] = field(default_factory=list)
    grid_prefix: str | None = None
    grid_all_seeds: bool = False


def load_matrix(path: str | Path) -> Matrix:
    """The matrix in ``path``, checked before anything runs; config paths and given teacher
    checkpoints resolved against the project (the folder above ``configs/``, else the
    working directory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"matrix file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a valid YAML matrix ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        keys = [f.name for f in dataclasses.fields(Matrix)]
        raise ValueError(
            f"{path}: a matrix is a mapping with keys {keys}; the file holds "
            f"{'nothing' if raw is None else type(raw).__name__}"
        )
    try:
        matrix = from_dict(Matrix, raw, "")
    except ConfigError as error:
        raise ValueError(f"{path}: {error}") from None
    if not matrix.seeds:
        raise ValueError(f"{path}: seeds must be a non-empty list of integers, got {matrix.seeds!r}")
    if len(set(matrix.seeds)) != len(matrix.seeds):
        raise ValueError(f"{path}: seeds {matrix.seeds} repeat a seed")
    for key in ("pairs", "methods"):
        if not getattr(matrix, key):
            raise ValueError(f"{path}: {key} must be a non-empty mapping name -> ..., got {raw[key]!r}")
    if matrix.reference not in matrix.methods:
        raise ValueError(f"{path}: reference {matrix.reference!r} is not one of the methods {list(matrix.methods)}")
    root = path.parent.parent if path.parent.name == "configs" else Path.cwd()
    pairs = {
        name: dataclasses.replace(pair, checkpoint=None if pair.checkpoint is None else str(root / pair.checkpoint))
        for name, pair in matrix.pairs.items()
    }
    return dataclasses.replace(
        matrix,
        pairs=pairs,
        student_config=str(root / matrix.student_config),
        teacher_config=str(root / matrix.teacher_config),
    )


class CellsFailed(RuntimeError):
    """Some cells of a parallel run failed (each one's output is in its ``bench.log``)."""


STOP_GRACE_SECONDS = 60.0
"""How long a parallel bench waits, in all, for its cells to stop after a stop signal before it
kills the rest (``--stop-grace``)."""


def select_cells(
    matrix: Matrix, *, pairs: list[str] | None = None, methods: list[str] | None = None, seeds: list[int] | None = None
) -> list[tuple[str, str, int]]:
    """The cells to run, pair by pair, seed by seed, in the matrix's order of methods (a partial
    matrix is a whole one over fewer seeds); ``pairs`` / ``methods`` / ``seeds`` keep only those
    (``None``: all), so that the cells a question needs first can run before the rest. A name
    that is not in the matrix is refused, naming what it holds."""
    chosen = {}
    for name, given, known in (
        ("pairs", pairs, list(matrix.pairs)),
        ("methods", methods, list(matrix.methods)),
        ("seeds", seeds, matrix.seeds),
    ):
        unknown = [v for v in given or [] if v not in known]
        if unknown:
            raise ValueError(f"--{name} {' '.join(map(str, unknown))}: not in the matrix, which has {known}")
        chosen[name] = set(given) if given else set(known)
    return [
        (pair, method, seed)
        for pair in matrix.pairs
        for seed in matrix.seeds
        for method in matrix.methods
        if pair in chosen["pairs"] and method in chosen["methods"] and seed in chosen["seeds"]
    ]


def run_matrix(
    matrix: Matrix,
    out: Path,
    *,
    progress: bool = False,
    parallel: int = 1,
    matrix_path: Path | None = None,
    cells: list[Cell] | None = None,
    stop_grace: float = STOP_GRACE_SECONDS,
) -> Path:
    """Run (or finish) every cell (or only ``cells``, see :func:`select_cells`), then aggregate
    whatever has finished; returns the markdown results path.

    ``parallel``: how many cells run at once, each in its own process (``dtokd bench MATRIX
    --cell PAIR METHOD SEED``, output in the cell's ``bench.log``; needs ``matrix_path``), on
    the same device: one small run leaves most of a GPU idle. The teachers of the cells that
    distil are trained first, one at a time; cells without a teacher need none. Each invocation
    appends its throughput (cells per minute) to ``timing.jsonl``.
    """
    if not isinstance(parallel, int) or parallel < 1:
        raise ValueError(f"parallel={parallel!r} must be a positive integer")
    if not (isinstance(stop_grace, (int, float)) and math.isfinite(stop_grace) and stop_grace > 0):
        raise ValueError(f"--stop-grace {stop_grace!r} must be a positive number of seconds")
    if parallel > 1 and matrix_path is None:
        raise ValueError("parallel > 1 runs each cell as 'dtokd bench MATRIX --cell ...' and needs matrix_path")
    check_cells(matrix)
    out.mkdir(parents=True, exist_ok=True)
    shared = shared_runs(matrix)
    cells = _the_runs(select_cells(matrix) if cells is None else cells, shared)
    used = {cell[0] for cell in cells if needs_teacher(matrix, *cell)}  # a teacher-free cell waits for none
    teachers = {
        name: Path(pair.checkpoint)
        if pair.checkpoint is not None
        else _ensure_teacher(matrix, out / "teachers" / pair.teacher, pair.teacher, progress)
        for name, pair in matrix.pairs.items()
        if name in used
    }
    pending = [c for c in cells if not cell_finished(out / c[0] / c[1] / f"seed{c[2]}")]
    for cell in list(pending):  # the grid's choice already made: its other members' later seeds
        gate, choice = grid_gate(matrix, out, cell, pending)
        if gate == "skip":
            pending.remove(cell)
            _say_skipped(matrix, cell, str(choice))
    began = time.perf_counter()
    if parallel == 1:
        ran = 0
        for k, (pair, method, seed) in enumerate(pending):
            # cells run pair by pair, seed by seed: this invocation's first-seed cells have run
            gate, choice = grid_gate(matrix, out, (pair, method, seed), ())
            if gate == "skip":  # chosen while this invocation ran the first seed
                _say_skipped(matrix, (pair, method, seed), str(choice))
                continue
            elapsed = time.perf_counter() - began
            print(
                f"[bench] {k + 1}/{len(pending)} to run: {pair} {method} seed {seed} (elapsed {elapsed / 60:.1f} min)",
                flush=True,
            )
            run_cell(matrix, out, pair, method, seed, teachers.get(pair), progress=progress)
            ran += 1
    else:
        ran = _run_in_processes(matrix, matrix_path, out, pending, parallel, grace=stop_grace)  # type: ignore[arg-type]
    seconds = time.perf_counter() - began
    if ran:
        timing = {
            "parallel": parallel,
            "cells": ran,
            "seconds": round(seconds, 2),
            "cells_per_minute": round(ran / (seconds / 60), 3),
            "commit": git_commit(),
            "machine": machine(),
        }
        with open(out / "timing.jsonl", "a") as f:
            f.write(json.dumps(timing) + "\n")
        print(
            f"[bench] {ran} cell(s) in {seconds / 60:.1f} min with {parallel} at once: "
            f"{timing['cells_per_minute']:.2f} cells per minute",
            flush=True,
        )
    return aggregate(matrix, out)


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


def _the_runs(cells: list[Cell], shared: dict[Cell, Cell]) -> list[Cell]:
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
    first seed did not choose (see the module notes); ``("wait", None)`` while the choice is open
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


def _say_skipped(matrix: Matrix, cell: Cell, choice: str) -> None:
    pair, method, seed = cell
    print(
        f"[bench] skipped {pair} {method} seed {seed}: the {matrix.grid_prefix!r} grid chose {choice} "
        f"on seed {matrix.seeds[0]} (grid_all_seeds: true runs every member on every seed)",
        flush=True,
    )


def cell_config(matrix: Matrix, pair: str, method: str, seed: int, teacher: Path | str):
    """The run configuration of one cell: the student config with the matrix's shared overrides,
    the pair's, the cell's name, seed, models and teacher, then the method's."""
    given = matrix.pairs[pair]
    return load_config(
        matrix.student_config,
        [
            *matrix.base,
            *given.overrides,
            f"name={method}",
            f"seed={seed}",
            f"student.name={given.student}",
            f"teacher.name={given.teacher}",
            f"teacher.checkpoint={teacher}",
            *matrix.methods[method],
        ],
    )


def needs_teacher(matrix: Matrix, pair: str, method: str, seed: int) -> bool:
    """Whether the cell distils (its configuration names a teacher); a cell without one (the
    student alone) runs before, or without, its pair's teacher being trained."""
    return cell_config(matrix, pair, method, seed, "teacher.pt").teacher.name is not None


def check_cells(matrix: Matrix) -> None:
    """Every cell's configuration, checked before anything runs (a bad override fails now, not
    after hours of other cells); a cell must train (``epochs`` >= 1)."""
    for pair in matrix.pairs:
        for method in matrix.methods:
            for seed in matrix.seeds:
                try:
                    config = cell_config(matrix, pair, method, seed, "teacher.pt")
                except ValueError as error:
                    raise ValueError(f"cell {pair} {method} seed {seed}: {error}") from None
                if config.epochs < 1:
                    raise ValueError(
                        f"cell {pair} {method} seed {seed}: epochs={config.epochs}; a matrix cell must "
                        "train (epochs >= 1)"
                    )


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
    teacher = teacher or Path(given.checkpoint or out / "teachers" / given.teacher / "best.pt")
    if needs_teacher(matrix, pair, method, seed) and not teacher.is_file():
        raise FileNotFoundError(
            f"teacher {given.teacher!r} of pair {pair!r} is not trained yet ({teacher}); "
            "run the matrix without --cell first"
        )
    config = cell_config(matrix, pair, method, seed, teacher)
    try:  # the bench owns its cell folders: a cell killed before its first checkpoint starts afresh
        train(
            config, folder, resume=(folder / "checkpoint.pt").is_file(), force=True, progress=progress, verbose=progress
        )
    except NonFiniteStepError as error:
        folder.mkdir(parents=True, exist_ok=True)
        epochs = len(read_jsonl(folder / "metrics.jsonl"))
        (folder / "diverged.json").write_text(json.dumps({"error": str(error), "epochs_completed": epochs}) + "\n")
        print(f"[bench] {pair} {method} seed {seed} diverged in epoch {epochs + 1}: {error}", flush=True)


def _run_in_processes(
    matrix: Matrix,
    matrix_path: Path,
    out: Path,
    cells: list[Cell],
    parallel: int,
    *,
    grace: float = STOP_GRACE_SECONDS,
) -> int:
    """Run ``cells`` (those :func:`grid_gate` does not skip) as ``parallel`` concurrent ``dtokd bench
    --cell`` processes and return how many ran; CPU threads are shared out between them unless
    ``OMP_NUM_THREADS`` is set. Raises once all have ended if any failed.

    SIGINT, SIGTERM or SIGHUP, whenever it lands (a cell being started included), stops every
    cell this call started: each gets SIGINT (it stops at its last checkpoint), those still
    running after ``grace`` seconds are killed, then :class:`~dtokd.interrupts.Interrupted` is raised.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    queue = list(cells)
    running: list[RunningCell] = []
    failed: list[tuple[Cell, str]] = []
    with deferred_stop() as stop:  # a signal is only noted, so no started cell escapes the list
        try:
            started = _drive(matrix, matrix_path, out, queue, running, failed, parallel, env, len(cells), stop)
        finally:
            if running:  # a stop signal, or an error of the driver itself
                _stop_cells(running, grace)
        if stop.signal is not None:
            raise Interrupted(stop.signal)
    if failed:
        listing = "; ".join(f"{' '.join(map(str, cell))} (see {path})" for cell, path in sorted(failed))
        raise CellsFailed(f"{len(failed)} of {len(cells)} cell(s) failed: {listing}")
    return started


def _cell_command(matrix_path: Path, out: Path, pair: str, method: str, seed: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dtokd.cli",
        "bench",
        str(matrix_path),
        "--out",
        str(out),
        "--cell",
        pair,
        method,
        str(seed),
    ]


def _drive(
    matrix: Matrix,
    matrix_path: Path,
    out: Path,
    queue: list[Cell],
    running: list[RunningCell],
    failed: list[tuple[Cell, str]],
    parallel: int,
    env: dict[str, str],
    total: int,
    stop: StopRequest,
) -> int:
    """Keep ``parallel`` cell processes running until ``queue`` is empty and all have ended, or
    until ``stop`` notes a signal (then return at once, with the running cells in ``running``).
    The next cell started is the first in ``queue`` that :func:`grid_gate` lets run (skipped
    ones leave the queue; waiting ones stay until the grid's first-seed cells have ended).
    Returns how many cells it started."""
    done, started = 0, 0
    while (queue or running) and stop.signal is None:
        while queue and len(running) < parallel and stop.signal is None:
            unfinished = set(queue) | {cell for cell, _, _ in running}
            ready = None
            for cell in list(queue):
                gate, choice = grid_gate(matrix, out, cell, unfinished)
                if gate == "skip":
                    queue.remove(cell)
                    done += 1
                    _say_skipped(matrix, cell, str(choice))
                elif gate == "run":
                    ready = cell
                    break
            if ready is None:
                break  # every queued cell waits for the grid's first-seed cells
            queue.remove(ready)
            pair, method, seed = ready
            folder = out / pair / method / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            log = open(folder / "bench.log", "a")
            process = subprocess.Popen(
                _cell_command(matrix_path, out, pair, method, seed),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )  # a Ctrl-C reaches the cells through us, once
            running.append(((pair, method, seed), process, log))
            started += 1
            print(
                f"[bench] started {pair} {method} seed {seed} ({len(running)} running, {len(queue)} waiting)",
                flush=True,
            )
        time.sleep(0.2)
        for entry in list(running):
            cell, process, cell_log = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            cell_log.close()
            done += 1
            if process.returncode != 0:
                failed.append((cell, cell_log.name))
            print(
                f"[bench] {'failed' if process.returncode else 'finished'} {' '.join(map(str, cell))} ({done}/{total})",
                flush=True,
            )
    return started


def _stop_cells(running: list[RunningCell], grace: float) -> None:
    """SIGINT to every running cell; wait up to ``grace`` seconds in all; kill the rest."""
    for _, process, _ in running:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    print(f"[bench] stopping {len(running)} running cell(s)", flush=True)  # each has its SIGINT
    deadline = time.monotonic() + grace
    for cell, process, log in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            print(
                f"[bench] killed {' '.join(map(str, cell))}: it did not stop within {grace:g} s of SIGINT "
                "(it resumes from its last checkpoint)",
                flush=True,
            )
        log.close()
    running.clear()


def _ensure_teacher(matrix: Matrix, folder: Path, name: str, progress: bool) -> Path:
    if not (folder / "summary.json").is_file():
        config = load_config(matrix.teacher_config, [f"student.name={name}", f"name=teacher-{name}", "seed=0"])
        print(f"[bench] training teacher {name} into {folder}", flush=True)
        train(
            config, folder, resume=(folder / "checkpoint.pt").is_file(), force=True, progress=progress, verbose=progress
        )
    return folder / "best.pt"


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell_statistics(folders: list[Path]) -> dict[str, Any]:
    """Mean and standard deviation over seeds, and the means of the logged balancer quantities."""
    summaries = [json.loads((f / "summary.json").read_text()) for f in folders if (f / "summary.json").is_file()]
    diverged = sum((f / "diverged.json").is_file() for f in folders)
    metrics = [read_jsonl(f / "metrics.jsonl") for f in folders if (f / "summary.json").is_file()]
    steps = [row for f in folders if (f / "summary.json").is_file() for row in read_jsonl(f / "steps.jsonl")]
    m = summaries[0].get("metric", "top1") if summaries else "top1"
    others = other_metrics(summaries, m)
    cell: dict[str, Any] = {"seeds": len(summaries), "diverged": diverged, "metric": m, "other_metrics": others}
    keys = [f"test_{m}_at_best_val", f"best_val_{m}", f"best_test_{m}", f"last_test_{m}", "seconds_per_epoch"]
    keys += [key for x in others for key in (f"test_{x}_at_best_val", f"last_test_{x}")]
    for key in keys:
        cell[key], cell[key + "_std"] = _mean_std([s[key] for s in summaries if s.get(key) is not None])
    times = [s["seconds_per_epoch"] for s in summaries]
    cell["seconds_per_epoch_min"] = min(times) if times else math.nan  # interference only adds time
    split = _curve_split(metrics, m)
    rows = [[row for row in run if f"{split}_{m}" in row] for run in metrics]  # the evaluated epochs
    count = min((len(r) for r in rows), default=0)
    cell["curve_split"] = split
    cell["curve_epochs"] = [rows[0][e]["epoch"] + 1 for e in range(count)]
    cell["curve"] = [statistics.fmean(run[e][f"{split}_{m}"] for run in rows) for e in range(count)]
    cell["curve_std"] = [
        statistics.stdev([run[e][f"{split}_{m}"] for run in rows]) if len(rows) > 1 else 0.0 for e in range(count)
    ]
    for key in sorted({k for row in steps for k in row if k.startswith(("loss_weight/", "weight/"))}):
        cell[key] = statistics.fmean(row[key] for row in steps if key in row)
    first_weight = next((k for k in sorted({k for row in steps for k in row}) if k.startswith("loss_weight/")), None)
    by_step: dict[int, list[float]] = {}
    for row in steps:
        if first_weight in row:
            by_step.setdefault(row["step"], []).append(row[first_weight])
    cell["weight_curve_name"] = first_weight
    cell["weight_curve"] = [(step, statistics.fmean(v)) for step, v in sorted(by_step.items())]
    ratios: dict[int, list[float]] = {}
    for row in steps:
        if "update_ratio" in row and math.isfinite(row["update_ratio"]):
            ratios.setdefault(row["step"], []).append(row["update_ratio"])
    cell["update_ratio_curve"] = [(step, statistics.fmean(v)) for step, v in sorted(ratios.items())]
    cell["update_ratio"] = (
        math.exp(statistics.fmean(math.log(r) for v in ratios.values() for r in v if r > 0)) if ratios else None
    )  # geometric mean over the logged steps
    conflicts = [row["conflict"] for row in steps if "conflict" in row]
    dominances = [row["dominance"] for row in steps if "dominance" in row and 0 < row["dominance"] < math.inf]
    cell["conflict"] = statistics.fmean(conflicts) if conflicts else None
    cell["dominance"] = math.exp(statistics.fmean(math.log(d) for d in dominances)) if dominances else None
    return cell


def other_metrics(summaries: list[dict[str, Any]], metric: str) -> list[str]:
    """The test metrics the summaries report besides the one that chooses the epoch (``ppl``
    for causal LMs: ``test_ppl_at_best_val`` is the perplexity at the epoch chosen on
    validation ``metric``), in the order the first summary lists them."""
    keys = summaries[0] if summaries else {}
    found = [
        k[len("test_") : -len("_at_best_val")] for k in keys if k.startswith("test_") and k.endswith("_at_best_val")
    ]
    return [x for x in found if x != metric]


def _curve_split(metrics: list[list[dict[str, Any]]], metric: str) -> str:
    """``test`` when the runs evaluated the test split per epoch (``eval.test=every``), else ``val``."""
    rows = [row for run in metrics for row in run if f"val_{metric}" in row or f"test_{metric}" in row]
    return "test" if rows and all(f"test_{metric}" in row for row in rows) else "val"


def paired_differences(folders: list[tuple[Path, Path]], metric: str) -> tuple[float, float, int]:
    """Mean and standard deviation over seeds of ``method - reference`` in test metric at the
    epoch chosen on validation, from one (method's, reference's) pair of cell folders per seed,
    over the seeds both finished with the same teacher (same seed: same initialisation and
    batches; see :func:`same_teacher`), and how many seeds that is."""
    differences = []
    for method_folder, reference_folder in folders:
        pair = [method_folder / "summary.json", reference_folder / "summary.json"]
        if all(p.is_file() for p in pair) and same_teacher(method_folder, reference_folder):
            values = [json.loads(p.read_text()).get(f"test_{metric}_at_best_val") for p in pair]
            if None not in values:
                differences.append(values[0] - values[1])
    mean, std = _mean_std(differences)
    return mean, std, len(differences)


def same_teacher(first: Path, second: Path) -> bool:
    """Whether two finished runs can be paired as far as their teachers go: one of them
    distilled from none (the student alone), or both from the same teacher, by the SHA-256 of
    its weights in ``teacher.json`` where both have it, otherwise by its name and every figure
    measured on its validation and test splits (a teacher trained again need not be
    bit-identical: a record restored into a fresh checkout keeps its cells, not the teacher's
    weights)."""
    paths = [first / "teacher.json", second / "teacher.json"]
    if not all(p.is_file() for p in paths):
        return True
    a, b = (json.loads(p.read_text()) for p in paths)
    if "weights" in a and "weights" in b:
        return a["weights"] == b["weights"]
    measured = [{k: v for k, v in t.items() if k not in ("checkpoint", "weights")} for t in (a, b)]
    return measured[0] == measured[1]


def aggregate(matrix: Matrix, out: Path) -> Path:
    rows: list[dict[str, Any]] = []
    shared = shared_runs(matrix)
    for pair in matrix.pairs:
        folders = {m: [cell_folder(out, (pair, m, s), shared) for s in matrix.seeds] for m in matrix.methods}
        cells = {m: cell_statistics(folders[m]) for m in matrix.methods}
        reference = cells[matrix.reference]
        target = reference["curve"][-1] if reference["curve"] else math.nan
        tuned = grid_choice(matrix, out / pair)
        for method, cell in cells.items():
            if not cell["seeds"] and not cell["diverged"]:
                continue
            reach = next(
                (epoch for epoch, value in zip(cell["curve_epochs"], cell["curve"]) if _reaches(value, target, cell)),
                None,
            )
            if not cell["seeds"]:
                rows.append(
                    {
                        "pair": pair,
                        "method": method + _run_in(pair, folders[method]),
                        **cell,
                        "epochs_to_reference_final": None,
                        "time_vs_reference": math.nan,
                    }
                )
                continue
            versus_reference = list(zip(folders[method], folders[matrix.reference]))
            paired = paired_differences(versus_reference, cell["metric"])
            versus_tuned = (
                paired_differences(list(zip(folders[method], folders[tuned])), cell["metric"])
                if tuned is not None
                else (None, None, 0)
            )
            for other in cell["other_metrics"]:
                difference = paired_differences(versus_reference, other)
                cell[f"paired_{other}_vs_reference"], cell[f"paired_{other}_vs_reference_std"] = difference[:2]
            rows.append(
                {
                    "pair": pair,
                    "method": method + (" (tuned on val)" if method == tuned else "") + _run_in(pair, folders[method]),
                    **cell,
                    "epochs_to_reference_final": reach,
                    "time_vs_reference": cell["seconds_per_epoch_min"] / reference["seconds_per_epoch_min"],
                    "paired_vs_reference": paired[0],
                    "paired_vs_reference_std": paired[1],
                    "paired_seeds": paired[2],
                    "paired_vs_tuned": versus_tuned[0],
                    "paired_vs_tuned_std": versus_tuned[1],
                    "paired_tuned_seeds": versus_tuned[2],
                }
            )
    csv_path, md_path = out / "results.csv", out / "results.md"
    series = {"curve", "curve_std", "curve_epochs", "weight_curve", "weight_curve_name", "update_ratio_curve"}
    series |= {"other_metrics"}  # lists too: not CSV values
    scalar_keys = [k for k in rows[0] if k not in series] if rows else []
    all_keys = sorted({k for r in rows for k in r if k not in series}, key=lambda k: (k not in scalar_keys, k))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=all_keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in all_keys})
    plots = _plots(matrix, rows, out)
    md_path.write_text(_markdown(matrix, rows, plots))
    return md_path


def _reaches(value: float, target: float, cell: dict[str, Any]) -> bool:
    """Whether a curve's ``value`` is as good as ``target`` (as high, or as low for a perplexity or loss)."""
    return value <= target if cell["metric"] in LOWER_IS_BETTER else value >= target


def _run_in(pair: str, folders: list[Path]) -> str:
    """`` (run in <pair>)`` for a row whose runs are another pair's (:func:`shared_runs`)."""
    sources = sorted({f.parent.parent.name for f in folders} - {pair})
    return f" (run in {', '.join(sources)})" if sources else ""


def _fmt(mean: float | None, std: float | None = None, digits: int = 2) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _diverged(row: dict[str, Any]) -> str:
    if not row["diverged"]:
        return ""
    return f" (**{row['diverged']} of {row['diverged'] + row['seeds']} seeds diverged**; stats over the rest)"


def _metric(rows: list[dict[str, Any]]) -> str:
    """The metric of the matrix's runs (``top1``, or ``AP`` for detection)."""
    return rows[0]["metric"] if rows else "top1"


def _markdown(matrix: Matrix, rows: list[dict[str, Any]], plots: list[Path]) -> str:
    m = _metric(rows)
    others = list(dict.fromkeys(x for r in rows for x in r["other_metrics"]))
    lines = [
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
        "",
        f"| pair | method | test {m} at best val | paired vs ref. (n) | paired vs tuned (n) | "
        f"best test {m} | last test {m} | "
        + "".join(f"test {x} at best val | paired {x} vs ref. | last test {x} | " for x in others)
        + "epochs to ref. final | s / epoch (min) | time / ref. | mean weights (on raw loss grads) | conflict | "
        "dominance | step length / ref. |",
        "|---" * (14 + 3 * len(others)) + "|",
    ]
    for r in rows:
        weights = ", ".join(f"{k.split('/', 1)[1]} {v:.3g}" for k, v in r.items() if k.startswith("loss_weight/"))
        lines.append(
            f"| {r['pair']} | {r['method']}{_diverged(r)} "
            f"| {_fmt(r[f'test_{m}_at_best_val'], r[f'test_{m}_at_best_val_std'])} | "
            f"{_fmt(r.get('paired_vs_reference'), r.get('paired_vs_reference_std'))} ({r.get('paired_seeds', 0)}) | "
            f"{_fmt(r.get('paired_vs_tuned'), r.get('paired_vs_tuned_std'))} ({r.get('paired_tuned_seeds', 0)}) | "
            f"{_fmt(r[f'best_test_{m}'], r[f'best_test_{m}_std'])} "
            f"| {_fmt(r[f'last_test_{m}'], r[f'last_test_{m}_std'])} | "
            + "".join(_other_metric_cells(r, x) for x in others)
            + f"{r['epochs_to_reference_final'] or '-'} | {_fmt(r['seconds_per_epoch_min'], None, 1)} "
            f"| {_fmt(r['time_vs_reference'], None)} | "
            f"{weights or '-'} | {_fmt(r['conflict'], None, 3)} | {_fmt(r['dominance'], None, 3)} | "
            f"{_fmt(r['update_ratio'], None, 3)} |"
        )
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _other_metric_cells(row: dict[str, Any], metric: str) -> str:
    """The markdown cells of a metric reported beside the choosing one: at the chosen epoch,
    paired against the reference, and at the last epoch (``-`` where the row lacks it)."""
    keys = (f"test_{metric}_at_best_val", f"paired_{metric}_vs_reference", f"last_test_{metric}")
    return "".join(f"{_fmt(row.get(key), row.get(key + '_std'))} | " for key in keys)


def _plotted(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The rows whose curve is drawn: all but the collapsed or diverged, whose last value is less
    than half the best (an accuracy), or more than twice the best (a perplexity or loss)."""
    curves = [r for r in rows if r["curve"]]
    if metric in LOWER_IS_BETTER:
        best = min(min(r["curve"]) for r in curves) if curves else math.inf
        return [r for r in curves if r["curve"][-1] < 2 * best]
    best = max((max(r["curve"]) for r in curves), default=100.0)
    return [r for r in curves if r["curve"][-1] > 0.5 * best]


def _plots(matrix: Matrix, rows: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dtokd.report import METRIC_LABELS

    def save(fig, ax, name: str, xlabel: str, ylabel: str, title: str, legend: bool = True) -> Path:
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if legend and ax.get_legend_handles_labels()[0]:  # no legend without a labelled line
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        return out / name

    m = _metric(rows)
    label = METRIC_LABELS.get(m, f"test {m}")
    paths = []
    for pair in matrix.pairs:
        pair_rows = [r for r in rows if r["pair"] == pair]
        if not pair_rows:  # no cell of this pair has run yet: no empty plots (and no links to them)
            continue
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
                [m - s for m, s in zip(r["curve"], r["curve_std"])],
                [m + s for m, s in zip(r["curve"], r["curve_std"])],
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
        paths.append(save(fig, ax, f"accuracy_{pair}.png", "epoch", f"{split_label}, mean ± std over seeds", pair))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in pair_rows:
            if r["weight_curve"]:
                ax.plot(*zip(*r["weight_curve"]), label=r["method"])
        ax.set_yscale("symlog", linthresh=0.1)
        paths.append(
            save(
                fig,
                ax,
                f"weights_{pair}.png",
                "step",
                "coefficient on the first loss (distill), mean over seeds",
                f"{pair}: weights over training",
            )
        )
        if any(r["update_ratio_curve"] for r in pair_rows):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for r in pair_rows:
                if r["update_ratio_curve"]:
                    ax.plot(*zip(*r["update_ratio_curve"]), label=r["method"])
            ax.set_yscale("log")
            paths.append(
                save(
                    fig,
                    ax,
                    f"update_length_{pair}.png",
                    "step",
                    "update length / the reference's at the same step (mean over seeds)",
                    f"{pair}: how long each step is against the reference weights",
                )
            )
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in pair_rows:
            ax.errorbar(
                r["time_vs_reference"], r[f"test_{m}_at_best_val"], yerr=r[f"test_{m}_at_best_val_std"], fmt="o"
            )
            ax.annotate(r["method"], (r["time_vs_reference"], r[f"test_{m}_at_best_val"]), fontsize=6)
        paths.append(
            save(
                fig,
                ax,
                f"cost_{pair}.png",
                f"time per epoch / {matrix.reference}",
                f"{label} at best val",
                f"{pair}: accuracy against cost",
                legend=False,
            )
        )
    return paths
