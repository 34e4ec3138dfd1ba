"""`dtokd distill` under `torchrun --nproc_per_node 2` (gloo, CPU): equal to one process, resumable."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtokd.train import load_config, train

pytestmark = pytest.mark.slow

CONFIG = [
    "name: ddp",
    "epochs: 6",
    "batch_size: 32",
    "log_every: 10",
    "data: {name: digits}",
    "student: {name: mlp_small}",
    "losses: {distill: {type: kd}, task: {type: ce}}",
    "optim: {lr: 0.05, schedule: cosine}",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    teacher = load_config(None, ["data.name=digits", "student.name=cnn_small", "epochs=1", "batch_size=64"])
    train(teacher, folder / "teacher", progress=False)
    config = folder / "student.yaml"
    config.write_text(
        "\n".join(CONFIG + [f"teacher: {{name: cnn_small, checkpoint: {folder / 'teacher' / 'best.pt'}}}"])
    )
    return folder, config


def torchrun(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "dtokd.cli",
        "distill",
        str(config),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output


def descendants(pid: int) -> list[int]:
    """All processes below ``pid``, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def student_weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoint.pt", weights_only=False)["student"]


@pytest.mark.parametrize("method", ["dto", "dto-amortized"])
def test_two_processes_match_one_process(setup, method):
    folder, config = setup
    finish(torchrun(config, folder / f"two-{method}", f"balancer.method={method}"))
    train(load_config(config, [f"balancer.method={method}"]), folder / f"one-{method}", progress=False)
    two, one = student_weights(folder / f"two-{method}"), student_weights(folder / f"one-{method}")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    logged = (folder / f"two-{method}" / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == 6  # rank 0 alone writes


def test_killed_two_process_run_resumes_to_the_same_weights(setup):
    folder, config = setup
    finish(torchrun(config, folder / "straight", "balancer.method=dto"))
    process = torchrun(config, folder / "killed", "balancer.method=dto")
    checkpoint = folder / "killed" / "checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    for pid in [process.pid, *descendants(process.pid)]:  # the workers may have sessions of their own
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.communicate()
    time.sleep(0.5)
    epoch = torch.load(checkpoint, weights_only=False)["epoch"]
    assert 1 <= epoch < 6, f"the kill landed after epoch {epoch}"
    finish(torchrun(config, folder / "killed", "balancer.method=dto", "--resume"))
    a, b = student_weights(folder / "straight"), student_weights(folder / "killed")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
