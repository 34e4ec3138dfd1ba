"""The cost of one cell of the CPU evidence matrix, before and after cheapening it.

One cell is a fixed-KD run of ``configs/bench_cifar10_cpu.yaml`` (CIFAR-10 JPEG, released
ResNet-56 -> ResNet-20, 5,000 training images, 30 epochs). Its parts are timed here in one
process, side by side, each the median of ``--repeats`` rounds (rows interleaved round by round):

- a training epoch with the teacher run on every batch, and with its outputs read from the
  teacher-output cache (``teacher.cache_outputs``: what every cell of a seed but the first pays);
- an evaluation of the validation split (5,000 images) and of the test split (10,000);
- the teacher's accuracy check (validation + test), which the cache by content makes once per
  teacher and seed instead of once per cell (counted as zero in a cell after).

From them, the cost of a 30-epoch cell: before (validation and test after every epoch, the teacher
check in the cell, the teacher on every batch) and after (validation every 3 epochs and at the last,
the test split twice at the end, the teacher check and the teacher's outputs cached), with the share
of evaluation and of the teacher in each.

    OMP_NUM_THREADS=1 python benchmarks/cell_cost.py --output benchmarks/results/cifar10_cpu/cell_cost
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dtokd.bench import cell_config, load_matrix
from dtokd.train import loop
from dtokd.train.records import MetricLog, git_commit, machine

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", default=str(ROOT / "configs" / "bench_cifar10_cpu.yaml"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the cell the totals are for")
    parser.add_argument("--every", type=int, default=3, help="validation cadence of the cheapened cell")
    parser.add_argument("--output", required=True, help="path stem for .json and .md")
    args = parser.parse_args()
    matrix = load_matrix(args.matrix)
    spec = matrix.pairs["released"]
    config = cell_config(matrix, "released", "kd-fixed", 0, spec["checkpoint"])
    config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, cache_outputs=False))
    times: dict[str, list[float]] = {k: [] for k in ("epoch_teacher", "epoch_cached", "val", "test", "teacher_check")}
    with tempfile.TemporaryDirectory() as scratch:
        parts = loop._build(config, verbose=False)  # the cell's data, models, balancer, optimizer
        teacher = (
            loop.WithInput(parts.teacher, parts.teacher_input) if parts.teacher_input is not None else parts.teacher
        )
        cache = loop.CachedTeacher(parts.teacher, Path(scratch), "bench")  # a scratch cache, never the user's
        parts.task.use_teacher(cache)
        log = MetricLog(Path(scratch), enabled=False)
        for round_ in range(args.repeats):
            for row, epoch in (("epoch_teacher", 2 * round_), ("epoch_cached", 2 * round_)):
                if row == "epoch_teacher":
                    (Path(scratch) / "bench" / f"epoch{epoch}.pt").unlink(missing_ok=True)
                start = time.perf_counter()
                loop._train_epoch(config, dataclasses.replace(parts, teacher_cache=cache), epoch, log)
                times[row].append(time.perf_counter() - start)
            for split in ("val", "test"):
                start = time.perf_counter()
                parts.task.evaluate(parts.student, getattr(parts.data, split), config.eval_batch_size, parts.device)
                times[split].append(time.perf_counter() - start)
            start = time.perf_counter()
            loop._measure_teacher(config, parts.task, teacher, parts.data, parts.device)
            times["teacher_check"].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    n, evals = args.epochs, len([e for e in range(args.epochs) if (e + 1) % args.every == 0 or e + 1 == args.epochs])
    before = {
        "training": n * median["epoch_teacher"],
        "evaluation": n * (median["val"] + median["test"]),
        "teacher check": median["teacher_check"],
    }
    after = {
        "training": median["epoch_teacher"] + (n - 1) * median["epoch_cached"],
        "evaluation": evals * median["val"] + 2 * median["test"],
        "teacher check": 0.0,
    }
    result = {
        "commit": git_commit(),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "median_seconds": median,
        "samples": times,
        "epochs": n,
        "every": args.every,
        "cell_before_seconds": before,
        "cell_after_seconds": after,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.output + ".md").write_text(_markdown(result))
    print(_markdown(result))


def _markdown(r: dict) -> str:
    m = r["median_seconds"]
    lines = [
        "# Cost of one CPU evidence-matrix cell (fixed KD, released ResNet-56 -> ResNet-20, 5,000 images)",
        "",
        f"commit `{r['commit'][:10]}`; {r['machine']}; {r['threads']} thread(s); medians of {r['repeats']} rounds",
        "",
        "| part | seconds |",
        "|---|---|",
        f"| training epoch, teacher on every batch | {m['epoch_teacher']:.1f} |",
        f"| training epoch, teacher outputs cached | {m['epoch_cached']:.1f} "
        f"({m['epoch_cached'] / m['epoch_teacher']:.2f}x) |",
        f"| validation split (5,000) | {m['val']:.1f} |",
        f"| test split (10,000) | {m['test']:.1f} |",
        f"| teacher check (validation + test, ResNet-56) | {m['teacher_check']:.1f} |",
        "",
        "After: the first epoch of a seed runs the teacher, the others read its cached outputs; validation "
        f"every {r['every']} epochs and at the last; the test split on best.pt and on the last model; the "
        "teacher check read from its cache.",
        "",
        f"| {r['epochs']}-epoch cell | training | evaluation | teacher check | total | evaluation share "
        "| teacher share |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, parts in (("before", r["cell_before_seconds"]), ("after", r["cell_after_seconds"])):
        total = sum(parts.values())
        teacher = (m["epoch_teacher"] - m["epoch_cached"]) * (r["epochs"] if name == "before" else 1) + parts[
            "teacher check"
        ]
        lines.append(
            f"| {name} | {parts['training'] / 60:.1f} min | {parts['evaluation'] / 60:.1f} min | "
            f"{parts['teacher check'] / 60:.1f} min | {total / 60:.1f} min | {parts['evaluation'] / total:.0%} | "
            f"{teacher / total:.0%} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
