"""The paper's ImageNet setting, costed: one DeiT step with three objectives, and the streaming
loader that feeds it.

1. Step time: a distilled DeiT student (``--student``, DeiT-Ti by default) and a teacher
   (``--teacher``, RegNetY-160) at ``--image-size`` px, three objectives (CE on the class head,
   DeiT's soft token loss, VkD's feature loss through an orthogonal projector), through
   :class:`dtokd.tasks.ClassificationTask` as the trainer runs it. Methods, interleaved round
   by round, median of the rounds (each ``--steps`` consecutive steps, one wait at the end):
   the plain weighted sum (one backward), the three-backward floor (what any exact method
   pays), exact DTO, DTO through the representation engine at the final normalised tokens,
   amortized DTO (next-step, deferred checks).
2. Loader throughput: ``--loader-images`` generated JPEGs at the image size, read through the
   DeiT training transform (RandAugment, random erasing) by ``--workers`` loader processes;
   images per second, against the step's images per second.

    python benchmarks/vit_step_time.py --device cuda --amp bf16 --batch 128 --workers 4 8 16 \
        --output benchmarks/results/vit_step_time_h100
    python benchmarks/vit_step_time.py --teacher timm:resnet10t --batch 4 --image-size 64 --rounds 2 --steps 1 \
        --workers 0 1 --loader-images 40        # a CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from dtokd import make_balancer
from dtokd.models import create_model
from dtokd.tasks import ClassificationTask
from dtokd.train.distributed import resolve_device
from dtokd.train.records import git_commit, machine

LOSSES = {
    "token": {"type": "deit", "mode": "soft"},
    "feature": {"type": "feature", "student_tap": "patch_mean", "teacher_tap": "features"},
    "task": {"type": "ce"},
}


def make_steps(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, Callable[[], None]], int]:
    torch.manual_seed(0)
    kwargs = {"img_size": args.image_size}
    student = create_model(args.student, 1000, 3, args.image_size, kwargs).to(device)
    teacher = create_model(args.teacher, 1000, 3, args.image_size).to(device).eval()
    sample = torch.randn(2, 3, args.image_size, args.image_size, device=device)
    task = ClassificationTask(student, teacher, LOSSES, sample).to(device)
    task_norm = ClassificationTask(student, teacher, LOSSES, sample, representation="norm").to(device)
    params = list(task.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    amp = torch.bfloat16 if args.amp == "bf16" else None

    def forward(which: ClassificationTask):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return which(x, y)

    def weighted_sum() -> None:
        optimizer.zero_grad(set_to_none=True)
        _, losses = forward(task)
        sum(losses.values()).backward()
        optimizer.step()

    def floor() -> None:
        optimizer.zero_grad(set_to_none=True)
        _, losses = forward(task)
        total = sum(losses.values())
        total.backward(retain_graph=True)
        total.backward(retain_graph=True)
        total.backward()
        optimizer.step()

    def balanced(method: str, which: ClassificationTask, **options) -> Callable[[], None]:
        balancer = make_balancer(method, params, **options)
        representation = options.get("engine") == "representation"

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            z, losses = forward(which)
            balancer.backward(losses, representation=z if representation else None)
            optimizer.step()

        return step

    steps = {
        "weighted sum (1 backward)": weighted_sum,
        "three-backward floor": floor,
        "DTO exact": balanced("dto", task),
        "DTO representation (final norm)": balanced("dto", task_norm, engine="representation"),
        "DTO amortized, next-step, deferred checks": balanced(
            "dto-amortized", task, update="next-step", deferred_checks=True
        ),
    }
    return steps, sum(p.numel() for p in student.parameters())


def time_steps(args: argparse.Namespace, device: torch.device) -> tuple[dict[str, list[float]], int]:
    steps, parameters = make_steps(args, device)
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            _sync(device)
            times[name].append((time.perf_counter() - start) / args.steps)
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    return times, parameters


def loader_throughput(args: argparse.Namespace) -> dict[int, float]:
    """Images per second through the streaming loader with the DeiT transform, per worker count."""
    from dtokd.data import build_data, train_loader
    from dtokd.data.fake import write_fake_image_folder

    result = {}
    with tempfile.TemporaryDirectory() as scratch:
        per_class = max(1, args.loader_images // 10)
        root = write_fake_image_folder(
            Path(scratch), classes=10, per_class={"train": per_class, "val": 1}, image_size=args.image_size
        )
        for workers in args.workers:
            data = build_data(
                "image-folder-stream",
                str(root),
                val_fraction=0.0,
                image_size=args.image_size,
                transform={"auto_augment": "rand-m9-mstd0.5-inc1-mmax9", "re_prob": 0.25, "interpolation": "bicubic"},
                workers=workers,
            )
            loader = train_loader(data.train, args.batch, seed=0, epoch=0)
            start, count = time.perf_counter(), 0
            for x, _ in loader:
                count += x.shape[0]
            result[workers] = count / (time.perf_counter() - start)
            print(f"loader, {workers} workers: {result[workers]:.0f} images/s", file=sys.stderr, flush=True)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="timm:deit_tiny_distilled_patch16_224")
    parser.add_argument("--teacher", default="timm:regnety_160")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="none", choices=("none", "bf16"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--loader-images", type=int, default=2000)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    device = resolve_device(args.device)
    times, parameters = time_steps(args, device)
    loader = loader_throughput(args)
    medians = {k: statistics.median(v) for k, v in times.items()}
    plain, floor = medians["weighted sum (1 backward)"], medians["three-backward floor"]
    record = {
        "command": "python " + " ".join(sys.argv),
        "commit": git_commit(),
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "torch": torch.__version__,
        "student_parameters": parameters,
        "times": times,
        "medians": medians,
        "loader_images_per_second": loader,
        "args": vars(args),
    }
    lines = [
        "# DeiT step with three objectives, and the streaming loader",
        "",
        f"- command: `{record['command']}`",
        f"- commit `{record['commit'][:10]}`; {record['machine']}",
        f"- {record['date']}; {args.student} ({parameters / 1e6:.1f} M parameters) from {args.teacher}; "
        f"{args.image_size} px; batch {args.batch}; amp {args.amp}; median of {args.rounds} rounds x {args.steps} "
        "consecutive steps, methods interleaved",
        "",
        "| method | step (ms) | images/s | / weighted sum | / three-backward floor |",
        "|---|---|---|---|---|",
    ]
    for name, median in medians.items():
        lines.append(
            f"| {name} | {1000 * median:.1f} | {args.batch / median:.0f} | {median / plain:.3f} | "
            f"{median / floor:.3f} |"
        )
    lines += [
        "",
        "| loader workers | images/s (DeiT training transform) | / the weighted-sum step's images/s |",
        "|---|---|---|",
    ]
    for workers, rate in loader.items():
        lines.append(f"| {workers} | {rate:.0f} | {rate / (args.batch / plain):.2f} |")
    stem = Path(args.output) if args.output else Path(__file__).parent / "results" / f"vit_step_time_{device.type}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
