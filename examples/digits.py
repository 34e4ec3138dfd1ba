"""What the classifier examples share: scikit-learn's digits (8x8 images, 10 classes, shipped
with scikit-learn: nothing downloaded) split 1,400 / 397, and a teacher MLP trained on it."""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn


class MLP(nn.Module):
    """64 -> width -> 10; ``forward(x)`` returns the logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(train_x, train_y), (test_x, test_y)``, pixels scaled to [0, 1], a seeded split."""
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return (x[order[:1400]], y[order[:1400]]), (x[order[1400:]], y[order[1400:]])


def trained_teacher(x: torch.Tensor, y: torch.Tensor, epochs: int) -> MLP:
    """A 256-wide MLP trained on ``(x, y)`` with Adam, batches of 64."""
    torch.manual_seed(0)
    teacher = MLP(256)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=3e-3)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(teacher(x[batch]), y[batch]).backward()
            optimizer.step()
    return teacher.eval()


def arguments(description: str) -> argparse.Namespace:
    """``--epochs`` (the student's, default 20) and ``--teacher-epochs`` (default 30)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--teacher-epochs", type=int, default=30)
    return parser.parse_args()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def report(
    where: str,
    teacher: nn.Module,
    student: nn.Module,
    test: tuple[torch.Tensor, torch.Tensor],
    weights: dict[str, float],
) -> None:
    """One line: both test accuracies and the last step's balancing weights."""
    print(
        f"teacher test accuracy {accuracy(teacher, *test):.3f}; "
        f"student (DTO-KD in {where}) {accuracy(student, *test):.3f}; "
        f"last step's weights: {', '.join(f'{k} {v:.2f}' for k, v in weights.items())}"
    )
