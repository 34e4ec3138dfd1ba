"""Host cost of a balancer step: the Python and dispatch work it adds to a plain backward.

On a GPU a small student is bound by the host (see results/gpu_h100/): what a balancer costs
there is mostly the operations it issues, not their arithmetic. This measures that cost where
arithmetic is negligible: a 4 -> 3 linear student on 8 samples, on the CPU, each method's
``losses -> backward`` timed against ``(0.9 kd + 0.1 ce).backward()`` in the same run
(methods interleaved, median over rounds of 50 steps). It also counts the tensor operations a
step dispatches (each one a kernel launch on a GPU).

    python benchmarks/host_overhead.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dtokd import make_balancer
from dtokd.profiling import ComputeOpCounter
from dtokd.train.records import git_commit, machine

RESULTS = Path(__file__).parent / "results"


def make_steps() -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    x, y, t = torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.randn(8, 3)

    def losses() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z = net(x)
        kd = F.kl_div(F.log_softmax(z / 4, 1), F.softmax(t / 4, 1), reduction="batchmean") * 16
        return {"distill": kd, "task": F.cross_entropy(z, y)}, z

    def plain() -> None:
        named, _ = losses()
        (0.9 * named["distill"] + 0.1 * named["task"]).backward()

    def balanced(method: str, **options) -> Callable[[], None]:
        balancer = make_balancer(method, net.parameters(), **options)
        representation = options.get("engine") == "representation"

        def step() -> None:
            named, z = losses()
            balancer.backward(named, representation=z if representation else None)

        return step

    return {
        "plain KD": plain,
        "fixed via balancer": balanced("fixed", weights=[0.9, 0.1]),
        "DTO exact": balanced("dto"),
        "DTO representation": balanced("dto", engine="representation"),
        "DTO amortized, next-step": balanced("dto-amortized", update="next-step"),
        "DTO representation, deferred checks": balanced("dto", engine="representation", deferred_checks=True),
        "DTO amortized, next-step, deferred checks": balanced(
            "dto-amortized", update="next-step", deferred_checks=True
        ),
        "MGDA exact": balanced("mgda"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--output", default=str(RESULTS / "host_overhead_cpu"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = make_steps()
    ops = {}
    for name, step in steps.items():
        for _ in range(20):
            step()
        with ComputeOpCounter() as counter:
            step()
        ops[name] = counter.count
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            samples[name].append((time.perf_counter() - start) / args.steps)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    plain = medians["plain KD"]
    rows = [
        {"method": n, "median_us": 1e6 * m, "extra_over_plain_us": 1e6 * (m - plain), "tensor_ops": ops[n]}
        for n, m in medians.items()
    ]
    command = "python " + " ".join(sys.argv)
    record = {
        "benchmark": "host overhead per step, 4->3 linear student, 8 samples, 1 CPU thread",
        "command": command,
        "commit": git_commit()[:10],
        "machine": machine(),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "rows": rows,
    }
    stem = Path(args.output)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# {record['benchmark']}",
        "",
        f"- command: `{command}`",
        f"- commit: `{record['commit']}`",
        f"- machine: {record['machine']}",
        f"- median of {args.rounds} rounds x {args.steps} steps, methods interleaved",
        "",
        "| method | median step (us) | extra over plain KD (us) | tensor operations per step |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['median_us']:.0f} | {r['extra_over_plain_us']:.0f} | {r['tensor_ops']} |" for r in rows
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
