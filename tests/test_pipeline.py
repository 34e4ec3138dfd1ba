"""End to end on tiny synthetic data: train, distill, eval, report, resume, config and checkpoint errors."""

import json
from pathlib import Path

import pytest
import torch

from dtokd import cli
from dtokd.train import ConfigError, load_config, train

from helpers import interrupt_after

BASE = ["data.name=synthetic", "batch_size=32", "log_every=2", "eval_batch_size=64"]


def teacher_run(folder: Path) -> Path:
    config = load_config(None, BASE + ["name=teacher", "student.name=cnn_small", "epochs=2"])
    train(config, folder, progress=False)
    return folder / "best.pt"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return teacher_run(tmp_path_factory.mktemp("teacher") / "run")


def student_overrides(teacher: Path, method: str = "dto", epochs: int = 3) -> list[str]:
    return BASE + [
        "name=student",
        "student.name=mlp_small",
        f"epochs={epochs}",
        "teacher.name=cnn_small",
        f"teacher.checkpoint={teacher}",
        "losses={distill: {type: kd}, task: {type: ce}}",
        f"balancer.method={method}",
    ]


def test_distill_writes_a_complete_run_folder(teacher, tmp_path):
    config = load_config(None, student_overrides(teacher))
    summary = train(config, tmp_path / "s", progress=False)
    folder = tmp_path / "s"
    for name in (
        "config.yaml",
        "meta.json",
        "metrics.jsonl",
        "steps.jsonl",
        "summary.json",
        "best.pt",
        "checkpoint.pt",
    ):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["versions"]["torch"] == torch.__version__ and meta["commit"]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert summary["last_test_top1"] == rows[-1]["test_top1"] and summary["method"] == "dto"
    steps = [json.loads(line) for line in (folder / "steps.jsonl").read_text().splitlines()]
    assert steps and all(-1 <= s["conflict"] <= 1 and s["dominance"] > 0 for s in steps)
    assert load_config(folder / "config.yaml") == config


def test_distillation_actually_learns(teacher, tmp_path):
    summary = train(load_config(None, student_overrides(teacher, epochs=4)), tmp_path / "s", progress=False)
    assert summary["best_test_top1"] > 50.0  # 4 classes: chance is 25 %


@pytest.mark.parametrize(
    "method, extra",
    [
        ("dto", []),
        ("dto-amortized", []),
        ("pcgrad", []),
        ("cross-batch", []),
        ("dto-amortized-gated", ["balancer.options={every: 3}"]),
    ],
)
def test_killed_and_resumed_run_ends_with_the_same_weights(teacher, tmp_path, monkeypatch, method, extra):
    overrides = student_overrides(teacher, method=method, epochs=3) + extra
    train(load_config(None, overrides), tmp_path / "straight", progress=False)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train(load_config(None, overrides), tmp_path / "resumed", progress=False)
    train(load_config(None, overrides), tmp_path / "resumed", resume=True, progress=False)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    assert a["history"][-1]["test_top1"] == b["history"][-1]["test_top1"]
    metrics = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == [0, 1, 2]
    if method in ("cross-batch", "dto-amortized-gated"):  # the step record says what the rule learned
        steps = [json.loads(line) for line in (tmp_path / "resumed" / "steps.jsonl").read_text().splitlines()]
        assert steps and all("usefulness/distill" in row and "usefulness/task" in row for row in steps)
        assert all(("gate/distill" in row) == (method == "dto-amortized-gated") for row in steps)


