"""Cells in processes of their own: :func:`run_in_processes` keeps ``parallel`` cell processes
running (each ``dtokd bench MATRIX --out OUT --cell PAIR METHOD SEED``, :func:`cell_command`,
its output in the cell's ``bench.log``), starting the next cell that :func:`~dtokd.bench.grid.grid_gate`
lets run, and owns the signals meanwhile: SIGINT, SIGTERM or SIGHUP stops every cell it started
(SIGINT to each, a kill after the grace period), then :class:`~dtokd.interrupts.Interrupted` is
raised. Failed cells are reported together once all have ended (:class:`CellsFailed`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dtokd.bench.grid import grid_gate, say_skipped
from dtokd.bench.matrix import Cell, Matrix
from dtokd.interrupts import Interrupted, StopRequest, deferred_stop

RunningCell = tuple[Cell, "subprocess.Popen[bytes]", IO[str]]
"""A cell's process and the log file it writes."""
CellCommand = Callable[[Path, Path, str, str, int], list[str]]
"""(matrix file, output folder, pair, method, seed) -> the command line that runs that cell."""

STOP_GRACE_SECONDS = 60.0
"""How long a parallel bench waits, in all, for its cells to stop after a stop signal before it
kills the rest (``--stop-grace``)."""


class CellsFailed(RuntimeError):
    """Some cells of a parallel run failed (each one's output is in its ``bench.log``)."""


def cell_command(matrix_path: Path, out: Path, pair: str, method: str, seed: int) -> list[str]:
    """The command line of one cell: ``python -m dtokd.cli bench MATRIX --out OUT --cell PAIR METHOD SEED``."""
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


@dataclass(frozen=True)
class _Launcher:
    """How this run starts a cell's process: its command line, the environment, where its log goes."""

    matrix_path: Path
    out: Path
    env: dict[str, str]
    command: CellCommand

    def start(self, cell: Cell) -> RunningCell:
        pair, method, seed = cell
        folder = self.out / pair / method / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        log = open(folder / "bench.log", "a")
        process = subprocess.Popen(
            self.command(self.matrix_path, self.out, pair, method, seed),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )  # a Ctrl-C reaches the cells through us, once
        return cell, process, log


def run_in_processes(
    matrix: Matrix,
    matrix_path: Path,
    out: Path,
    cells: list[Cell],
    parallel: int,
    *,
    grace: float = STOP_GRACE_SECONDS,
    command: CellCommand = cell_command,
) -> int:
    """Run ``cells`` (those :func:`~dtokd.bench.grid.grid_gate` does not skip) as ``parallel``
    concurrent processes (``command``'s command lines) and return how many ran; CPU threads are
    shared out between them unless ``OMP_NUM_THREADS`` is set. Raises once all have ended if any failed.

    SIGINT, SIGTERM or SIGHUP, whenever it lands (a cell being started included), stops every
    cell this call started: each gets SIGINT (it stops at its last checkpoint), those still
    running after ``grace`` seconds are killed, then :class:`~dtokd.interrupts.Interrupted` is raised.
    """
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    launcher = _Launcher(matrix_path, out, env, command)
    queue = list(cells)
    running: list[RunningCell] = []
    failed: list[tuple[Cell, str]] = []
    with deferred_stop() as stop:  # a signal is only noted, so no started cell escapes the list
        try:
            started = _drive(matrix, out, queue, running, failed, parallel, len(cells), stop, launcher)
        finally:
            if running:  # a stop signal, or an error of the driver itself
                _stop_cells(running, grace)
        if stop.signal is not None:
            raise Interrupted(stop.signal)
    if failed:
        listing = "; ".join(f"{' '.join(map(str, cell))} (see {path})" for cell, path in sorted(failed))
        raise CellsFailed(f"{len(failed)} of {len(cells)} cell(s) failed: {listing}")
    return started


def _drive(
    matrix: Matrix,
    out: Path,
    queue: list[Cell],
    running: list[RunningCell],
    failed: list[tuple[Cell, str]],
    parallel: int,
    total: int,
    stop: StopRequest,
    launcher: _Launcher,
) -> int:
    """Keep ``parallel`` cell processes running until ``queue`` is empty and all have ended, or
    until ``stop`` notes a signal (then return at once, with the running cells in ``running``).
    The next cell started is the first in ``queue`` that :func:`~dtokd.bench.grid.grid_gate` lets
    run (skipped ones leave the queue; waiting ones stay until the grid's first-seed cells have
    ended). Returns how many cells it started."""
    done, started = 0, 0
    while (queue or running) and stop.signal is None:
        while queue and len(running) < parallel and stop.signal is None:
            ready, skipped = _next_ready(matrix, out, queue, running)
            done += skipped
            if ready is None:
                break  # every queued cell waits for the grid's first-seed cells
            queue.remove(ready)
            running.append(launcher.start(ready))
            started += 1
            pair, method, seed = ready
            print(
                f"[bench] started {pair} {method} seed {seed} ({len(running)} running, {len(queue)} waiting)",
                flush=True,
            )
        time.sleep(0.2)
        done = _collect(running, failed, done, total)
    return started


def _next_ready(matrix: Matrix, out: Path, queue: list[Cell], running: list[RunningCell]) -> tuple[Cell | None, int]:
    """The first cell of ``queue`` that :func:`~dtokd.bench.grid.grid_gate` lets run now (``None``
    if all wait), and how many cells before it the grid skips (said, and removed from ``queue``)."""
    unfinished = set(queue) | {cell for cell, _, _ in running}
    skipped = 0
    for cell in list(queue):
        gate, choice = grid_gate(matrix, out, cell, unfinished)
        if gate == "skip":
            queue.remove(cell)
            skipped += 1
            say_skipped(matrix, cell, str(choice))
        elif gate == "run":
            return cell, skipped
    return None, skipped


def _collect(running: list[RunningCell], failed: list[tuple[Cell, str]], done: int, total: int) -> int:
    """Take the cells whose processes have ended out of ``running`` (a failed one into ``failed``),
    say so, and return ``done`` counted on by them."""
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
    return done


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
