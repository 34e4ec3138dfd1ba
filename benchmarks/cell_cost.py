"""The training cost of a matrix's methods, measured side by side in one process.

Each method's cell (``--pair``, the matrix's first seed) is built once, with its training split cut
to ``--steps`` batches, so that one epoch is ``--steps`` steps; then, round by round, every method
trains that epoch (the methods interleaved within a round, the same epoch each time, the scheduler
not stepped). Round 0 is a warm-up, not counted: it also fills the teacher-output cache of the
methods that use one (``teacher.cache_outputs``, kept in a scratch folder), so their counted rounds
read it, as every cell of a seed but the one that first runs an epoch does (that one pays the live
teacher, as the methods without the cache do). Per method: the median seconds per step over ``--repeats`` counted
rounds, its ratio to the matrix's reference method, and the training part of a whole cell (seconds
per step x the steps of the cell's epochs; evaluation, the same for every method, not included)::

    OMP_NUM_THREADS=1 python benchmarks/cell_cost.py configs/bench_cifar10_vit_cpu.yaml --pair released \
        --steps 12 --repeats 3 --output benchmarks/results/cifar10_vit_cpu/cell_cost

(``benchmarks/results/cifar10_cpu/cell_cost.*`` was made by an earlier script of this name, at the
commit its files name: one cell's parts before and after its evaluation and teacher were cheapened.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dtokd.bench import Matrix, cell_config, load_matrix
from dtokd.train.build import build_parts
from dtokd.train.config import Config
from dtokd.train.epoch import train_epoch
from dtokd.train.parts import Parts
from dtokd.train.records import MetricLog, git_commit, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("matrix")
    parser.add_argument("--pair", required=True)
    parser.add_argument("--methods", nargs="+", help="default: every method of the matrix")
    parser.add_argument("--steps", type=int, default=12, help="training steps a method runs per round")
    parser.add_argument("--repeats", type=int, default=3, help="counted rounds (after one warm-up round)")
    parser.add_argument("--output", required=True, help="path stem for .json and .md")
    args = parser.parse_args()
    result = measure(args.matrix, args.pair, args.methods, steps=args.steps, repeats=args.repeats)
    result["command"] = "python benchmarks/cell_cost.py " + " ".join(sys.argv[1:])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.output + ".md").write_text(markdown(result))
    print(markdown(result))


def measure(matrix_path: str, pair: str, methods: list[str] | None, *, steps: int, repeats: int) -> dict:
    """The measurement described above, as the JSON record holds it."""
    matrix = load_matrix(matrix_path)
    methods = methods or list(matrix.methods)
    if pair not in matrix.pairs:
        raise ValueError(f"--pair {pair!r} is not one of the matrix's pairs {list(matrix.pairs)}")
    if steps < 1 or repeats < 1:
        raise ValueError(f"--steps {steps} and --repeats {repeats} must be at least 1")
    teacher = matrix.pairs[pair].checkpoint
    if teacher is None:
        raise ValueError(f"pair {pair!r} has no teacher checkpoint given: train its teacher with the bench first")
    with tempfile.TemporaryDirectory() as scratch:
        cells = {m: _short_cell(matrix, pair, m, teacher, steps, Path(scratch)) for m in methods}
        times = _interleaved(cells, steps, repeats, MetricLog(Path(scratch), enabled=False))
    per_step = {m: statistics.median(t) for m, t in times.items()}
    reference = per_step.get(matrix.reference)
    return {
        "matrix": matrix.name,
        "commit": git_commit(),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "repeats": repeats,
        "reference": matrix.reference,
        "seconds_per_step": times,
        "median_seconds_per_step": per_step,
        "ratio_to_reference": {m: s / reference for m, s in per_step.items()} if reference else None,
        "cell_training_minutes": {m: None if n is None else per_step[m] * n / 60 for m, (_, _, n) in cells.items()},
    }


def _short_cell(
    matrix: Matrix, pair: str, method: str, teacher: str, steps: int, scratch: Path
) -> tuple[Config, Parts, int | None]:
    """A cell cut to ``steps`` batches an epoch, built, its teacher-output cache (if any) moved to
    ``scratch``; with the steps of the whole cell (None where its configuration does not set the
    training split's size; the last partial batch of an epoch is dropped)."""
    config = cell_config(matrix, pair, method, matrix.seeds[0], teacher)
    limit = config.data.limit_train
    full_steps = None if limit is None else limit // config.batch_size * config.epochs
    short = dataclasses.replace(config, data=dataclasses.replace(config.data, limit_train=steps * config.batch_size))
    parts = build_parts(short, verbose=False)
    if parts.teacher_cache is not None:  # the user's cache is not written
        parts.teacher_cache.folder = scratch / parts.teacher_cache.key
    return short, parts, full_steps


def _interleaved(cells: dict, steps: int, repeats: int, log: MetricLog) -> dict[str, list[float]]:
    """Seconds per step of each cell's epoch 0, round by round, after a warm-up round."""
    times: dict[str, list[float]] = {m: [] for m in cells}
    for round_ in range(repeats + 1):
        for method, (config, parts, _) in cells.items():
            start = time.perf_counter()
            train_epoch(config, parts, 0, log)
            if round_:  # round 0: the warm-up
                times[method].append((time.perf_counter() - start) / steps)
    return times


def markdown(r: dict) -> str:
    """The table of one measurement."""
    lines = [
        f"# Training cost per method, side by side: {r['matrix']}",
        "",
        f"commit `{r['commit'][:10]}`; {r['machine']}; {r['threads']} thread(s); {r['steps']} steps a round, "
        f"medians of {r['repeats']} rounds after a warm-up; `{r.get('command', '')}`",
        "",
        f"| method | seconds per step | vs {r['reference']} | training part of a cell |",
        "|---|---|---|---|",
    ]
    for method, seconds in r["median_seconds_per_step"].items():
        ratio = f"{r['ratio_to_reference'][method]:.2f}x" if r["ratio_to_reference"] else "-"
        minutes = r["cell_training_minutes"][method]
        cell = "-" if minutes is None else f"{minutes:.1f} min"
        lines.append(f"| {method} | {seconds:.3f} | {ratio} | {cell} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
