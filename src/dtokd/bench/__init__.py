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
    teacher_topk: 32                                        # language models: teachers as offline top-k outputs
                                                            # (or {method: k, ...}: those methods only)

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
once per teacher name (seed 0) into ``OUT/teachers/<name>``. With ``teacher_topk: k`` (causal
LMs), each pair's teacher runs once over the whole training split and its top-k outputs are
written to ``OUT/teacher-outputs/<pair>-top<k>``; every cell that distils reads them
(``teacher.outputs``) instead of running the teacher. With ``teacher_topk: {method: k, ...}``
only the methods named read outputs, each at its own ``k`` (written once per pair and ``k``) and
the others run the teacher live: offline cells pair seed by seed with live ones on one teacher.
The aggregate is written as ``results.md`` / ``results.csv`` with plots next to them.

The package, one concept a module (each may import those above it in this list, and
:mod:`dtokd.report` and the layers below; callers take the names from ``dtokd.bench``, and
nothing of the package but ``cli.py`` imports the bench):

- ``matrix.py``: the matrix file (:class:`Matrix`, :class:`Pair`, :func:`load_matrix`), its cells
  and each one's run configuration (:func:`select_cells`, :func:`cell_config`, :func:`check_cells`);
- ``folders.py``: where a cell's run lives, whether it has ended, the runs pairs share
  (:func:`cell_finished`, :func:`shared_runs`, :func:`cell_folder`);
- ``grid.py``: the grid's choice and the gate it puts on later seeds (:func:`grid_choice`, :func:`grid_gate`);
- ``training.py``: a cell and the teachers trained in this process (:func:`run_cell`);
- ``plan.py``: what an invocation would do, said without doing it (``--dry-run``);
- ``processes.py``: cells as concurrent processes, and the stop signals meanwhile (:class:`CellsFailed`);
- ``stats.py``: statistics over a cell's seeds, paired differences (:func:`cell_statistics`,
  :func:`same_teacher`);
- ``tables.py`` / ``plots.py``: ``results.md``'s text and the plots, from :mod:`dtokd.report`'s pieces;
- ``results.py``: the aggregate (:func:`aggregate`: ``results.csv``, ``results.md``, the plots);
- this module: :func:`run_matrix`, which drives them, and the package's names.
"""

from __future__ import annotations

import json
import math
import subprocess  # noqa: F401  (dtokd.bench.subprocess, as in the one-module bench: tests replace its Popen)
import time
from pathlib import Path

from dtokd.bench.folders import cell_finished, cell_folder, shared_runs
from dtokd.bench.folders import the_runs as _the_runs
from dtokd.bench.grid import grid_choice, grid_gate, grid_members, say_skipped
from dtokd.bench.matrix import Cell, Matrix, Pair, cell_config, check_cells, load_matrix, needs_teacher, select_cells
from dtokd.bench.processes import STOP_GRACE_SECONDS, CellsFailed, run_in_processes
from dtokd.bench.processes import cell_command as _cell_command
from dtokd.bench.results import aggregate
from dtokd.bench.stats import cell_statistics, other_metrics, paired_differences, same_teacher
from dtokd.bench.training import ensure_teachers, run_cell, run_here
from dtokd.train.records import git_commit, machine

__all__ = [
    "STOP_GRACE_SECONDS",
    "Cell",
    "CellsFailed",
    "Matrix",
    "Pair",
    "aggregate",
    "cell_config",
    "cell_finished",
    "cell_folder",
    "cell_statistics",
    "check_cells",
    "grid_choice",
    "grid_gate",
    "grid_members",
    "load_matrix",
    "needs_teacher",
    "other_metrics",
    "paired_differences",
    "run_cell",
    "run_matrix",
    "same_teacher",
    "select_cells",
    "shared_runs",
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
    cells = _the_runs(select_cells(matrix) if cells is None else cells, shared_runs(matrix))
    teachers = ensure_teachers(matrix, out, cells, progress)
    pending = [c for c in cells if not cell_finished(out / c[0] / c[1] / f"seed{c[2]}")]
    for cell in list(pending):  # the grid's choice already made: its other members' later seeds
        gate, choice = grid_gate(matrix, out, cell, pending)
        if gate == "skip":
            pending.remove(cell)
            say_skipped(matrix, cell, str(choice))
    began = time.perf_counter()
    if parallel == 1:
        ran = run_here(matrix, out, pending, teachers, progress=progress)
    else:
        ran = _run_in_processes(matrix, matrix_path, out, pending, parallel, grace=stop_grace)  # type: ignore[arg-type]
    if ran:
        _record_timing(out, parallel, ran, time.perf_counter() - began)
    return aggregate(matrix, out)


def _run_in_processes(
    matrix: Matrix, matrix_path: Path, out: Path, cells: list[Cell], parallel: int, *, grace: float = STOP_GRACE_SECONDS
) -> int:
    """:func:`~dtokd.bench.processes.run_in_processes`, each cell started by this module's
    ``_cell_command`` (looked up at each call: replacing ``dtokd.bench._cell_command`` changes
    what a parallel bench starts)."""
    return run_in_processes(matrix, matrix_path, out, cells, parallel, grace=grace, command=_cell_command)


def _record_timing(out: Path, parallel: int, ran: int, seconds: float) -> None:
    """Append this invocation's throughput to ``timing.jsonl`` and say it."""
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
