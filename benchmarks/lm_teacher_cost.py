"""What a language-model teacher costs a distillation run: seconds per training epoch with the
teacher live against the teacher given as its offline top-k outputs (``dtokd teacher-outputs``,
then ``teacher.outputs``), measured side by side in one process, alternately, on the stdlib pair
(``configs/lm/stdlib_distill.yaml``: a 4 x 256 Llama teacher, a 2 x 128 student, fixed KD 0.5).
The teacher's weights are seeded at random (its cost does not depend on them). The one-off cost
of writing the outputs is timed too, and the bytes they take per token are read from the files.

    OMP_NUM_THREADS=1 python benchmarks/lm_teacher_cost.py --repeats 3 --limit-train 512 --k 32 \\
        --out benchmarks/results/lm_teacher_cost
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dtokd.models import create_model
from dtokd.train import load_config, train
from dtokd.train.build import data_of
from dtokd.train.offline_outputs import write_run_teacher_outputs
from dtokd.train.records import git_commit, machine

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "lm" / "stdlib_distill.yaml"


def epoch_seconds(config, folder: Path) -> float:
    train(config, folder, progress=False, verbose=False)
    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["epoch_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit-train", type=int, default=512, help="training blocks per epoch")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        overrides = [
            "epochs=1",
            f"data.limit_train={args.limit_train}",
            "eval.every=1",
            "balancer.method=fixed",
            "balancer.options={weights: {distill: 0.5, task: 0.5}}",
            f"teacher.checkpoint={work / 'teacher.pt'}",
        ]
        config = load_config(CONFIG, overrides)
        data = data_of(config)
        torch.manual_seed(0)
        teacher = create_model(config.teacher.name, data.num_classes, 1, data.image_size, config.teacher.kwargs)
        torch.save(teacher.state_dict(), work / "teacher.pt")
        began = time.perf_counter()
        manifest = write_run_teacher_outputs(
            config, work / "outputs", k=args.k, dtype="float16", batch_size=None, overwrite=False
        )
        write_seconds = time.perf_counter() - began
        size = sum(shard.bytes for shard in manifest.shards)
        offline = load_config(CONFIG, [*overrides, f"teacher.outputs={work / 'outputs'}"])
        seconds: dict[str, list[float]] = {"live": [], "offline": []}
        for repeat in range(args.repeats):
            for mode, run_config in (("live", config), ("offline", offline)):
                seconds[mode].append(epoch_seconds(run_config, work / f"{mode}-{repeat}"))
                print(f"repeat {repeat} {mode}: {seconds[mode][-1]:.1f} s", flush=True)
    medians = {mode: statistics.median(values) for mode, values in seconds.items()}
    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/lm_teacher_cost.py "
        f"--repeats {args.repeats} --limit-train {args.limit_train} --k {args.k} --out {args.out}",
        "commit": git_commit(),
        "machine": machine(),
        "threads": torch.get_num_threads(),
        "training_blocks": args.limit_train,
        "block_length": manifest.block_length,
        "k": args.k,
        "seconds_per_epoch": seconds,
        "median": medians,
        "offline_over_live": medians["offline"] / medians["live"],
        "write_seconds": write_seconds,
        "outputs_bytes": size,
        "bytes_per_token": size / (manifest.num_blocks * manifest.block_length),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median", "offline_over_live", "write_seconds", "bytes_per_token")}))


if __name__ == "__main__":
    main()