def test_corrupt_checkpoint_is_reported_and_never_overwritten(teacher, tmp_path):
    overrides = student_overrides(teacher, epochs=1)
    folder = tmp_path / "s"
    train(load_config(None, overrides), folder, progress=False)
    (folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt"):
        train(load_config(None, overrides), folder, resume=True, progress=False)
    assert (folder / "checkpoint.pt").read_bytes() == b"not a checkpoint"
    # its bytes are no longer a dtokd checkpoint's: a fresh run (even with --force) refuses, naming it
    for force in (False, True):
        with pytest.raises(FileExistsError, match="holds files that are not a dtokd run's \\(checkpoint.pt\\)"):
            train(load_config(None, overrides), folder, progress=False, force=force)
    assert (folder / "checkpoint.pt").read_bytes() == b"not a checkpoint"


def test_mismatched_checkpoint_is_refused(teacher, tmp_path):
    folder = tmp_path / "s"
    train(load_config(None, student_overrides(teacher, epochs=1)), folder, progress=False)
    before = (folder / "checkpoint.pt").read_bytes()
    with pytest.raises(
        ValueError,
        match="differs: epochs: saved 1, given 2; student.name: saved 'mlp_small', "
        "given 'mlp' \\(to lengthen the run, pass --extend-epochs N\\)",
    ):
        train(
            load_config(None, student_overrides(teacher, epochs=2) + ["student.name=mlp"]),
            folder,
            resume=True,
            progress=False,
        )
    assert (folder / "checkpoint.pt").read_bytes() == before
    # a config.yaml edited by hand: the checkpoint's own identity still refuses it
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text().replace("name: mlp_small", "name: mlp"))
    with pytest.raises(ValueError, match="different run.*student"):
        train(None, folder, resume=True, progress=False)
    assert (folder / "checkpoint.pt").read_bytes() == before


def test_teacher_class_count_mismatch_is_caught_before_training(teacher, tmp_path):
    overrides = student_overrides(teacher) + ["data.name=digits"]
    with pytest.raises(ValueError, match="trained for 4 classes, but data set 'digits' has 10"):
        train(load_config(None, overrides), tmp_path / "s", progress=False)
    assert not (tmp_path / "s" / "checkpoint.pt").exists()


