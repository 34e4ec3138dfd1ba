"""The warning for a loss near its floor taking the step of a rule on log losses: the threshold
against the records' own epochs (it must fire in the runs that failed and stay silent in the
runs that went well), hand-made rows, and once a run through the training loop."""

import json
import warnings
from pathlib import Path

import pytest

from dtokd.train import load_config, train
from dtokd.train.floor_watch import SHARE, FloorWarning, floor_warning

RECORDS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
BASE = ["data.name=synthetic", "batch_size=32", "log_every=2", "eval_batch_size=64"]


def first_warning(cell: str) -> str | None:
    """The first warning over a recorded cell's epochs (log losses: the rules these cells ran)."""
    for line in (RECORDS / cell / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        message = floor_warning(row, log_losses=True, method="dto-amortized", epoch=row["epoch"])
        if message is not None:
            return message
    return None


@pytest.mark.parametrize(
    "cell, named",
    [
        ("fmnist_weak_teacher/cells/weak-mlp/dto-amortized/seed0", "distill"),  # followed a 57 % teacher down
        ("lm_stdlib/cells/llama4-llama2/dto-amortized/seed3", "distill"),  # forward KL: +2.5 perplexity
        ("fmnist_weak_teacher/cells/strong-mlp/dto-amortized-ce/seed0", "task"),  # kept +0.49 of +1.33
    ],
)
def test_it_fires_in_the_recorded_runs_that_failed(cell, named):
    message = first_warning(cell)
    assert message is not None and message.startswith(f"{named} took ")


@pytest.mark.parametrize(
    "cell",
    [
        "cifar10_cpu/cells/released/dto-amortized/seed0",
        "cifar10_cpu/cells/finetuned/dto-amortized/seed0",
        "cifar10_vit_cpu/cells/released/dto-amortized/seed0",
        "fmnist_matrix/cells/cnn-mlp/dto-amortized/seed0",
        "lm_stdlib/cells/llama4-llama2/dto-amortized-ce/seed3",
    ],
)
def test_it_stays_silent_in_the_recorded_runs_that_went_well(cell):
    assert first_warning(cell) is None


def row(weights, losses):
    return {**{f"loss_weight/{n}": w for n, w in weights.items()}, **{f"loss/{n}": v for n, v in losses.items()}}


def test_the_rule_by_hand():
    losses = {"distill": 0.01, "task": 0.5}
    at = row({"distill": 0.9, "task": 0.1}, losses)
    message = floor_warning(at, log_losses=True, method="dto-amortized", epoch=2)
    assert message.startswith(
        "distill took 0.90 of the coefficients in epoch 3 at the smallest loss (0.01); task got 0.10"
    )
    assert floor_warning(at, log_losses=False, method="fixed", epoch=2) is None  # raw losses: not this mechanism
    below = row({"distill": SHARE - 0.01, "task": 1 - SHARE + 0.01}, losses)
    assert floor_warning(below, log_losses=True, method="dto-amortized", epoch=0) is None
    # the largest share at a loss that is not the smallest is not the floor's doing
    assert (
        floor_warning(
            row({"distill": 0.9, "task": 0.1}, {"distill": 0.6, "task": 0.5}), log_losses=True, method="m", epoch=0
        )
        is None
    )
    # shares of |c|: a negative coefficient counts by its size
    assert floor_warning(row({"distill": -0.95, "task": 0.05}, losses), log_losses=True, method="m", epoch=0)
    assert floor_warning(row({"task": 1.0}, {"task": 0.1}), log_losses=True, method="m", epoch=0) is None
    nan = row({"distill": float("nan"), "task": 0.1}, losses)
    assert floor_warning(nan, log_losses=True, method="m", epoch=0) is None
    three = row({"token": 0.86, "feature": 0.1, "task": 0.04}, {"token": 0.2, "feature": 0.3, "task": 1.0})
    assert "feature, task got 0.14" in floor_warning(three, log_losses=True, method="m", epoch=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "run"
    train(load_config(None, BASE + ["name=teacher", "student.name=cnn_small", "epochs=1"]), folder, progress=False)
    return folder / "best.pt"


FIXED = ["balancer.method=fixed", "balancer.options={weights: {distill: 0.9, task: 0.1}}"]


@pytest.mark.parametrize("balancer, warns", [(["balancer.method=dto-amortized"], True), (FIXED, False)])
def test_a_run_warns_once_and_only_under_log_losses(teacher, tmp_path, balancer, warns):
    """A student started from its teacher's weights: the KL to it starts near 0, so a rule on
    log losses hands it the step (the mechanism, without waiting for a weak teacher to be matched)."""
    overrides = BASE + [
        "name=copy",
        "student.name=cnn_small",
        f"student.weights={teacher}",
        "epochs=2",
        "teacher.name=cnn_small",
        f"teacher.checkpoint={teacher}",
        "losses={distill: {type: kd}, task: {type: ce}}",
        *balancer,
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(load_config(None, overrides), tmp_path / "run", progress=False)
    floors = [w for w in caught if issubclass(w.category, FloorWarning)]
    assert len(floors) == (1 if warns else 0)
    if warns:
        assert str(floors[0].message).startswith("[copy] distill took ")
