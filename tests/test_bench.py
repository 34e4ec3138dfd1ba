"""The accuracy-matrix runner on tiny synthetic data: runs, resumes a partial matrix, aggregates."""

import csv
import json
from pathlib import Path

import pytest

from dtokd import cli
from dtokd.bench import grid_choice, load_matrix

from helpers import TINY_METHODS, write_tiny_matrix

pytestmark = pytest.mark.slow


def test_bench_runs_resumes_and_aggregates(tmp_path, capsys):
    # a grid member that cannot win (it barely moves): the first seed chooses another, so it runs once
    hopeless = (
        "  kd-grid-still: [balancer.method=fixed, 'balancer.options={weights: {distill: 0.9, task: 0.1}}', "
        "optim.lr=1.0e-9]"
    )
    matrix = write_tiny_matrix(tmp_path, TINY_METHODS + "\n" + hopeless)
    out = tmp_path / "out"
    assert cli.main(["bench", matrix, "--out", str(out)]) == 0
    log = capsys.readouterr().out
    choice = grid_choice(load_matrix(matrix), out / "cnn-mlp")
    assert choice in ("kd-fixed", "kd-grid-a0.5")
    assert f"skipped cnn-mlp kd-grid-still seed 1: the 'kd-grid' grid chose {choice} on seed 0" in log
    assert (out / "cnn-mlp" / "kd-grid-still" / "seed0" / "summary.json").is_file()
    assert not (out / "cnn-mlp" / "kd-grid-still" / "seed1").exists()
    for method in {"kd-fixed", choice}:  # the reference and the choice run every seed
        assert (out / "cnn-mlp" / method / "seed1" / "summary.json").is_file()
    summary = out / "cnn-mlp" / "dto" / "seed1" / "summary.json"
    first = json.loads(summary.read_text())
    # a killed cell: remove its summary; rerunning finishes it from its checkpoint, the rest is skipped
    summary.unlink()
    capsys.readouterr()
    assert cli.main(["bench", matrix, "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "dto seed 1" in log and "kd-fixed seed 0" not in log
    assert json.loads(summary.read_text())["last_test_top1"] == first["last_test_top1"]
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert {"dto", "kd-grid-a0.5"} <= {m.split(" ")[0] for m in rows}
    assert sum("(tuned on val)" in m for m in rows) == 1
    dto = rows["dto"]
    assert int(dto["seeds"]) == 2 and float(dto["time_vs_reference"]) > 0
    summaries = [json.loads((out / "cnn-mlp" / "dto" / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
    assert float(dto["last_test_top1"]) == pytest.approx(sum(s["last_test_top1"] for s in summaries) / 2)
    assert -1 <= float(dto["conflict"]) <= 1
    reference = [json.loads((out / "cnn-mlp" / "kd-fixed" / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
    differences = [a["test_top1_at_best_val"] - b["test_top1_at_best_val"] for a, b in zip(summaries, reference)]
    assert float(dto["paired_vs_reference"]) == pytest.approx(sum(differences) / 2) and int(dto["paired_seeds"]) == 2
    tuned = [json.loads((out / "cnn-mlp" / choice / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
    versus = [a["test_top1_at_best_val"] - b["test_top1_at_best_val"] for a, b in zip(summaries, tuned)]
    assert float(dto["paired_vs_tuned"]) == pytest.approx(sum(versus) / 2) and int(dto["paired_tuned_seeds"]) == 2
    assert rows[f"{choice} (tuned on val)"]["seeds"] == "2" and rows["kd-grid-still"]["seeds"] == "1"
    text = (out / "results.md").read_text()
    assert "| cnn-mlp | dto |" in text and "accuracy_cnn-mlp.png" in text
    assert int(rows["blowup"]["diverged"]) == 2 and int(rows["blowup"]["seeds"]) == 0
    assert "blowup (**2 of 2 seeds diverged**" in text
    assert (out / "cnn-mlp" / "blowup" / "seed0" / "diverged.json").is_file()
    for png in ("accuracy_cnn-mlp.png", "cost_cnn-mlp.png", "weights_cnn-mlp.png"):
        assert (out / png).stat().st_size > 1000
    # with a grid member's first seed not finished nothing was chosen: no row says it was tuned
    (out / "cnn-mlp" / "kd-grid-a0.5").rename(tmp_path / "set-aside")
    assert cli.main(["bench", matrix, "--out", str(out), "--aggregate-only"]) == 0
    assert "(tuned on val)" not in (out / "results.md").read_text()
    # an unfinished cell counts nowhere: neither its accuracy nor its logged steps
    (out / "cnn-mlp" / "dto" / "seed1" / "summary.json").unlink()
    assert cli.main(["bench", matrix, "--out", str(out), "--aggregate-only"]) == 0
    with open(out / "results.csv") as f:
        dto = next(r for r in csv.DictReader(f) if r["method"] == "dto")
    seed0 = [json.loads(line) for line in (out / "cnn-mlp" / "dto" / "seed0" / "steps.jsonl").read_text().splitlines()]
    assert int(dto["seeds"]) == 1
    expected = sum(row["loss_weight/distill"] for row in seed0) / len(seed0)
    assert float(dto["loss_weight/distill"]) == pytest.approx(expected)


def test_a_run_without_a_teacher_runs_once_for_the_pairs_that_share_it(tmp_path, capsys):
    alone = (
        "  alone: [teacher.name=null, teacher.checkpoint=null, 'losses={task: {type: ce}}', balancer.method=fixed, "
        "'balancer.options={weights: {task: 1.0}}']"
    )
    matrix = Path(write_tiny_matrix(tmp_path, TINY_METHODS.splitlines()[0] + "\n" + alone))
    two_pairs = (
        "pairs: {cnn-mlp: {teacher: cnn_small, student: mlp_small}, mlp-mlp: {teacher: mlp_small, student: mlp_small}}"
    )
    text = matrix.read_text().replace("pairs: {cnn-mlp: {teacher: cnn_small, student: mlp_small}}", two_pairs)
    matrix.write_text(text.replace("seeds: [0, 1]", "seeds: [0]").replace("epochs=3", "epochs=1"))
    out = tmp_path / "out"
    assert cli.main(["bench", str(matrix), "--out", str(out)]) == 0
    assert "mlp-mlp alone 0 is the run of pair 'cnn-mlp'" in capsys.readouterr().out
    assert (out / "cnn-mlp" / "alone" / "seed0" / "summary.json").is_file()
    assert (out / "mlp-mlp" / "kd-fixed" / "seed0" / "summary.json").is_file()
    assert not (out / "mlp-mlp" / "alone").exists()
    with open(out / "results.csv") as f:
        rows = {(r["pair"], r["method"]): r for r in csv.DictReader(f)}
    shared, own = rows[("mlp-mlp", "alone (run in cnn-mlp)")], rows[("cnn-mlp", "alone")]
    assert shared["test_top1_at_best_val"] == own["test_top1_at_best_val"]
    kd = json.loads((out / "mlp-mlp" / "kd-fixed" / "seed0" / "summary.json").read_text())
    expected = float(own["test_top1_at_best_val"]) - kd["test_top1_at_best_val"]
    assert float(shared["paired_vs_reference"]) == pytest.approx(expected)


def test_a_cell_without_a_teacher_neither_waits_for_nor_trains_one(tmp_path, capsys):
    alone = (
        "  alone: [teacher.name=null, teacher.checkpoint=null, 'losses={task: {type: ce}}', balancer.method=fixed, "
        "'balancer.options={weights: {task: 1.0}}']"
    )
    matrix = Path(write_tiny_matrix(tmp_path, TINY_METHODS.splitlines()[0] + "\n" + alone))
    matrix.write_text(matrix.read_text().replace("epochs=3", "epochs=1"))
    out = tmp_path / "out"
    assert cli.main(["bench", str(matrix), "--out", str(out), "--cell", "cnn-mlp", "alone", "1"]) == 0
    assert (out / "cnn-mlp" / "alone" / "seed1" / "summary.json").is_file()
    assert cli.main(["bench", str(matrix), "--out", str(out), "--cell", "cnn-mlp", "kd-fixed", "1"]) != 0
    assert "teacher 'cnn_small' of pair 'cnn-mlp' is not trained yet" in capsys.readouterr().err
    assert cli.main(["bench", str(matrix), "--out", str(out), "--methods", "alone"]) == 0
    assert (out / "cnn-mlp" / "alone" / "seed0" / "summary.json").is_file()
    assert not (out / "teachers").exists()
    assert cli.main(["bench", str(matrix), "--out", str(out), "--methods", "kd-fixed", "--seeds", "0"]) == 0
    assert (out / "teachers" / "cnn_small" / "summary.json").is_file()


def test_bad_matrix_is_named(tmp_path):
    matrix = write_tiny_matrix(tmp_path, TINY_METHODS)
    text = open(matrix).read().replace("reference: kd-fixed", "reference: kd-none")
    open(matrix, "w").write(text)
    with pytest.raises(ValueError, match="reference 'kd-none' is not one of the methods"):
        load_matrix(matrix)


def test_parallel_cells_give_the_same_results_as_one_at_a_time(tmp_path, capsys):
    methods = "\n".join(TINY_METHODS.splitlines()[:3])
    matrix = write_tiny_matrix(tmp_path, methods)
    assert cli.main(["bench", matrix, "--out", str(tmp_path / "serial")]) == 0
    assert cli.main(["bench", matrix, "--out", str(tmp_path / "parallel"), "--parallel", "3"]) == 0
    log = capsys.readouterr().out
    assert "with 3 at once" in log and "cells per minute" in log
    for method in ("kd-fixed", "kd-grid-a0.5", "dto"):
        for seed in (0, 1):
            done = [
                (tmp_path / kind / "cnn-mlp" / method / f"seed{seed}" / "summary.json")
                for kind in ("serial", "parallel")
            ]
            assert done[0].is_file() == done[1].is_file()  # the grid skips the same cells either way
            if not done[0].is_file():
                continue
            a, b = (json.loads(path.read_text()) for path in done)
            assert a["last_test_top1"] == b["last_test_top1"] and a["best_val_top1"] == b["best_val_top1"]
            assert (tmp_path / "parallel" / "cnn-mlp" / method / f"seed{seed}" / "bench.log").is_file()
    timing = [json.loads(line) for line in (tmp_path / "parallel" / "timing.jsonl").read_text().splitlines()]
    skipped = grid_choice(load_matrix(matrix), tmp_path / "serial" / "cnn-mlp") == "kd-fixed"
    assert ("skipped cnn-mlp kd-grid-a0.5 seed 1" in log) == skipped
    # the cells that ran: a skipped one is not counted
    assert timing[0]["parallel"] == 3 and timing[0]["cells"] == 6 - skipped and timing[0]["cells_per_minute"] > 0
    # nothing left to run: a rerun adds no timing line
    assert cli.main(["bench", matrix, "--out", str(tmp_path / "parallel"), "--parallel", "3"]) == 0
    assert len((tmp_path / "parallel" / "timing.jsonl").read_text().splitlines()) == 1


def test_a_failing_parallel_cell_is_reported_with_its_log(tmp_path, capsys):
    methods = "\n".join([TINY_METHODS.splitlines()[0], "  broken: [balancer.method=fixed]"])  # fixed without weights
    matrix = write_tiny_matrix(tmp_path, methods)
    assert cli.main(["bench", matrix, "--out", str(tmp_path / "out"), "--parallel", "2"]) == 1
    err = capsys.readouterr().err
    assert "2 of 4 cell(s) failed: cnn-mlp broken 0 (see" in err and "bench.log" in err
    assert (tmp_path / "out" / "cnn-mlp" / "kd-fixed" / "seed1" / "summary.json").is_file()
    assert cli.main(["bench", matrix, "--out", str(tmp_path / "out"), "--cell", "cnn-mlp", "nope", "0"]) == 2
    assert "method 'nope' is not in the matrix" in capsys.readouterr().err


def test_a_selection_runs_only_its_cells_and_names_what_it_does_not_know(tmp_path, capsys):
    matrix = write_tiny_matrix(tmp_path, "\n".join(TINY_METHODS.splitlines()[:3]))
    text = (
        open(matrix)
        .read()
        .replace(
            "pairs: {cnn-mlp: {teacher: cnn_small, student: mlp_small}}",
            "pairs: {cnn-mlp: {teacher: cnn_small, student: mlp_small}, "
            "cnn-cnn: {teacher: cnn_small, student: cnn_small}}",
        )
    )
    open(matrix, "w").write(text)
    out = tmp_path / "out"
    assert (
        cli.main(
            ["bench", matrix, "--out", str(out), "--pairs", "cnn-mlp", "--methods", "dto", "kd-fixed", "--seeds", "1"]
        )
        == 0
    )
    ran = sorted(str(p.parent.relative_to(out)) for p in out.glob("*/*/seed*/summary.json"))
    assert ran == ["cnn-mlp/dto/seed1", "cnn-mlp/kd-fixed/seed1"]
    assert (out / "accuracy_cnn-mlp.png").is_file() and not list(out.glob("*cnn-cnn*.png"))  # no plots of no cells
    assert "cnn-cnn" not in (out / "results.md").read_text()
    with open(out / "results.csv") as f:
        rows = {r["method"].split(" ")[0]: r for r in csv.DictReader(f)}
    assert int(rows["dto"]["seeds"]) == 1 and int(rows["dto"]["paired_seeds"]) == 1
    capsys.readouterr()
    assert cli.main(["bench", matrix, "--out", str(out), "--methods", "dto", "nope"]) == 2
    assert "--methods nope: not in the matrix, which has ['kd-fixed', 'kd-grid-a0.5', 'dto']" in capsys.readouterr().err
    assert cli.main(["bench", matrix, "--out", str(out), "--seeds", "7"]) == 2
    assert "--seeds 7: not in the matrix, which has [0, 1]" in capsys.readouterr().err
    assert cli.main(["bench", matrix, "--out", str(out), "--parallel", "2", "--stop-grace", "0"]) == 2
    assert "--stop-grace 0.0 must be a positive number of seconds" in capsys.readouterr().err


def test_a_pair_with_a_given_teacher_checkpoint_trains_no_teacher(tmp_path):
    teacher_config = tmp_path / "t.yaml"
    teacher_config.write_text(
        "name: t\nepochs: 2\nbatch_size: 32\ndata: {name: synthetic}\nstudent: {name: cnn_small}\n"
    )
    assert cli.main(["train", str(teacher_config), "--out", str(tmp_path / "given"), "--quiet"]) == 0
    matrix = write_tiny_matrix(tmp_path, TINY_METHODS.splitlines()[0])
    text = (
        open(matrix)
        .read()
        .replace(
            "pairs: {cnn-mlp: {teacher: cnn_small, student: mlp_small}}",
            f"pairs: {{cnn-mlp: {{teacher: cnn_small, student: mlp_small, "
            f"checkpoint: {tmp_path / 'given' / 'best.pt'}}}}}",
        )
    )
    open(matrix, "w").write(text)
    assert cli.main(["bench", matrix, "--out", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "teachers").exists()
    teacher = json.loads((tmp_path / "out" / "cnn-mlp" / "kd-fixed" / "seed0" / "teacher.json").read_text())
    assert teacher["checkpoint"] == str(tmp_path / "given" / "best.pt")
    broken = text.replace("checkpoint:", "weights:")
    open(matrix, "w").write(broken)
    with pytest.raises(
        ValueError,
        match=r"unknown key\(s\) \['pairs.cnn-mlp.weights'\]; valid keys here: "
        r"\['teacher', 'student', 'checkpoint', 'overrides'\]",
    ):
        load_matrix(matrix)


SHIPPED_MATRICES = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("bench_*.yaml"))


@pytest.mark.parametrize("name", SHIPPED_MATRICES)
def test_shipped_matrices_resolve_every_cell(name):
    """Every cell of a shipped matrix gives a valid run configuration (what `dtokd bench` would
    train), with the pair's own overrides."""
    from dtokd.bench import cell_config, check_cells

    matrix = load_matrix(Path(__file__).resolve().parents[1] / "configs" / name)
    check_cells(matrix)
    for name, pair in matrix.pairs.items():
        for method in matrix.methods:
            config = cell_config(matrix, name, method, matrix.seeds[0], "x.pt")
            # a method may name its own student (the ViT matrix's student alone: no distillation token)
            own = [o.split("=", 1)[1] for o in matrix.methods[method] if o.startswith("student.name=")]
            assert config.student.name == (own[-1] if own else pair.student) and config.name == method
            if "teacher.key_map=cifar-resnet-chenyaofo" in pair.overrides and config.teacher.name:
                assert config.teacher.key_map == "cifar-resnet-chenyaofo"  # the pair's own override applied


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: "", "the file holds nothing"),
        (lambda t: t.replace("seeds: [0, 1]", "seeds: 3"), "seeds must be a list, got 3"),
        (lambda t: t.replace("seeds: [0, 1]", "seeds: []"), r"seeds must be a non-empty list of integers, got \[\]"),
        (lambda t: t.replace("seeds: [0, 1]", "seeds: [0, one]"), r"seeds\[1\] must be of type int, got 'one'"),
        (lambda t: t.replace("seeds: [0, 1]", "seeds: [0, 0]"), r"seeds \[0, 0\] repeat a seed"),
        (
            lambda t: t.replace("pairs: {cnn-mlp: {teacher: cnn_small, student: mlp_small}}", "pairs: [cnn]"),
            r"pairs must be a mapping, got \['cnn'\]",
        ),
        (
            lambda t: t.replace("pairs: {cnn-mlp: {teacher: cnn_small, student: mlp_small}}", "pairs: {}"),
            "pairs must be a non-empty mapping",
        ),
        (
            lambda t: t.replace("pairs: {cnn-mlp: {teacher: cnn_small, student: mlp_small}}", "pairs: {cnn-mlp: cnn}"),
            "pairs.cnn-mlp must be a mapping, got 'cnn'",
        ),
        (
            lambda t: t.replace(
                "pairs: {cnn-mlp: {teacher: cnn_small, student: mlp_small}}", "pairs: {cnn-mlp: {teacher: cnn_small}}"
            ),
            r"missing key\(s\) \['pairs.cnn-mlp.student'\]",
        ),
        (lambda t: t.replace("base: [epochs=3]", "base: epochs=3"), "base must be a list, got 'epochs=3'"),
        (lambda t: "colour: blue\n" + t, r"unknown key\(s\) \['colour'\]"),
    ],
)
def test_a_malformed_matrix_file_is_named(tmp_path, edit, message):
    matrix = write_tiny_matrix(tmp_path, TINY_METHODS)
    text = edit(open(matrix).read())
    open(matrix, "w").write(text)
    with pytest.raises(ValueError, match=message):
        load_matrix(matrix)


def test_a_binary_matrix_file_is_named(tmp_path, capsys):
    path = tmp_path / "matrix.yaml"
    path.write_bytes(bytes(range(256)))
    assert cli.main(["bench", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not a valid YAML matrix" in err


def test_every_cell_is_checked_before_any_runs(tmp_path, capsys):
    methods = "\n".join([TINY_METHODS.splitlines()[0], "  broken: [optim.name=adamw2]", "  idle: [epochs=0]"])
    matrix = write_tiny_matrix(tmp_path, methods)
    assert cli.main(["bench", matrix, "--out", str(tmp_path / "out")]) == 2
    assert "cell cnn-mlp broken seed 0: optim.name='adamw2' is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was trained, not even the teacher
    text = open(matrix).read().replace("  broken: [optim.name=adamw2]\n", "")
    open(matrix, "w").write(text)
    assert cli.main(["bench", matrix, "--out", str(tmp_path / "out")]) == 2
    assert "cell cnn-mlp idle seed 0: epochs=0; a matrix cell must train" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux's /proc to find the cell processes")
def test_interrupted_parallel_bench_keeps_its_cells_and_finishes_on_rerun(tmp_path):
    """SIGINT to `dtokd bench --parallel 2` (a time limit, or Ctrl-C), started as a background job
    is (SIGINT ignored): each running cell stops at a consistent point, the command says how to
    finish, and the rerun ends as a straight run does. The cells are frozen (SIGSTOP) from their
    first checkpoint until the bench has passed the SIGINT on, so no cell can finish in between."""
    import os
    import signal
    import subprocess
    import sys
    import time

    methods = "\n".join(TINY_METHODS.splitlines()[:1] + TINY_METHODS.splitlines()[2:3])
    matrix = write_tiny_matrix(tmp_path, methods)
    text = open(matrix).read().replace("base: [epochs=3]", "base: [epochs=40]")
    open(matrix, "w").write(text)
    command = [sys.executable, "-m", "dtokd", "bench", matrix, "--parallel", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # a loaded machine may take long to stop a cell; the bench waits for it (no kill, whatever the load)
    process = subprocess.Popen(
        [*command, "--out", str(tmp_path / "cut"), "--stop-grace", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        deadline = time.monotonic() + 600  # a bound on a broken run only; no outcome depends on it
        while not list((tmp_path / "cut").glob("*/*/seed*/checkpoint.pt")):
            if process.poll() is not None:
                pytest.fail(
                    f"the bench ended (status {process.returncode}) before any checkpoint: {process.stderr.read()}"
                )
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.02)
        cells = _children(process.pid)
        for pid in cells:
            os.kill(pid, signal.SIGSTOP)
        assert process.poll() is None, "the bench finished before it was interrupted"
        process.send_signal(signal.SIGINT)
        for line in process.stdout:
            if line.startswith("[bench] stopping"):
                break
        for pid in cells:
            os.kill(pid, signal.SIGCONT)
        out, err = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130 and "Finish the matrix with" in err, err
    assert "killed" not in out  # every cell stopped on its SIGINT
    assert not list((tmp_path / "cut").rglob("*.tmp"))
    assert not [pid for pid in cells if Path(f"/proc/{pid}").exists()]  # no cell runs on
    subprocess.run([*command, "--out", str(tmp_path / "cut")], check=True, env=env, capture_output=True)
    subprocess.run([*command, "--out", str(tmp_path / "straight")], check=True, env=env, capture_output=True)
    for summary in (tmp_path / "straight").glob("*/*/seed*/summary.json"):
        other = tmp_path / "cut" / summary.relative_to(tmp_path / "straight")
        assert json.loads(other.read_text())["last_test_top1"] == json.loads(summary.read_text())["last_test_top1"]


def test_a_cell_is_diverged_by_the_error_type_not_its_words(tmp_path, monkeypatch):
    """NonFiniteStepError (what the balancer raises for NaN/inf) marks a cell diverged; any other
    error, even one whose message says 'non-finite', fails the cell."""
    from dtokd import NonFiniteStepError, bench
    from dtokd.bench import training  # where run_cell looks train up

    matrix = load_matrix(write_tiny_matrix(tmp_path, TINY_METHODS))
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"stand-in: train() is replaced below")

    def diverge(config, folder, **kwargs):
        raise NonFiniteStepError("non-finite loss(es) ['task']: task=nan")

    monkeypatch.setattr(training, "train", diverge)
    bench.run_cell(matrix, tmp_path / "out", "cnn-mlp", "dto", 0, teacher)
    record = json.loads((tmp_path / "out" / "cnn-mlp" / "dto" / "seed0" / "diverged.json").read_text())
    assert record == {"error": "non-finite loss(es) ['task']: task=nan", "epochs_completed": 0}

    def fail(config, folder, **kwargs):
        raise ValueError("data.root holds non-finite pixel values")

    monkeypatch.setattr(training, "train", fail)
    with pytest.raises(ValueError, match="non-finite pixel"):
        bench.run_cell(matrix, tmp_path / "out", "cnn-mlp", "dto", 1, teacher)
    assert not (tmp_path / "out" / "cnn-mlp" / "dto" / "seed1" / "diverged.json").exists()
