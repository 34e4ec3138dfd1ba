"""Evaluation cadence: validation every N epochs (and the last), the test split once at the end on
the checkpoint chosen on validation and on the last model; nothing reports a figure that was not
measured; the teacher's accuracy check is computed once per teacher and data setting."""

import json

import pytest

from dtokd import cli
from dtokd.train import ConfigError, load_config, train
from dtokd.train import teacher as teacher_module

from helpers import interrupt_after

BASE = ["data.name=synthetic", "batch_size=32", "log_every=2", "eval_batch_size=64", "student.name=mlp_small"]


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _eval(folder, which, capsys):
    capsys.readouterr()
    assert cli.main(["eval", str(folder), "--which", which, "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


def test_validation_every_n_epochs_and_always_the_last(tmp_path):
    folder = tmp_path / "run"
    summary = train(load_config(None, BASE + ["epochs=7", "eval.every=3"]), folder, progress=False, verbose=False)
    rows = _rows(folder)
    assert [r["epoch"] + 1 for r in rows if "val_top1" in r] == [3, 6, 7]
    assert [r["epoch"] + 1 for r in rows if "test_top1" in r] == [3, 6, 7]  # eval.test=every: with validation
    assert all("train_loss" in r for r in rows) and len(rows) == 7
    evaluated = [r for r in rows if "val_top1" in r]
    best = max(range(len(evaluated)), key=lambda i: (evaluated[i]["val_top1"], i))
    assert summary["best_epoch"] == evaluated[best]["epoch"] + 1
    assert summary["best_test_top1"] == max(r["test_top1"] for r in evaluated)
    assert summary["eval_every"] == 3 and summary["test_evaluated"] == "every"


def test_test_split_once_at_the_end_on_the_chosen_and_the_last_model(tmp_path, capsys):
    folder = tmp_path / "run"
    summary = train(load_config(None, BASE + ["epochs=4", "eval.test=end"]), folder, progress=False, verbose=False)
    rows = _rows(folder)
    assert all("val_top1" in r for r in rows) and not any(k.startswith("test_") for r in rows for k in r)
    assert "best_test_top1" not in summary and summary["test_evaluated"] == "end"
    assert summary["test_top1_at_best_val"] == _eval(folder, "best", capsys)["top1"]
    assert summary["last_test_top1"] == _eval(folder, "last", capsys)["top1"]
    best = max(range(4), key=lambda i: (rows[i]["val_top1"], i))
    assert summary["best_epoch"] == best + 1


def test_a_resumed_run_with_the_test_at_the_end_gives_the_same_summary(tmp_path, monkeypatch):
    config = load_config(None, BASE + ["epochs=4", "eval.test=end", "eval.every=2"])
    straight = train(config, tmp_path / "straight", progress=False, verbose=False)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            train(config, tmp_path / "cut", progress=False, verbose=False)
    resumed = train(None, tmp_path / "cut", resume=True, progress=False, verbose=False)
    for key in ("best_epoch", "best_val_top1", "test_top1_at_best_val", "last_test_top1"):
        assert resumed[key] == straight[key], key


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.test=often", "eval.test='often' is not allowed; use one of ['every', 'end']"),
        ("eval.every=0", "eval.every=0 is not allowed; it must be an integer >= 1"),
        ("eval.every=two", "eval.every"),
    ],
)
def test_bad_cadence_is_refused_with_its_name(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, BASE + [override])


def test_the_test_at_the_end_needs_a_validation_split():
    with pytest.raises(ConfigError, match="data.val_fraction=0 leaves none"):
        load_config(None, BASE + ["eval.test=end", "data.val_fraction=0"])


def test_the_teacher_check_is_computed_once_per_teacher_and_data(tmp_path, monkeypatch):
    """Two runs (two cells of a matrix) with one teacher file and one data setting evaluate the
    teacher once; another seed (another validation split) or another teacher evaluates it anew."""
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))
    teacher_run = tmp_path / "teacher"
    train(load_config(None, BASE + ["student.name=cnn_small", "epochs=1"]), teacher_run, progress=False, verbose=False)
    calls = []
    real = teacher_module.measure_teacher

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(teacher_module, "measure_teacher", counting)  # where the teacher check calls it
    distil = BASE + [
        "epochs=1",
        "teacher.name=cnn_small",
        f"teacher.checkpoint={teacher_run / 'best.pt'}",
        "losses={distill: {type: kd}, task: {type: ce}}",
        "balancer.method=dto",
    ]
    first = train(load_config(None, distil + ["name=a"]), tmp_path / "a", progress=False, verbose=False)
    second = train(
        load_config(None, distil + ["name=b", "balancer.method=mean"]), tmp_path / "b", progress=False, verbose=False
    )
    assert len(calls) == 1 and first["teacher"] == second["teacher"]
    train(load_config(None, distil + ["seed=1"]), tmp_path / "c", progress=False, verbose=False)
    assert len(calls) == 2
    assert json.loads((tmp_path / "b" / "teacher.json").read_text()) == first["teacher"]
