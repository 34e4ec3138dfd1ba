"""``dtokd bench MATRIX --dry-run``: what a run would do, read from the output folder's files
(made by hand here: nothing trains), and nothing created or written."""

import json
import os

import yaml

from dtokd import cli
from dtokd.bench import cell_config, load_matrix
from dtokd.interrupts import folder_holder, hold_folder, release_folder
from dtokd.train.config import to_dict

from helpers import TINY_METHODS, write_tiny_matrix


def files_under(folder):
    return sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*")) if folder.exists() else []


def dry_run(matrix, out, capsys, *extra):
    before = files_under(out)
    assert cli.main(["bench", matrix, "--out", str(out), "--dry-run", *extra]) == 0
    assert files_under(out) == before  # read only
    return capsys.readouterr().out.splitlines()


def cell(out, method, seed, **files):
    folder = out / "cnn-mlp" / method / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)
    return folder


def test_a_dry_run_says_each_cells_state_and_runs_nothing(tmp_path, capsys):
    matrix = write_tiny_matrix(tmp_path, TINY_METHODS)
    out = tmp_path / "out"
    lines = dry_run(matrix, out, capsys)
    assert not out.exists()
    assert (
        lines[0]
        == f"teacher of pair(s) cnn-mlp: {out / 'teachers' / 'cnn_small'}: to train (seed 0, from teacher_config)"
    )
    assert "cell cnn-mlp kd-fixed 0: to run" in lines
    assert "cell cnn-mlp kd-grid-a0.5 1: waits for the grid (runs if the grid chooses it on seed 0)" in lines
    assert lines[-1] == "in all: 7 to run, 1 waits for the grid; nothing was run"

    teacher = out / "teachers" / "cnn_small"
    teacher.mkdir(parents=True)
    (teacher / "checkpoint.pt").write_bytes(b"")
    (teacher / "metrics.jsonl").write_text('{"epoch": 0}\n')
    assert dry_run(matrix, out, capsys)[0].endswith(": resumes from its last checkpoint")
    (teacher / "summary.json").write_text("{}")
    assert dry_run(matrix, out, capsys)[0].endswith(": trained")

    # the grid chose the reference on seed 0; one cell resumable, one saved with another configuration
    # (a run's resume refuses it), one diverged, one held by a process
    cell(out, "kd-fixed", 0, summary_json=json.dumps({"metric": "top1", "best_val_top1": 60.0}))
    cell(out, "kd-grid-a0.5", 0, summary_json=json.dumps({"metric": "top1", "best_val_top1": 50.0}))
    loaded = load_matrix(matrix)

    def saved_config(method, seed):
        return yaml.safe_dump(to_dict(cell_config(loaded, "cnn-mlp", method, seed, teacher / "best.pt")))

    cell(out, "dto", 0, checkpoint_pt="", config_yaml=saved_config("dto", 0))
    cell(out, "blowup", 1, checkpoint_pt="", config_yaml=saved_config("kd-fixed", 1))
    cell(out, "blowup", 0, diverged_json=json.dumps({"error": "loss/distill is nan", "epochs_completed": 0}))
    held = hold_folder(cell(out, "dto", 1))
    try:
        assert folder_holder(out / "cnn-mlp" / "dto" / "seed1") == str(os.getpid())
        lines = dry_run(matrix, out, capsys)
    finally:
        release_folder(held)
    assert folder_holder(out / "cnn-mlp" / "dto" / "seed1") is None
    states = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in lines if line.startswith("cell ")}
    blowup = states.pop("cell cnn-mlp blowup 1")
    assert blowup.startswith("cannot resume (a run would stop here: name: saved 'kd-fixed', given 'blowup'")
    assert "optim.lr: saved 0.05, given 1000000000000.0" in blowup
    assert states == {
        "cell cnn-mlp kd-fixed 0": "finished",
        "cell cnn-mlp kd-grid-a0.5 0": "finished",
        "cell cnn-mlp dto 0": "resumes (from its last checkpoint)",
        "cell cnn-mlp blowup 0": "diverged (loss/distill is nan)",
        "cell cnn-mlp kd-fixed 1": "to run",
        "cell cnn-mlp kd-grid-a0.5 1": "skipped (the grid chose kd-fixed on seed 0)",
        "cell cnn-mlp dto 1": f"running (pid {os.getpid()}: a run now would stop at this cell)",
    }
    assert lines[-1] == (
        "in all: 2 finished, 1 resumes, 1 diverged, 1 to run, 1 skipped, 1 running, 1 cannot resume; nothing was run"
    )
    # a selection plans only its cells
    assert [line for line in dry_run(matrix, out, capsys, "--methods", "dto") if line.startswith("cell ")] == [
        "cell cnn-mlp dto 0: resumes (from its last checkpoint)",
        "cell cnn-mlp dto 1: to run",
    ]


def test_a_dry_run_refuses_what_a_run_refuses_and_aggregate_only(tmp_path, capsys):
    matrix = write_tiny_matrix(tmp_path, TINY_METHODS + "\n  broken: [balancer.method=no-such-rule]")
    assert cli.main(["bench", matrix, "--out", str(tmp_path / "out"), "--dry-run"]) != 0
    assert "cell cnn-mlp broken seed 0" in capsys.readouterr().err
    matrix = write_tiny_matrix(tmp_path, TINY_METHODS)
    assert cli.main(["bench", matrix, "--out", str(tmp_path / "out"), "--dry-run", "--aggregate-only"]) != 0
    assert "--dry-run and --aggregate-only: give one" in capsys.readouterr().err
    assert (
        cli.main(["bench", matrix, "--out", str(tmp_path / "out"), "--dry-run", "--cell", "cnn-mlp", "dto", "0"]) != 0
    )
    assert "--dry-run and --cell: give one" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
