"""Stopping cleanly: a parallel bench stops every cell it started, whatever signal arrives and
whenever it lands; a run folder is held by one process at a time. Signals are raised at chosen
points of the code (no dependence on timing or load)."""

import json
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from dtokd import bench
from dtokd.interrupts import Interrupted, hold_folder, stop_on_signals, uninterrupted
from dtokd.train import load_config, train
from dtokd.train.records import MetricLog

FAKE_CELL = textwrap.dedent("""
    import signal, sys, time, pathlib
    folder = pathlib.Path(sys.argv[1])
    def stop(signum, frame):
        (folder / "stopped").write_text(signal.Signals(signum).name)
        sys.exit(130)
    signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[2] == "deaf" else stop)
    (folder / "ready").write_text("")
    while True:
        time.sleep(0.05)
""")


@pytest.fixture
def fake_cells(tmp_path, monkeypatch):
    """Cells that wait forever until SIGINT (``deaf``: cells that ignore it); records every
    process the bench starts."""
    script = tmp_path / "cell.py"
    script.write_text(FAKE_CELL)
    started: list[subprocess.Popen] = []
    kind = {"cell": "normal"}

    def command(matrix_path, out, pair, method, seed):
        return [sys.executable, str(script), str(out / pair / method / f"seed{seed}"), kind["cell"]]

    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        process = real_popen(*args, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(bench, "_cell_command", command)
    monkeypatch.setattr(bench.subprocess, "Popen", recording_popen)
    yield started, kind
    for process in started:  # never leave a process behind, even when a test fails
        if process.poll() is None:
            process.kill()
            process.wait()


CELLS = [("p", "m", 0), ("p", "m", 1), ("p", "m", 2)]
MATRIX = bench.Matrix(  # what the driver reads of the matrix itself: no grid, so every cell runs
    name="m",
    seeds=[0, 1, 2],
    pairs={"p": bench.Pair(teacher="t", student="s")},
    methods={"m": []},
    student_config="s.yaml",
    teacher_config="t.yaml",
    reference="m",
)


def _wait_ready(out: Path, count: int) -> None:
    while len(list(out.glob("p/m/seed*/ready"))) < count:
        threading.Event().wait(0.02)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_while_the_cells_run_stops_every_one(tmp_path, fake_cells, monkeypatch, signum):
    started, _ = fake_cells
    out = tmp_path / "out"
    real_sleep = bench.time.sleep

    def sleep_then_signal(seconds):  # the driver's first wait: both cells are up, then the signal lands
        _wait_ready(out, 2)
        signal.raise_signal(signum)
        real_sleep(seconds)

    monkeypatch.setattr(bench.time, "sleep", sleep_then_signal)
    with stop_on_signals(), pytest.raises(Interrupted) as raised:
        bench._run_in_processes(MATRIX, tmp_path / "matrix.yaml", out, CELLS, parallel=2, grace=30)
    assert raised.value.signum == signum
    assert len(started) == 2  # the third cell was never started
    for process in started:
        assert process.returncode == 130  # each stopped through its own SIGINT handler, not killed
    assert sorted(p.read_text() for p in out.glob("p/m/seed*/stopped")) == ["SIGINT", "SIGINT"]


def test_a_signal_while_a_cell_is_being_started_still_stops_that_cell(tmp_path, fake_cells, monkeypatch):
    """The signal lands inside the start of the second cell, before the driver records it."""
    started, _ = fake_cells
    out = tmp_path / "out"
    recording = bench.subprocess.Popen

    def popen_then_signal(*args, **kwargs):
        process = recording(*args, **kwargs)
        if len(started) == 2:
            signal.raise_signal(signal.SIGINT)
        return process

    monkeypatch.setattr(bench.subprocess, "Popen", popen_then_signal)
    with stop_on_signals(), pytest.raises(Interrupted):
        bench._run_in_processes(MATRIX, tmp_path / "matrix.yaml", out, CELLS, parallel=3, grace=30)
    assert len(started) == 2 and all(p.returncode is not None for p in started)


def test_a_cell_that_ignores_sigint_is_killed_after_the_grace_period(tmp_path, fake_cells, monkeypatch, capsys):
    started, kind = fake_cells
    kind["cell"] = "deaf"
    out = tmp_path / "out"
    real_sleep = bench.time.sleep

    def sleep_then_signal(seconds):
        _wait_ready(out, 1)
        signal.raise_signal(signal.SIGTERM)
        real_sleep(seconds)

    monkeypatch.setattr(bench.time, "sleep", sleep_then_signal)
    with stop_on_signals(), pytest.raises(Interrupted):
        bench._run_in_processes(MATRIX, tmp_path / "matrix.yaml", out, CELLS[:1], parallel=1, grace=0.5)
    assert started[0].returncode == -signal.SIGKILL
    assert "did not stop within 0.5 s of SIGINT" in capsys.readouterr().out


def test_stop_on_signals_handles_sigint_even_when_the_process_started_with_it_ignored():
    code = textwrap.dedent("""
        import signal
        from dtokd.interrupts import Interrupted, stop_on_signals
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        with stop_on_signals():
            try:
                signal.raise_signal(signal.SIGINT)
            except Interrupted as stop:
                print("stopped by", stop)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored on leaving
    """)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "stopped by SIGINT"


class _SignalledWriter:
    """A TensorBoard writer stand-in that is sent SIGTERM in the middle of each ``add_scalar``
    (between taking and releasing its queue's lock, where TensorBoard's would be left taken)."""

    def __init__(self):
        self.calls = []

    def add_scalar(self, tag, value, step):
        self.calls.append(("start", tag))
        signal.raise_signal(signal.SIGTERM)
        self.calls.append(("end", tag))

    def close(self):
        self.calls.append(("close", None))


def test_a_stop_signal_during_a_log_write_comes_after_the_whole_row(tmp_path):
    log = MetricLog(tmp_path, tensorboard=False)
    log.writer = writer = _SignalledWriter()
    with stop_on_signals(), pytest.raises(Interrupted, match="SIGTERM"):
        log.write("steps.jsonl", {"step": 3, "loss": 1.5, "weight": 0.5}, 3)
    assert writer.calls == [
        ("start", "steps/loss"),
        ("end", "steps/loss"),
        ("start", "steps/weight"),
        ("end", "steps/weight"),
    ]
    assert json.loads((tmp_path / "steps.jsonl").read_text()) == {"step": 3, "loss": 1.5, "weight": 0.5}
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals(), pytest.raises(Interrupted) as stop:  # a signal during a failing block is not lost
        with uninterrupted():
            signal.raise_signal(signal.SIGTERM)
            raise ZeroDivisionError
    assert isinstance(stop.value.__context__, ZeroDivisionError)
    assert signal.getsignal(signal.SIGTERM) is before  # every handler restored


def test_the_cli_stops_on_a_signal_during_its_start(monkeypatch, capsys):
    """SIGTERM while the command is still importing and reading its matrix: one line, status 130."""
    from dtokd import cli

    def interrupted_load(path):
        signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(bench, "load_matrix", interrupted_load)
    assert cli.main(["bench", "matrix.yaml", "--out", "nowhere"]) == 130
    err = capsys.readouterr().err
    assert "interrupted (SIGTERM)" in err and "Finish the matrix with" in err and "Traceback" not in err


BASE = ["data.name=synthetic", "batch_size=32", "log_every=2", "student.name=mlp_small", "epochs=1"]


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path):
    folder = tmp_path / "run"
    holder = hold_folder(folder)
    try:
        with pytest.raises(FileExistsError, match=r"is in use by another dtokd process \(pid \d+\)"):
            train(load_config(None, BASE), folder, force=True, progress=False, verbose=False)
        assert [p.name for p in folder.iterdir()] == ["run.lock"]  # nothing of the holder's was touched
    finally:
        holder.close()
    train(load_config(None, BASE), folder, force=True, progress=False, verbose=False)  # free again
    assert (folder / "summary.json").is_file()


