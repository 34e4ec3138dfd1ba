"""The ``dtokd`` command."""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn


def _balancing_demo() -> None:
    """A few DTO steps on a tiny regression with two conflicting objectives."""
    from dtokd import make_balancer

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(64, 4)
    a, b = x @ torch.tensor([1.0, 2.0, 0.0, 0.0]), x @ torch.tensor([1.0, -2.0, 0.0, 0.0])
    balancer = make_balancer("dto", model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(5):
        optimizer.zero_grad()
        y = model(x).squeeze(1)
        info = balancer.backward({"distill": (y - a).pow(2).mean(), "task": (y - b).pow(2).mean()})
        optimizer.step()
        print(f"step {step}: losses {info.losses} weights {info.weights} conflict {info.conflict:+.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dtokd", description="Knowledge distillation with DTO-KD balancing")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo")
    args = parser.parse_args(argv)
    if args.command == "demo":
        _balancing_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
