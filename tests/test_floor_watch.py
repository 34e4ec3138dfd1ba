"""The warning for a distillation loss near its floor taking the step of a rule on log losses:
the threshold against the records' own epochs (it must fire in the runs that failed that way
and stay silent in the runs that went well, and where a label loss took the step), hand-made
rows, and once a run through the training loop, a resumed run included."""

import json
import warnings
from pathlib import Path

import pytest

from dtokd.train import load_config, train
from dtokd.train.floor_watch import SHARE, FloorWarning, floor_warning

from helpers import interrupt_after

RECORDS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
BASE = ["data.name=synthetic", "batch_size=32", "log_every=2", "eval_batch_size=64"]


def first_warning(cell: str) -> str | None:
    """The first warning over a recorded cell's epochs (log losses: the rules these cells ran;
    the label loss is ``task``, ``det`` for the detector)."""
    for line in (RECORDS / cell / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        message = floor_warning(row, log_losses=True, method="m", epoch=row["epoch"], labels={"task", "det"})
        if message is not None:
            return message
    return None


@pytest.mark.parametrize(
    "cell, named",
    [
        ("fmnist_weak_teacher/cells/weak-mlp/dto-amortized/seed0", "distill"),  # followed a 57 % teacher down
        ("fmnist_weak_teacher/cells/weak-mlp/loss-size/seed0", "distill"),  # the same, by the loss-size baseline
        ("lm_stdlib/cells/llama4-llama2/dto-amortized/seed3", "distill"),  # forward KL: +2.5 perplexity
        ("synthetic_coco/cells/retinanet/dto-amortized/seed0", "fpn/p7"),  # 0.91 AP behind hand-set weights
    ],
)
def test_it_fires_in_the_recorded_runs_that_failed_so(cell, named):
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
        # a label loss took the step (0.87 on the task; 0.98-0.99 with the cross-entropy form): not warned
        "cifar10_cpu/cells/released/anchored/seed0",
        "fmnist_weak_teacher/cells/weak-mlp/dto-amortized-ce/seed0",
        "fmnist_weak_teacher/cells/strong-mlp/dto-amortized-ce/seed0",
    ],
)
def test_it_stays_silent_in_the_recorded_runs_that_went_well_or_dropped_the_teacher(cell):
    assert first_warning(cell) is None


def row(weights, losses):
    return {**{f"loss_weight/{n}": w for n, w in weights.items()}, **{f"loss/{n}": v for n, v in losses.items()}}


def warning(weights, losses, *, log_losses=True, labels=("task",)):
    return floor_warning(row(weights, losses), log_losses=log_losses, method="m", epoch=2, labels=labels)


def test_the_rule_by_hand():
    losses = {"distill": 0.01, "task": 0.5}
    message = warning({"distill": 0.9, "task": 0.1}, losses)
    assert message.startswith(
        "distill took 0.90 of the coefficients in epoch 3 at the smallest loss (0.01); task got 0.10"
    )
    assert warning({"distill": 0.9, "task": 0.1}, losses, log_losses=False) is None  # raw losses: not this mechanism
    assert warning({"distill": SHARE - 0.01, "task": 1 - SHARE + 0.01}, losses) is None
    # the largest share at a loss that is not the smallest is not the floor's doing
    assert warning({"distill": 0.9, "task": 0.1}, {"distill": 0.6, "task": 0.5}) is None
    # a label loss taking the step drops the teacher: not warned
    assert warning({"distill": 0.1, "task": 0.9}, {"distill": 0.6, "task": 0.01}) is None
    # without a label loss, or with only label losses, there is no teacher against labels to tell
    assert warning({"distill": 0.9, "task": 0.1}, losses, labels=()) is None
    assert warning({"distill": 0.9, "task": 0.1}, losses, labels=("distill", "task")) is None
    assert warning({"task": 1.0}, {"task": 0.1}) is None
    # shares of |c|: a negative coefficient counts by its size; a part NAME/part is its loss's
    assert warning({"distill": -0.95, "task": 0.05}, losses)
    parts = warning(
        {"det/cls": 0.02, "det/box": 0.03, "fpn": 0.95}, {"det/cls": 0.5, "det/box": 0.4, "fpn": 0.1}, labels=("det",)
    )
    assert parts.startswith("fpn took 0.95") and "det/cls, det/box got 0.05" in parts
    assert warning({"det/cls": 0.95, "fpn": 0.05}, {"det/cls": 0.05, "fpn": 0.1}, labels=("det",)) is None
    assert warning({"distill": float("nan"), "task": 0.1}, losses) is None
    three = warning({"token": 0.86, "feature": 0.1, "task": 0.04}, {"token": 0.2, "feature": 0.3, "task": 1.0})
    assert "feature, task got 0.14" in three


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "run"
    train(load_config(None, BASE + ["name=teacher", "student.name=cnn_small", "epochs=1"]), folder, progress=False)
    return folder / "best.pt"


FIXED = ["balancer.method=fixed", "balancer.options={weights: {distill: 0.9, task: 0.1}}"]


def copy_of_the_teacher(teacher, balancer, epochs=2):
    """A student started from its teacher's weights: the KL to it starts near 0, so a rule on
    log losses hands it the step (the mechanism, without waiting for a weak teacher to be matched)."""
    return BASE + [
        "name=copy",
        "student.name=cnn_small",
        f"student.weights={teacher}",
        f"epochs={epochs}",
        "teacher.name=cnn_small",
        f"teacher.checkpoint={teacher}",
        "losses={distill: {type: kd}, task: {type: ce}}",
        *balancer,
    ]


def floor_warnings(run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if issubclass(w.category, FloorWarning)]


@pytest.mark.parametrize("balancer, warns", [(["balancer.method=dto-amortized"], True), (FIXED, False)])
def test_a_run_warns_once_and_only_under_log_losses(teacher, tmp_path, balancer, warns):
    config = load_config(None, copy_of_the_teacher(teacher, balancer))
    floors = floor_warnings(lambda: train(config, tmp_path / "run", progress=False))
    assert len(floors) == (1 if warns else 0)
    if warns:
        assert floors[0].startswith("[copy] distill took ") and "in epoch 1 " in floors[0]


def test_a_resumed_run_does_not_warn_again(teacher, tmp_path, monkeypatch):
    config = load_config(None, copy_of_the_teacher(teacher, ["balancer.method=dto-amortized"], epochs=3))

    def interrupted_after_one_epoch():
        with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
            interrupt_after(patch, 1)
            train(config, tmp_path / "run", progress=False)

    assert len(floor_warnings(interrupted_after_one_epoch)) == 1
    assert floor_warnings(lambda: train(config, tmp_path / "run", resume=True, progress=False)) == []