def test_a_fresh_run_that_fails_leaves_no_folder_and_no_lock(tmp_path):
    folder = tmp_path / "run"
    with pytest.raises(ValueError):
        train(load_config(None, BASE + ["optim.lr=-1"]), folder, progress=False, verbose=False)
    assert not folder.exists()


def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_old_one(tmp_path, monkeypatch, capsys):
    """A full disk (torch.save raises a C++ enforce failure): a one-line error naming the file and
    the free space, the previous checkpoint intact, and the run resumes from it."""
    from dtokd import cli
    from dtokd.train import checkpoint

    folder = tmp_path / "run"
    args = ["train", "--out", str(folder), "--quiet", "data.name=synthetic", "batch_size=32", "student.name=mlp_small"]
    config = tmp_path / "c.yaml"
    config.write_text("name: c\nepochs: 1\n")
    assert cli.main([args[0], str(config), *args[1:]]) == 0
    before = {name: (folder / name).read_bytes() for name in ("checkpoint.pt", "best.pt")}
    real = checkpoint.torch.save

    def full_disk(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    capsys.readouterr()
    assert cli.main(["train", "--resume", "--out", str(folder), "--extend-epochs", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"could not write {folder}" in err and "MiB free" in err and "is intact" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {name: (folder / name).read_bytes() for name in before} == before and not list(folder.glob("*.tmp"))
    monkeypatch.setattr(checkpoint.torch, "save", real)
    assert cli.main(["train", "--resume", "--out", str(folder), "--quiet"]) == 0  # the extension was recorded
    assert json.loads((folder / "summary.json").read_text())["epochs_run"] == 2


class _BadImages(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise ValueError(f"images/{index}.jpg: cannot identify image file")


def test_an_error_in_a_data_loader_worker_keeps_its_reason_on_the_one_line():
    from dtokd.cli import _one_line

    with pytest.raises(ValueError) as raised:
        next(iter(torch.utils.data.DataLoader(_BadImages(), num_workers=1)))
    line = _one_line(raised.value)
    assert "DataLoader worker process 0" in line and "images/0.jpg: cannot identify image file" in line
    assert "\n" not in line


def test_the_resume_command_printed_for_a_run_under_torchrun_goes_through_torchrun(monkeypatch, tmp_path):
    """A run started by torchrun resumes through torchrun on as many processes per node (an FSDP
    run refuses one process); a plain run through dtokd itself."""
    from dtokd.cli import _resume_command

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _resume_command("distill", tmp_path) == f"dtokd distill --resume --out {tmp_path}"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _resume_command("distill", tmp_path) == (
        f"torchrun --nproc_per_node 2 -m dtokd.cli distill --resume --out {tmp_path}"
    )
