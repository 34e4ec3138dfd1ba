"""Epoch time of whole training runs: the dtokd trainer against a minimal hand-written KD loop.

Every row trains the same student on the same data from the same teacher for ``--epochs``
epochs; the figure is the median training time per epoch over the epochs after the first
(the first holds warm-up and compilation) and over ``--repeats`` rounds, rows interleaved
round by round. Evaluation is not timed. Rows:

- ``hand-written KD loop``: what a user would write in plain PyTorch: the training images as
  one uint8 tensor on the device, a permutation per epoch, normalisation, per-image random crop
  (padding 4) and flip as batched tensor ops, teacher under ``no_grad``, ``0.9 KD + 0.1 CE``,
  one backward, SGD;
- the trainer (``dtokd distill``) with fixed KD weights (the same objective), DTO through the
  representation engine, amortized DTO (same-batch as the paper, and next-step), exact DTO, and
  CUDA graphs (``compile=reduce-overhead``) for fixed KD and DTO-representation (CUDA only).

Ratios are throughput ratios against the hand-written loop and against the trainer's fixed KD,
measured side by side in one process on one device.

    python benchmarks/trainer_throughput.py --data ../shared/data/cifar10-jpeg.tar.gz --device cuda \
        --amp bf16 --batch 256 --epochs 3 --repeats 2 --output benchmarks/results/trainer_throughput_h100
    python benchmarks/trainer_throughput.py --data ../shared/data/cifar10-jpeg.tar.gz --limit-train 4000 \
        --epochs 2 --repeats 1 --batch 128          # a short CPU run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from dtokd.data import build_data
from dtokd.models import create_model
from dtokd.train import load_config, train
from dtokd.train.distributed import resolve_device
from dtokd.train.records import git_commit, machine

TRAINER_ROWS = {
    "trainer: fixed KD 0.9/0.1": ["balancer.method=fixed", "balancer.options={weights: {distill: 0.9, task: 0.1}}"],
    "trainer: DTO representation": ["balancer.method=dto", "balancer.engine=representation"],
    "trainer: DTO amortized, same-batch (paper)": ["balancer.method=dto-amortized"],
    "trainer: DTO amortized, next-step": ["balancer.method=dto-amortized", "balancer.options={update: next-step}"],
    "trainer: DTO exact": ["balancer.method=dto"],
    "trainer: fixed KD, CUDA graphs": [
        "balancer.method=fixed",
        "balancer.engine=representation",
        "balancer.options={weights: {distill: 0.9, task: 0.1}}",
        "compile=reduce-overhead",
    ],
    "trainer: DTO representation, CUDA graphs": [
        "balancer.method=dto",
        "balancer.engine=representation",
        "compile=reduce-overhead",
    ],
}
HAND = "hand-written KD loop"


def hand_written_epochs(args: argparse.Namespace, device: torch.device, teacher_path: Path) -> list[float]:
    """The minimal plain-PyTorch KD loop; returns its training seconds per epoch."""
    data = build_data("image-folder", args.data, val_fraction=0.1, seed=0, limit_train=args.limit_train)
    images = data.train.images.to(device)
    n = images.shape[0]
    mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1)
    labels = data.train.labels.to(device)
    torch.manual_seed(0)
    student = create_model(args.student, data.num_classes).to(device)
    teacher = create_model(args.teacher, data.num_classes).to(device).eval()
    from dtokd.models.foreign import remap_keys

    teacher.load_state_dict(remap_keys(torch.load(teacher_path, weights_only=True), "cifar-resnet-chenyaofo"))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    rows = torch.arange(32, device=device)
    seconds = []
    for _ in range(args.epochs):
        _sync(device)
        start = time.perf_counter()
        order = torch.randperm(n, device=device)
        for k in range(n // args.batch):
            idx = order[k * args.batch : (k + 1) * args.batch]
            x = (images[idx].float() / 255 - mean) / std
            padded = F.pad(x, (4, 4, 4, 4))
            dy, dx = torch.randint(0, 9, (2, idx.shape[0], 1), device=device)
            x = padded.permute(0, 2, 3, 1)[
                torch.arange(idx.shape[0], device=device)[:, None, None],
                (dy + rows)[:, :, None],
                (dx + rows)[:, None, :],
            ].permute(0, 3, 1, 2)
            x = torch.where(torch.rand(idx.shape[0], 1, 1, 1, device=device) < 0.5, x.flip(3), x)
            y = labels[idx]
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                with torch.no_grad():
                    t = teacher(x)
                s = student(x)
            kd = F.kl_div(F.log_softmax(s.float() / 4, 1), F.softmax(t.float() / 4, 1), reduction="batchmean") * 16
            loss = 0.9 * kd + 0.1 * F.cross_entropy(s.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.2010]


def trainer_epochs(args: argparse.Namespace, overrides: list[str], teacher_path: Path, folder: Path) -> list[float]:
    config = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "cifar10_resnet56_resnet20.yaml",
        [
            f"data.root={args.data}",
            f"epochs={args.epochs}",
            f"batch_size={args.batch}",
            f"amp={args.amp}",
            f"device={args.device}",
            f"student.name={args.student}",
            f"teacher.name={args.teacher}",
            f"teacher.checkpoint={teacher_path}",
            f"data.limit_train={args.limit_train}",
            "log_every=1000000",
            *overrides,
        ],
    )
    train(config, folder, progress=False)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row["epoch_seconds"] for row in rows]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CIFAR-10 (JPEG) image folder or .tar.gz")
    parser.add_argument(
        "--teacher-weights",
        default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "teachers" / "cifar10_resnet56.pth"),
    )
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="none", choices=("none", "bf16"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--rows", default="all", help="';'-separated row names, or 'all'")
    parser.add_argument(
        "--output", default=None, help="results stem (default: benchmarks/results/trainer_throughput_<device>)"
    )
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is warm-up)")
    device = resolve_device(args.device)
    rows = [HAND, *TRAINER_ROWS] if args.rows == "all" else [r.strip() for r in args.rows.split(";")]
    if device.type != "cuda":
        rows = [r for r in rows if "CUDA graphs" not in r]
    unknown = [r for r in rows if r != HAND and r not in TRAINER_ROWS]
    if unknown:
        parser.error(f"unknown row(s) {unknown}; available: {[HAND, *TRAINER_ROWS]}")
    teacher_path = Path(args.teacher_weights)
    seconds: dict[str, list[float]] = {r: [] for r in rows}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            for row in rows:
                if row == HAND:
                    epochs = hand_written_epochs(args, device, teacher_path)
                else:
                    epochs = trainer_epochs(
                        args,
                        TRAINER_ROWS[row],
                        teacher_path,
                        Path(scratch) / f"{repeat}-{len(seconds[row])}-{rows.index(row)}",
                    )
                seconds[row] += epochs[1:]
                print(
                    f"[{repeat + 1}/{args.repeats}] {row}: {', '.join(f'{s:.2f}' for s in epochs)} s/epoch",
                    file=sys.stderr,
                    flush=True,
                )
    medians = {r: statistics.median(v) for r, v in seconds.items()}
    fixed = medians.get("trainer: fixed KD 0.9/0.1")
    record = {
        "command": "python " + " ".join(sys.argv),
        "commit": git_commit(),
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "torch": torch.__version__,
        "batch": args.batch,
        "amp": args.amp,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "limit_train": args.limit_train,
        "seconds_per_epoch": seconds,
        "median_seconds_per_epoch": medians,
    }
    lines = [
        "# Epoch time: the dtokd trainer against a hand-written KD loop",
        "",
        f"- command: `{record['command']}`",
        f"- commit `{record['commit'][:10]}`; {record['machine']}; torch {torch.__version__}",
        f"- {record['date']}; device {device}; batch {args.batch}; amp {args.amp}; {args.student} from {args.teacher}; "
        f"median training seconds per epoch over epochs 2..{args.epochs} x {args.repeats} round(s), rows interleaved",
        "",
        "| row | s / epoch (median) | throughput / hand-written loop | time / trainer fixed KD |",
        "|---|---|---|---|",
    ]
    for row, median in medians.items():
        vs_hand = medians[HAND] / median if HAND in medians else float("nan")
        vs_fixed = median / fixed if fixed else float("nan")
        lines.append(f"| {row} | {median:.3f} | {vs_hand:.3f} | {vs_fixed:.3f} |")
    stem = Path(args.output) if args.output else Path(__file__).parent / "results" / f"trainer_throughput_{device.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