def test_config_errors_name_the_key_and_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['optim.lrr'\]; valid keys here: \['name', 'lr'"):
        load_config(None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="epochs must be of type int, got 'ten'"):
        load_config(None, ["epochs=ten"])
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(None, ["epochs"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\noptim: {lr: 0.2}\n")
    config = load_config(path, ["optim.lr=0.3", "data.limit_train=null"])
    assert config.epochs == 3 and config.optim.lr == 0.3 and config.data.limit_train is None


def test_cli_commands_end_to_end(teacher, tmp_path, capsys):
    config = tmp_path / "student.yaml"
    config.write_text(
        "\n".join(
            [
                "name: cli",
                "epochs: 2",
                "batch_size: 32",
                "data: {name: synthetic}",
                "student: {name: mlp_small}",
                f"teacher: {{name: cnn_small, checkpoint: {teacher}}}",
                "losses: {distill: {type: kd}, task: {type: ce}}",
            ]
        )
    )
    assert cli.main(["distill", str(config), "--balancer", "mgda", "--out", str(tmp_path / "mgda"), "--quiet"]) == 0
    assert (
        cli.main(["distill", str(config), "--balancer", "dto-amortized", "--out", str(tmp_path / "amo"), "--quiet"])
        == 0
    )
    assert cli.main(["eval", str(tmp_path / "mgda")]) == 0
    evaluated = json.loads(capsys.readouterr().out.split("run folder")[-1].split("\n", 1)[1])
    best = json.loads((tmp_path / "mgda" / "summary.json").read_text())["test_top1_at_best_val"]
    assert evaluated["top1"] == pytest.approx(best)
    assert cli.main(["report", str(tmp_path / "mgda"), str(tmp_path / "amo"), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| mgda | mgda |" in text and "| amo | dto-amortized |" in text
    for png in ("accuracy.png", "loss.png", "weights.png", "conflict.png", "dominance.png"):
        assert (tmp_path / "rep" / png).stat().st_size > 1000, png
    assert cli.main(["train", str(config), "--out", str(tmp_path / "x")]) == 2
    assert "names a teacher: use dtokd distill" in capsys.readouterr().err
    assert cli.main(["distill", str(config), "optim.bogus=1", "--out", str(tmp_path / "y")]) == 2
    assert "unknown key(s) ['optim.bogus']" in capsys.readouterr().err


def test_demo_quick_on_fashion_mnist(tmp_path, monkeypatch, capsys):
    from dtokd.data import sources

    if not any(
        all((p / f).is_file() for pair in sources.FASHION_FILES.values() for f in pair)
        for p in sources.fashion_mnist_candidates(None)
    ):
        pytest.skip("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist, or $DTOKD_DATA)")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "| student-alone | student alone |" in out and "| dto-kd | dto |" in out and "| fixed-kd | fixed |" in out
    assert "| dto-amortized | dto-amortized |" in out  # the rule the README recommends
    assert (tmp_path / "demo" / "report" / "report.md").is_file()
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    assert "reusing the trained teacher" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra",
    [
        ["losses={distill: {type: dkd, warmup_epochs: 2}, task: {type: ce}}"],
        [
            "losses={distill: {type: kd}, feat: {type: feature, student_tap: features, teacher_tap: features}, "
            "task: {type: ce}}",
            "balancer.method=upgrad",
        ],
        ["amp=bf16", "optim.grad_clip=1.0"],
        ["optim.name=adamw", "optim.lr=0.003", "optim.schedule=step", "optim.milestones=[1]", "optim.warmup_epochs=1"],
        ["balancer.engine=subset", "balancer.gram_params=head"],
        ["balancer.engine=representation"],
        ["balancer.method=gradnorm"],
        ["balancer.method=dto-amortized", "balancer.options={update: next-step}"],
    ],
    ids=[
        "dkd",
        "feature-upgrad",
        "bf16-clip",
        "adamw-step-warmup",
        "subset",
        "representation",
        "gradnorm",
        "amortized-next",
    ],
)
def test_trainer_options_run_and_learn(teacher, tmp_path, extra):
    summary = train(load_config(None, student_overrides(teacher, epochs=2) + extra), tmp_path / "s", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["skipped_steps"] == 0 for r in rows)
    assert summary["best_test_top1"] > 25.0  # above chance (4 classes)


def test_learning_rate_schedule_by_hand():
    from dtokd.train.config import OptimConfig
    from dtokd.train.optim import lr_factor

    cosine = OptimConfig(schedule="cosine", warmup_epochs=1)
    assert [round(lr_factor(cosine, e, 5), 6) for e in range(5)] == [0.5, 1.0, 0.853553, 0.5, 0.146447]
    step = OptimConfig(schedule="step", milestones=[2, 4], gamma=0.1)
    assert [lr_factor(step, e, 6) for e in range(6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="schedule='linear'"):
        lr_factor(OptimConfig(schedule="linear"), 0, 5)


@pytest.mark.parametrize(
    "balancer",
    [["balancer.engine=representation"], ["balancer.method=dto-amortized", "balancer.options={update: next-step}"]],
)
def test_deferred_checks_train_to_the_same_weights_and_metrics(teacher, tmp_path, balancer):
    """balancer.options.deferred_checks only moves the checks to the next step: same run."""
    overrides = student_overrides(teacher, epochs=2) + balancer
    deferred = [o.replace("}", ", deferred_checks: true}") for o in overrides if o.startswith("balancer.options")]
    deferred = deferred or ["balancer.options={deferred_checks: true}"]
    train(load_config(None, overrides), tmp_path / "checked", progress=False)
    train(
        load_config(None, [o for o in overrides if not o.startswith("balancer.options")] + deferred),
        tmp_path / "deferred",
        progress=False,
    )
    a = torch.load(tmp_path / "checked" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "deferred" / "checkpoint.pt", weights_only=False)
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    rows = [
        [
            {k: v for k, v in json.loads(line).items() if k != "epoch_seconds"}
            for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in ("checked", "deferred")
    ]
    assert rows[0] == rows[1] and "loss_weight/distill" in rows[0][0]


def test_scientific_notation_without_a_dot_is_a_number():
    """YAML 1.1 reads 1e-3 as a string; a float setting takes it as the number users mean."""
    assert load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5E-4"]).optim.lr == 1e-3
    with pytest.raises(ConfigError, match="optim.lr must be of type float, got 'fast'"):
        load_config(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="epochs must be of type int, got 1000.0"):  # a number, not an integer
        load_config(None, ["epochs=1e3"])
