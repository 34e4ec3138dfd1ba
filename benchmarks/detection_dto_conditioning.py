"""What DTO's general-m rule does with a detector's many objectives (m = 2 to 8).

A detection student has several loss terms (FCOS: classification, box regression,
centerness) and one FPN-imitation objective per level (5 for a ResNet FPN): grouped as
the config says, the balancer sees m = 2 ... 8 objectives. For each grouping and several
batches, this computes the m per-objective gradients over every trainable parameter (student
and projectors) with ``torch.autograd.grad`` in float32, their Gram in float64, and the DTO
weights from :func:`dtokd.balancing.rules.dto`, and reports:

- ``cond(G)`` and ``cond(N^T G N)`` (N: an orthonormal basis of the directions summing to
  zero; the affine problem's matrix): how far the rule is from singular;
- ``max |pi|`` and ``sum |pi|`` of the weights (1 and 1 for a convex combination; larger
  means opposite-signed weights cancelling);
- ``||g*|| / min_i ||g_i||``: how short the common direction is against the objectives';
- the invariant's residual ``max_i |<g*, g_i> - ||g*||^2| / ||g*||^2`` (0 in exact arithmetic).

at the student's initialisation and after ``--train-steps`` steps of DTO training at m = 8.

    python benchmarks/detection_dto_conditioning.py --output benchmarks/results/detection_dto_conditioning
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from dtokd import make_balancer
from dtokd.balancing.rules import dto
from dtokd.data import build_data
from dtokd.models import create_model
from dtokd.tasks import DetectionTask
from dtokd.train.records import git_commit, machine

GROUPINGS = {  # m: loss specs
    2: {"det": {"type": "detector"}, "fpn": {"type": "fpn", "per_level": False}},
    4: {"det": {"type": "detector", "terms": "each"}, "fpn": {"type": "fpn", "per_level": False}},
    6: {"det": {"type": "detector"}, "fpn": {"type": "fpn"}},
    8: {"det": {"type": "detector", "terms": "each"}, "fpn": {"type": "fpn"}},
}


def measure(task: DetectionTask, batches: list, m: int) -> list[dict[str, float]]:
    params = [p for p in task.parameters() if p.requires_grad]
    rows = []
    for images, targets in batches:
        _, losses = task(images, targets)
        assert len(losses) == m, (list(losses), m)
        grads = []
        for k, loss in enumerate(losses.values()):
            parts = torch.autograd.grad(loss, params, retain_graph=k < m - 1, allow_unused=True)
            grads.append(
                torch.cat(
                    [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(parts, params)]
                ).double()
            )
        jac = torch.stack(grads)
        gram = jac @ jac.T
        pi = dto(gram)
        g_star = pi @ jac
        star = g_star.dot(g_star)
        basis = torch.linalg.qr(
            torch.cat([torch.ones(m, 1, dtype=torch.float64), torch.randn(m, m - 1, dtype=torch.float64)], 1)
        )[0][:, 1:]
        reduced = basis.T @ gram @ basis
        rows.append(
            {
                "cond_G": float(torch.linalg.cond(gram)),
                "cond_NtGN": float(torch.linalg.cond(reduced)),
                "max_abs_pi": float(pi.abs().max()),
                "sum_abs_pi": float(pi.abs().sum()),
                "gstar_over_min_norm": float(star.sqrt() / jac.norm(dim=1).min()),
                "invariant_residual": float(((jac @ g_star) - star).abs().max() / star),
                "negative_weights": int((pi < 0).sum()),
                **{f"pi/{name}": float(w) for name, w in zip(losses, pi)},
                **{f"norm/{name}": float(n) for name, n in zip(losses, jac.norm(dim=1))},
            }
        )
    return rows


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g} - {max(values):.3g}]"


def share_projectors(tasks: dict[int, DetectionTask]) -> None:
    """Every grouping measured with the m = 8 task's per-level projectors (same names in all)."""
    for task in tasks.values():
        task.projectors.load_state_dict(tasks[8].projectors.state_dict())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="detection:fcos_resnet18_fpn")
    parser.add_argument("--teacher", default="detection:retinanet_resnet18_fpn")
    parser.add_argument("--teacher-weights", help="a trained teacher (default: random weights)")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = build_data(
        "synthetic-coco",
        image_size=64,
        val_fraction=0.0,
        workers=0,
        augment=False,
        synthetic={"train_images": 600, "val_images": 150, "classes": 3, "max_objects": 4, "min_object": 8},
    )
    kwargs = {"anchor_scale": 0.25}
    student = create_model(args.student, data.num_classes, 3, 64, kwargs)
    teacher = create_model(args.teacher, data.num_classes, 3, 64, kwargs).eval().requires_grad_(False)
    if args.teacher_weights:
        from dtokd.models import load_weights

        load_weights(teacher, args.teacher_weights)
    loader = iter(data.train.train_batches(args.batch, 0, 0))
    batches = [next(loader) for _ in range(args.batches)]
    tasks = {m: DetectionTask(student, teacher, specs) for m, specs in GROUPINGS.items()}
    share_projectors(tasks)
    results = {"at initialisation": {m: measure(t, batches, m) for m, t in tasks.items()}}
    task = tasks[8]
    balancer = make_balancer("dto", [p for p in task.parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(task.parameters(), lr=1e-3, weight_decay=1e-4)
    for step in range(args.train_steps):
        images, targets = next(loader)
        optimizer.zero_grad()
        balancer.backward(task(images, targets)[1])
        optimizer.step()
    share_projectors(tasks)
    results[f"after {args.train_steps} DTO steps (m = 8)"] = {m: measure(t, batches, m) for m, t in tasks.items()}
    lines = [
        "# DTO's general-m rule on a detector's objectives",
        "",
        f"- commit `{git_commit()[:10]}`; machine: {machine()}; {datetime.now(timezone.utc):%Y-%m-%d}",
        f"- command: `python benchmarks/detection_dto_conditioning.py {' '.join(argv or sys.argv[1:])}`",
        f"- student {args.student}, teacher {args.teacher} "
        f"({'trained: ' + args.teacher_weights if args.teacher_weights else 'random weights'}); "
        f"synthetic COCO-format set, 64 px, batches of {args.batch}; medians over {args.batches} batches "
        "(min - max in brackets)",
        "",
    ]
    keys = [k for k in next(iter(results.values()))[2][0] if "/" not in k]
    for when, by_m in results.items():
        lines += [f"## {when}", "", "| m | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for m, rows in by_m.items():
            lines.append(f"| {m} | " + " | ".join(_spread([r[k] for r in rows]) for k in keys) + " |")
        lines += [
            "",
            "Per objective: DTO weight pi and gradient norm (median [min - max] over the batches):",
            "",
            "| m | objective | pi | norm of its gradient |",
            "|---|---|---|---|",
        ]
        for m, rows in by_m.items():
            for name in [k[3:] for k in rows[0] if k.startswith("pi/")]:
                lines.append(
                    f"| {m} | {name} | {_spread([r['pi/' + name] for r in rows])} | "
                    f"{_spread([r['norm/' + name] for r in rows])} |"
                )
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "results.md").write_text(text)
        (args.output / "results.json").write_text(
            json.dumps(
                {
                    "args": vars(args) | {"output": str(args.output)},
                    "commit": git_commit(),
                    "machine": machine(),
                    "results": {w: {str(m): r for m, r in v.items()} for w, v in results.items()},
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
