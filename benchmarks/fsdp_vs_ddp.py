"""The pipeline under ``torchrun``-style data parallelism, DDP against FSDP2 (``parallel=fsdp``), on
the stdlib pair (``configs/lm/stdlib_distill.yaml``: a 4 x 256 Llama teacher, a 2 x 128
student; the teacher's weights seeded at random, its cost does not depend on them), two gloo
processes on the CPU, DTO through the exact engine (the paper's rule: one backward pass per
objective, the Gram formed from the gradients, under FSDP from their shards).

Per rank and mode: the bytes this rank holds for the student and its projectors (parameters,
gradients, optimizer state) and for the teacher, after training; the process's peak resident
memory; the seconds per training epoch. The modes alternate, each repeat in fresh processes.

    OMP_NUM_THREADS=1 python benchmarks/fsdp_vs_ddp.py --repeats 3 --limit-train 256 \\
        --out benchmarks/results/fsdp_vs_ddp_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtokd.models import create_model
from dtokd.train import load_config, loop, train
from dtokd.train.build import data_of
from dtokd.train.records import git_commit, machine

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "lm" / "stdlib_distill.yaml"
MODES = ("ddp", "fsdp")


def local_bytes(tensors) -> int:
    """Bytes of this rank's part of each tensor (a DTensor's local shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def held(parts) -> dict[str, int]:
    params = list(parts.task.parameters())
    state = [v for s in parts.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    teacher = list(parts.teacher.parameters()) if parts.teacher is not None else []
    return {
        "student_parameters": local_bytes(params),
        "student_gradients": local_bytes([p.grad for p in params if p.grad is not None]),
        "optimizer_state": local_bytes(state),
        "teacher_parameters": local_bytes(teacher),
    }


def worker(rank: int, world: int, mode: str, overrides: list[str], folder: str, init_file: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    captured = {}
    real = loop.build_parts

    def build(config, verbose):
        captured["parts"] = real(config, verbose)
        return captured["parts"]

    loop.build_parts = build
    try:
        out = Path(folder) / f"{mode}"
        train(load_config(CONFIG, [*overrides, f"parallel={mode}"]), out, progress=False, verbose=False)
        seconds = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["epoch_seconds"]
        result = {
            **held(captured["parts"]),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": seconds,
        }
        (Path(folder) / f"{mode}-rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit-train", type=int, default=256)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs: dict[str, list[list[dict]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        overrides = [
            "epochs=1",
            f"data.limit_train={args.limit_train}",
            "balancer.method=dto",
            "balancer.engine=exact",
            f"teacher.checkpoint={work / 'teacher.pt'}",
            "device=cpu",
        ]
        config = load_config(CONFIG, overrides)
        data = data_of(config)
        torch.manual_seed(0)
        teacher = create_model(config.teacher.name, data.num_classes, 1, data.image_size, config.teacher.kwargs)
        torch.save(teacher.state_dict(), work / "teacher.pt")
        os.environ["DTOKD_CACHE"] = str(work / "cache")  # the teacher measured in every run, alike
        for repeat in range(args.repeats):
            for mode in MODES:
                folder = work / f"{mode}{repeat}"
                folder.mkdir()
                mp.spawn(worker, args=(2, mode, overrides, str(folder), str(folder / "init")), nprocs=2, join=True)
                ranks = [json.loads((folder / f"{mode}-rank{r}.json").read_text()) for r in range(2)]
                runs[mode].append(ranks)
                print(f"repeat {repeat} {mode}: {[round(r['seconds'], 1) for r in ranks]} s", flush=True)
    summary = {}
    for mode in MODES:
        last = runs[mode][-1]
        summary[mode] = {
            **{key: max(r[key] for r in last) for key in last[0] if key not in ("seconds", "peak_rss")},
            "peak_rss_max_over_runs": max(r["peak_rss"] for ranks in runs[mode] for r in ranks),
            "seconds_per_epoch": [max(r["seconds"] for r in ranks) for ranks in runs[mode]],
        }
        summary[mode]["median_seconds"] = statistics.median(summary[mode]["seconds_per_epoch"])
    result = {
        "command": f"OMP_NUM_THREADS=1 python benchmarks/fsdp_vs_ddp.py --repeats {args.repeats} "
        f"--limit-train {args.limit_train} --out {args.out}",
        "commit": git_commit(),
        "machine": machine(),
        "per_rank_largest": summary,
        "fsdp_over_ddp_seconds": summary["fsdp"]["median_seconds"] / summary["ddp"]["median_seconds"],
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({mode: {k: v for k, v in s.items() if k != "seconds_per_epoch"} for mode, s in summary.items()}))
    print("fsdp / ddp seconds:", round(result["fsdp_over_ddp_seconds"], 2))


if __name__ == "__main__":
    main()
