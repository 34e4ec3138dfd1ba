"""Keep a bench matrix's finished cells as a committed record, and bring them back into a run folder.

A checkout that starts fresh has no ``runs/``: without its finished cells, ``dtokd bench`` would
run them again. ``save`` copies what a finished cell's results consist of (its configuration,
records, logged steps and summary: never a checkpoint or weights) from the bench's output
folder into a record folder, with the tables, plots and timing log; ``restore`` copies the
cells back into an output folder, so that the bench skips them and aggregates them with the
new ones::

    python benchmarks/bench_record.py save runs/bench_cifar10_cpu benchmarks/results/cifar10_cpu
    python benchmarks/bench_record.py restore benchmarks/results/cifar10_cpu runs/bench_cifar10_cpu

Layout of a record: ``cells/<pair>/<method>/seed<N>/`` (the files of ``CELL_FILES`` that the
cell has), ``teachers/<name>/`` for teachers the bench trained (``:`` in a name becomes ``_``;
their weights stay out; a teacher trained again, which need not be bit-identical, is kept beside
the first as ``<name>-<the time its training started>``), and the bench's ``results.md``,
``results.csv``, plots and ``timing.jsonl``. Neither direction overwrites a file that differs
from the one it would write: it stops and names it. ``save`` replaces a record's tables and
plots (``--aggregate-only`` rebuilds them from the cells) and its timing log only with one that
continues it (the bench appends a line per invocation).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
from pathlib import Path

from dtokd.bench import cell_finished

CELL_FILES = ("config.yaml", "meta.json", "metrics.jsonl", "steps.jsonl", "teacher.json", "summary.json")
"""A finished cell's result files (``diverged.json`` too, for a cell that diverged)."""
TEACHER_FILES = ("config.yaml", "meta.json", "metrics.jsonl", "summary.json")
TABLES = ("results.md", "results.csv", "timing.jsonl")


class Conflict(RuntimeError):
    """A file exists at the destination with other content."""


def _copy(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` unless an identical file is there (a differing one: :class:`Conflict`)."""
    if target.exists():
        if filecmp.cmp(source, target, shallow=False):
            return
        raise Conflict(f"{target} exists with other content than {source}; move it away first")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def _teacher_record(teacher: Path, teachers: Path) -> Path:
    """Where the trained teacher ``teacher`` is kept in a record's ``teachers``: ``<name>``, or,
    where another teacher of that name is kept there (one trained again in a fresh checkout is
    not bit-identical), ``<name>-<the time its training started>``."""
    name = teacher.name.replace(":", "_")
    kept = teachers / name
    both = [n for n in TEACHER_FILES if (teacher / n).is_file() and (kept / n).is_file()]
    if all(filecmp.cmp(teacher / n, kept / n, shallow=False) for n in both):
        return kept
    if not (teacher / "meta.json").is_file():
        raise Conflict(f"{kept} keeps another teacher, and {teacher} has no meta.json to name this one by")
    started = json.loads((teacher / "meta.json").read_text())["started"]
    return teachers / f"{name}-{started[:16].replace(':', '-')}"


def _cells(root: Path) -> list[Path]:
    """The finished cell folders ``<pair>/<method>/seed<N>`` under ``root``."""
    return sorted(c for c in root.glob("*/*/seed*") if c.is_dir() and cell_finished(c))


def _copy_cells(source: Path, target: Path) -> int:
    """Copy every finished cell's result files from ``source`` to ``target``; the count of cells."""
    cells = _cells(source)
    for cell in cells:
        for name in (*CELL_FILES, "diverged.json"):
            if (cell / name).is_file():
                _copy(cell / name, target / cell.relative_to(source) / name)
    return len(cells)


def save(out: Path, record: Path) -> int:
    """Copy the finished cells of the bench output ``out`` into ``record`` (see the module notes)."""
    cells = _copy_cells(out, record / "cells")
    for teacher in sorted(summary.parent for summary in (out / "teachers").glob("*/summary.json")):
        target = _teacher_record(teacher, record / "teachers")
        for name in TEACHER_FILES:
            if (teacher / name).is_file():
                _copy(teacher / name, target / name)
    timing = record / "timing.jsonl"
    if timing.is_file() and (out / "timing.jsonl").is_file():
        if not (out / "timing.jsonl").read_text().startswith(timing.read_text()):
            raise Conflict(f"{out / 'timing.jsonl'} does not continue {timing}: restore the record into {out} first")
    produced = [out / name for name in TABLES] + sorted(out.glob("*.png"))
    for path in produced:
        if path.is_file():
            record.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, record / path.name)  # tables and plots: rebuilt from the cells by --aggregate-only
    return cells


def restore(record: Path, out: Path) -> int:
    """Copy a record's cells into the bench output ``out`` (and its timing log where ``out`` has none)."""
    if not (record / "cells").is_dir():
        raise FileNotFoundError(f"{record} holds no cells/ folder: not a bench record")
    cells = _copy_cells(record / "cells", out)
    if (record / "timing.jsonl").is_file() and not (out / "timing.jsonl").exists():
        shutil.copy2(record / "timing.jsonl", out / "timing.jsonl")
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    saving = commands.add_parser("save", help="copy a bench output's finished cells into a record")
    saving.add_argument("out", type=Path, help="the bench's output folder (--out)")
    saving.add_argument("record", type=Path, help="the record folder, e.g. benchmarks/results/<name>")
    restoring = commands.add_parser("restore", help="copy a record's cells into a bench output folder")
    restoring.add_argument("record", type=Path)
    restoring.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "save":
            count = save(args.out, args.record)
            print(f"saved {count} finished cells of {args.out} into {args.record}")
        else:
            count = restore(args.record, args.out)
            print(f"restored {count} cells of {args.record} into {args.out}")
    except (Conflict, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
