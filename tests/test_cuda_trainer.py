"""The trainer on a CUDA device, end to end through the command line: train, distill with every
engine and amortized DTO (diagnostic host-path steps mixed with device-path steps), resume,
eval, data on the device or the host, bf16, channels-last, CUDA graphs. Skipped where no CUDA
device is present (CI has none): run ``pytest tests/test_cuda_trainer.py`` on a GPU machine."""

import json

import pytest
import torch

from dtokd import cli
from dtokd.train import load_config, train

from helpers import interrupt_after

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

COMMON = ["data.name=synthetic-rgb", "batch_size=32", "eval_batch_size=64", "log_every=2", "--quiet"]


@pytest.fixture(scope="module")
def teacher_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cuda")
    config = folder / "teacher.yaml"
    config.write_text("name: teacher\nepochs: 3\nstudent: {name: resnet8}\n")
    assert cli.main(["train", str(config), "--out", str(folder / "teacher"), "device=cuda", *COMMON]) == 0
    student = folder / "student.yaml"
    student.write_text(
        "\n".join(
            [
                "name: student",
                "epochs: 2",
                "student: {name: cnn_small}",
                f"teacher: {{name: resnet8, checkpoint: {folder / 'teacher' / 'best.pt'}}}",
                "losses: {distill: {type: kd}, task: {type: ce}}",
            ]
        )
    )
    return student


def summary_of(folder):
    return json.loads((folder / "summary.json").read_text())


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("fixed", ["balancer.method=fixed", "balancer.options={weights: {distill: 0.9, task: 0.1}}"]),
        ("dto-exact", ["balancer.method=dto"]),
        ("dto-representation", ["balancer.method=dto", "balancer.engine=representation"]),
        ("dto-subset", ["balancer.method=dto", "balancer.engine=subset", "balancer.gram_params=head"]),
        ("dto-amortized", ["balancer.method=dto-amortized"]),
        ("dto-amortized-next", ["balancer.method=dto-amortized", "balancer.options={update: next-step}"]),
        ("mgda-representation", ["balancer.method=mgda", "balancer.engine=representation"]),
    ],
)
def test_distill_on_cuda_with_every_engine(teacher_config, tmp_path, name, overrides):
    folder = tmp_path / name
    assert cli.main(["distill", str(teacher_config), "--out", str(folder), "device=cuda", *COMMON, *overrides]) == 0
    meta, summary = json.loads((folder / "meta.json").read_text()), summary_of(folder)
    assert meta["device"] == "cuda" and meta["training_images_on"].startswith("cuda")
    assert summary["epochs_run"] == 2 and summary["teacher"]["test_top1"] > 40
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all(row["loss/distill"] == row["loss/distill"] and row["loss/task"] > 0 for row in rows)  # finite, present


def test_cuda_run_matches_the_cpu_run(teacher_config, tmp_path):
    """The same run on both devices: first-epoch losses and weights agree to float32 accuracy."""
    rows = {}
    for device in ("cpu", "cuda"):
        folder = tmp_path / device
        assert (
            cli.main(
                [
                    "distill",
                    str(teacher_config),
                    "--out",
                    str(folder),
                    f"device={device}",
                    "epochs=1",
                    "balancer.method=dto",
                    "student.name=mlp_small",
                    *COMMON,
                ]
            )
            == 0
        )
        rows[device] = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("loss/distill", "loss/task", "loss_weight/distill", "loss_weight/task"):
        assert rows["cuda"][key] == pytest.approx(rows["cpu"][key], rel=1e-3), key


def test_data_on_the_device_and_on_the_host_give_the_same_batches(teacher_config, tmp_path):
    results = {}
    for placement in ("device", "host"):
        folder = tmp_path / placement
        assert (
            cli.main(
                [
                    "distill",
                    str(teacher_config),
                    "--out",
                    str(folder),
                    "device=cuda",
                    "epochs=1",
                    f"data.placement={placement}",
                    "student.name=mlp_small",
                    *COMMON,
                ]
            )
            == 0
        )
        results[placement] = torch.load(folder / "checkpoint.pt", weights_only=False)["student"]
    for key, value in results["device"].items():
        torch.testing.assert_close(value, results["host"][key], rtol=1e-5, atol=1e-6)


def test_killed_cuda_run_resumes_to_the_same_weights(teacher_config, tmp_path, monkeypatch):
    overrides = [
        *COMMON[:-1],
        "device=cuda",
        "epochs=3",
        "student.name=mlp_small",
        "balancer.method=dto",
        "balancer.engine=representation",
    ]
    train(load_config(teacher_config, overrides), tmp_path / "straight", progress=False)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train(load_config(teacher_config, overrides), tmp_path / "resumed", progress=False)
    assert (
        cli.main(
            ["distill", str(teacher_config), "--out", str(tmp_path / "resumed"), "--resume", *overrides, "--quiet"]
        )
        == 0
    )
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3
    for key in a["student"]:
        torch.testing.assert_close(a["student"][key], b["student"][key], rtol=1e-6, atol=1e-7)


def test_eval_on_cuda_equals_the_logged_epoch(teacher_config, tmp_path, capsys):
    folder = tmp_path / "run"
    assert cli.main(["distill", str(teacher_config), "--out", str(folder), "device=cuda", *COMMON]) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(folder), "--device", "cuda"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["top1"] == pytest.approx(summary_of(folder)["test_top1_at_best_val"])


def test_bf16_channels_last_and_cuda_graphs(teacher_config, tmp_path, capsys):
    folder = tmp_path / "graphs"
    assert (
        cli.main(
            [
                "distill",
                str(teacher_config),
                "--out",
                str(folder),
                "device=cuda",
                "amp=bf16",
                "channels_last=true",
                "compile=reduce-overhead",
                "balancer.method=dto",
                "balancer.engine=representation",
                *COMMON,
            ]
        )
        == 0
    )
    assert summary_of(folder)["epochs_run"] == 2
    assert (
        cli.main(
            [
                "distill",
                str(teacher_config),
                "--out",
                str(tmp_path / "refused"),
                "device=cuda",
                "compile=reduce-overhead",
                "balancer.method=dto",
                *COMMON,
            ]
        )
        == 2
    )
    assert "compile='reduce-overhead' with balancer.engine='exact' is refused" in capsys.readouterr().err
