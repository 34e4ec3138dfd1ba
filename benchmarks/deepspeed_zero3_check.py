"""Whether dtokd's balancers work under DeepSpeed ZeRO-3, on the CPU: a student distilled for three
SGD steps by two processes (gloo, ``DS_ACCELERATOR=cpu``), each on half of every batch, against
one plain process on the whole batch. DeepSpeed is not a dependency of the project; install it
beside the environment first (no ops are built):

    pip install --target /tmp/dsdeps deepspeed hjson ninja py-cpuinfo msgpack pydantic einops
    for case in "dto representation" "dto-amortized exact" "dto exact"; do
      python benchmarks/deepspeed_zero3_check.py $case one
      PYTHONPATH=/tmp/dsdeps DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 2 \\
          benchmarks/deepspeed_zero3_check.py $case zero3
    done

Each ZeRO-3 rank prints the largest absolute difference of the student's weights (gathered)
from the one-process run's, or the error the balancer raised."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from dtokd import make_balancer
from dtokd.integrations.common import default_losses

STEPS, BATCH = 3, 16
REFERENCE = Path("/tmp/dtokd_zero3_one_process.pt")


def models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)), nn.Sequential(
        nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS * BATCH, 6, generator=g), torch.randint(0, 4, (STEPS * BATCH,), generator=g)


def main(method: str, engine: str, mode: str) -> None:
    options = {"update": "next-step"} if method == "dto-amortized" else {}
    losses_of = default_losses()
    x_all, y_all = data()
    student, teacher = models()
    if mode == "one":
        balancer = make_balancer(method, student.parameters(), engine=engine, **options)
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
        for step in range(STEPS):
            x, y = x_all[step * BATCH : (step + 1) * BATCH], y_all[step * BATCH : (step + 1) * BATCH]
            logits = student(x)
            with torch.no_grad():
                t = teacher(x)
            loss = balancer.combine(losses_of(logits, t, y), representation=logits)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            balancer.after_step(None)
        torch.save(student.state_dict(), REFERENCE)
        return
    dist.init_process_group("gloo")
    import deepspeed

    rank, half = dist.get_rank(), BATCH // 2
    config = {
        "train_micro_batch_size_per_gpu": half,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    }
    engine_ds, _, _, _ = deepspeed.initialize(
        model=student, model_parameters=student.parameters(), config=config, dist_init_required=False
    )
    balancer = make_balancer(method, engine_ds.module.parameters(), engine=engine, **options)
    try:
        for step in range(STEPS):
            rows = slice(step * BATCH + rank * half, step * BATCH + (rank + 1) * half)
            x, y = x_all[rows], y_all[rows]
            logits = engine_ds(x)
            with torch.no_grad():
                t = teacher(x)
            loss = balancer.combine(losses_of(logits, t, y), representation=logits)
            engine_ds.backward(loss)
            engine_ds.step()
            balancer.after_step(None)
    except ValueError as error:
        print(f"rank {rank} {method}/{engine}: refused: {error}", flush=True)
        return
    with deepspeed.zero.GatheredParameters(list(engine_ds.module.parameters())):
        got = {k: v.detach().clone() for k, v in engine_ds.module.state_dict().items()}
    want = torch.load(REFERENCE, weights_only=True)
    difference = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"rank {rank} {method}/{engine}: max |ZeRO-3 - one process| = {difference:.2e}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
