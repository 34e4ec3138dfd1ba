"""A run folder a user can trust: resume from the saved config, no silent overwrite, content-keyed
caches, eval with the run's own data settings, one-line errors, Ctrl-C, checksums."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dtokd import cli
from dtokd.data import sources
from dtokd.report import report
from dtokd.train import ConfigError, load_config, train
from dtokd.train.optim import lr_factor
from dtokd.train.run_folder import written_by_a_run

from helpers import interrupt_after

BASE = ["data.name=synthetic", "batch_size=32", "log_every=2", "eval_batch_size=64"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("teacher") / "run"
    train(load_config(None, BASE + ["name=teacher", "student.name=cnn_small", "epochs=2"]), folder, progress=False)
    return folder / "best.pt"


@pytest.fixture
def config_file(teacher, tmp_path) -> Path:
    path = tmp_path / "student.yaml"
    path.write_text(
        "\n".join(
            [
                "# my experiment",
                "name: s",
                "epochs: 3",
                "batch_size: 32",
                "log_every: 2",
                "data: {name: synthetic}",
                "student: {name: mlp_small}",
                f"teacher: {{name: cnn_small, checkpoint: {teacher}}}",
                "losses: {distill: {type: kd}, task: {type: ce}}",
                "balancer: {method: dto}",
            ]
        )
        + "\n"
    )
    return path


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(*args: str) -> int:
    return cli.main([*args, "--quiet"] if args[0] in ("train", "distill") else list(args))


# ------------------------------------------------------------------------ 1. resume = the saved config


@pytest.mark.parametrize(
    "override",
    [
        "data.name=digits",
        "batch_size=16",
        "balancer.engine=representation",
        "losses={distill: {type: kd, temperature: 2.0}, task: {type: ce}}",
        "optim.lr=0.5",
        "epochs=5",
    ],
)
def test_resume_with_a_changed_setting_is_refused_naming_it(config_file, tmp_path, capsys, override):
    folder = tmp_path / "run"
    assert run("distill", str(config_file), "--out", str(folder), "epochs=1") == 0
    before = files_of(folder)
    capsys.readouterr()
    assert run("distill", str(config_file), "--out", str(folder), "--resume", "epochs=1", override) == 2
    err = capsys.readouterr().err
    key = override.split("=")[0]
    assert "the configuration given differs" in err and f"{key}: saved" in err
    assert files_of(folder) == before


def test_resume_without_the_original_overrides_uses_the_saved_config(config_file, tmp_path, monkeypatch):
    """The bug: --resume without the overrides a run started with stopped a 4-epoch run at 2."""
    folder = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        assert run("distill", str(config_file), "--out", str(folder), "epochs=4", "optim.lr=0.02") == 130
    assert run("distill", "--resume", "--out", str(folder)) == 0
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["epochs_run"] == 4
    straight = tmp_path / "straight"
    assert run("distill", str(config_file), "--out", str(straight), "epochs=4", "optim.lr=0.02") == 0
    a, b = (torch.load(f / "checkpoint.pt", weights_only=False)["student"] for f in (folder, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extending_a_finished_run(config_file, tmp_path, capsys):
    folder = tmp_path / "run"
    assert run("distill", str(config_file), "--out", str(folder), "epochs=2") == 0
    capsys.readouterr()
    assert run("distill", "--resume", "--out", str(folder), "--extend-epochs", "2") == 2
    assert "--extend-epochs 2 must be an integer above the run's 2 epochs" in capsys.readouterr().err
    assert run("distill", "--resume", "--out", str(folder), "--extend-epochs", "4") == 0
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    # the 2-epoch cosine would train epoch 3 at lr 0; the 4-epoch one goes on from its own value there
    assert lr_factor(load_config(config_file).optim, 2, 2) == 0.0
    assert rows[2]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))
    assert rows[3]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert load_config(folder / "config.yaml").epochs == 4
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["extensions"][0] | {"when": None} == {"from_epochs": 2, "to_epochs": 4, "at_epoch": 2, "when": None}
    with pytest.raises(ConfigError, match="use it with --resume"):
        train(load_config(config_file), tmp_path / "other", extend_epochs=5, progress=False)


# ------------------------------------------------------------------------ 2. no silent overwrite


def test_a_folder_with_results_but_no_checkpoint_is_not_overwritten(config_file, tmp_path, capsys):
    folder = tmp_path / "run"
    assert run("distill", str(config_file), "--out", str(folder), "epochs=1") == 0
    (folder / "checkpoint.pt").unlink()  # a normal way to save space
    before = files_of(folder)
    capsys.readouterr()
    assert run("distill", str(config_file), "--out", str(folder), "epochs=1") == 2
    assert "already holds a previous run's files" in capsys.readouterr().err
    assert files_of(folder) == before
    assert run("distill", str(config_file), "--out", str(folder), "epochs=1", "--force") == 0
    assert (folder / "checkpoint.pt").is_file()


def test_the_users_own_files_are_never_written(config_file, tmp_path, capsys):
    folder = tmp_path / "myexp"
    folder.mkdir()
    own = folder / "config.yaml"
    own.write_text(config_file.read_text())
    before = files_of(folder)
    for extra in ([], ["--force"]):
        assert run("distill", str(own), "--out", str(folder), "epochs=1", *extra) == 2
        assert "which is the config file given" in capsys.readouterr().err
    (folder / "notes.txt").write_text("mine")
    other = tmp_path / "other.yaml"
    other.write_text(config_file.read_text())
    assert run("distill", str(other), "--out", str(folder), "epochs=1", "--force") == 2
    assert "holds files that are not a dtokd run's (config.yaml, notes.txt)" in capsys.readouterr().err
    assert files_of(folder) == {**before, "notes.txt": b"mine"}


IMPOSTORS = {
    "best.pt": lambda: torch.save({"my": torch.ones(2)}, "best.pt"),  # another tool's weights
    "checkpoint.pt": lambda: Path("checkpoint.pt").write_bytes(b"not even a zip"),
    "metrics.jsonl": lambda: Path("metrics.jsonl").write_text('{"loss": 1}\n'),
    "summary.json": lambda: Path("summary.json").write_text('{"mine": true}'),
    "config.yaml": lambda: Path("config.yaml").write_text("lr: 0.1\n"),
    "tensorboard": lambda: (Path("tensorboard").mkdir(), Path("tensorboard/notes.txt").write_text("mine")),
    "checkpoint.pt.tmp": lambda: Path("checkpoint.pt.tmp").write_text("my scratch"),
}


@pytest.mark.parametrize("name", sorted(IMPOSTORS))
def test_force_never_removes_a_file_that_only_has_a_run_files_name(config_file, tmp_path, capsys, monkeypatch, name):
    """A previous run's folder in which one entry was replaced by the user's own file of the
    same name: --force refuses, naming it, and removes nothing."""
    folder = tmp_path / "run"
    assert run("distill", str(config_file), "--out", str(folder), "epochs=1") == 0
    target = folder / name
    shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    monkeypatch.chdir(folder)
    IMPOSTORS[name]()
    before = files_of(folder)
    capsys.readouterr()
    assert run("distill", str(config_file), "--out", str(folder), "epochs=1", "--force") == 2
    assert f"holds files that are not a dtokd run's ({name})" in capsys.readouterr().err
    assert files_of(folder) == before


def test_force_replaces_a_whole_previous_run(config_file, tmp_path, capsys):
    folder = tmp_path / "run"
    assert run("distill", str(config_file), "--out", str(folder), "epochs=1") == 0
    (folder / "checkpoint.pt.tmp").write_bytes(b"PK\x03\x04")  # what a killed checkpoint write leaves
    assert {p.name for p in folder.iterdir()} >= {
        "best.pt",
        "checkpoint.pt",
        "metrics.jsonl",
        "steps.jsonl",
        "summary.json",
        "config.yaml",
        "meta.json",
        "tensorboard",
    }
    assert all(written_by_a_run(p) for p in folder.iterdir()), sorted(p.name for p in folder.iterdir())
    events = sorted((folder / "tensorboard").rglob("events.out.tfevents.*"))
    old_events = [p.rename(p.with_name(f"events.out.tfevents.previous-run-{k}")) for k, p in enumerate(events)]
    assert old_events
    assert run("distill", str(config_file), "--out", str(folder), "epochs=1", "--force") == 0
    assert not (folder / "checkpoint.pt.tmp").exists() and not any(p.exists() for p in old_events)


def test_a_failed_start_leaves_no_half_folder(config_file, tmp_path, monkeypatch):
    from dtokd.train import loop

    def broken(*args, **kwargs):
        raise RuntimeError("boom in the first epoch")

    monkeypatch.setattr(loop, "_train_epoch", broken)
    with pytest.raises(RuntimeError, match="boom"):
        train(load_config(config_file), tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_default_folder_names_a_changed_method(config_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        run(
            "distill",
            str(config_file),
            "epochs=1",
            "--balancer",
            "fixed",
            "balancer.options={weights: {distill: 0.9, task: 0.1}}",
        )
        == 0
    )
    assert (tmp_path / "runs" / "s-fixed" / "summary.json").is_file() and not (tmp_path / "runs" / "s").exists()


# ------------------------------------------------------------------------ 3. caches keyed by content


def write_folder(root: Path, counts: dict[str, int]) -> None:
    from PIL import Image

    for split in ("train", "test"):
        for cls, count in counts.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for k in range(count):
                Image.new("RGB", (8, 8), (40 * k % 255, 100, 7)).save(root / split / cls / f"{k}.png")


def test_image_folder_cache_sees_files_added_deep_in_the_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "images"
    write_folder(root, {"a": 2, "b": 2})
    first = sources.load_image_folder(root, 8)
    assert first.train_images.shape[0] == 4
    write_folder(root, {"a": 3, "b": 2, "c": 1})  # new files and a new class, deep inside
    second = sources.load_image_folder(root, 8)
    assert second.train_images.shape[0] == 6 and second.classes == ("a", "b", "c")


# ------------------------------------------------------------------------ 4. eval = the logged epoch


def test_eval_equals_the_logged_epoch_with_limit_train(config_file, tmp_path, capsys):
    folder = tmp_path / "run"
    assert run("distill", str(config_file), "--out", str(folder), "epochs=2", "data.limit_train=100") == 0
    capsys.readouterr()
    assert cli.main(["eval", str(folder), "--which", "last", "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    logged = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()][-1]
    assert evaluated["top1"] == logged["test_top1"] and evaluated["loss"] == pytest.approx(
        logged["test_loss"], rel=1e-6
    )


# ------------------------------------------------------------------------ 5. messages, not tracebacks


def test_errors_are_one_line_with_exit_code_2(config_file, teacher, tmp_path, capsys, monkeypatch):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not torch")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(teacher.read_bytes()[:200])
    checkpoint = teacher.parent / "checkpoint.pt"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n")
    not_archive = tmp_path / "images.tar.gz"
    not_archive.write_text("plain text")
    cases = [
        (["distill", str(bad_yaml)], "is not valid YAML"),
        (["distill", str(config_file), "optim.lr=[1"], "the value is not valid YAML"),
        (["distill", str(config_file), "balancer.options={foo: 1}"], "balancer.options={'foo': 1} for method 'dto'"),
        (["distill", str(config_file), "--balancer", "fixed"], "method 'fixed' needs weights"),
        (["distill", str(config_file), f"teacher.checkpoint={garbage}"], "is not a readable state dict"),
        (["distill", str(config_file), f"teacher.checkpoint={truncated}"], "is not a readable state dict"),
        (["distill", str(config_file), f"teacher.checkpoint={checkpoint}"], "give its best.pt"),
        (
            ["distill", str(config_file), "data.name=image-folder", f"data.root={not_archive}"],
            "is not a readable .tar.gz of an image folder",
        ),
        (["distill", str(config_file), "epochs=-1"], "epochs=-1 is not allowed; it must be an integer >= 0"),
    ]
    if not torch.cuda.is_available():
        cases.append((["distill", str(config_file), "device=cuda"], "no CUDA device is available here"))
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))
    for k, (args, message) in enumerate(cases):
        capsys.readouterr()
        assert run(*args, "--out", str(tmp_path / f"out{k}")) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / f"out{k}").exists()
    monkeypatch.setenv("DTOKD_DEBUG", "1")
    with pytest.raises(ConfigError):
        cli.main(["distill", str(bad_yaml)])


def test_a_file_named_jpg_that_is_no_image_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "images"
    write_folder(root, {"a": 1, "b": 1})
    (root / "train" / "a" / "broken.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=r"broken.jpg is not a readable image"):
        sources.load_image_folder(root, 8)


def test_an_image_folder_skips_hidden_entries_and_refuses_what_is_not_its_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "images"
    write_folder(root, {"a": 2, "b": 1})
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0\1")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    raw = sources.load_image_folder(root, 8)
    assert raw.classes == ("a", "b") and raw.train_labels.tolist() == [0, 0, 1]
    cases = [
        (
            lambda: (root / "train" / "labels.csv").write_text("x"),
            "holds files outside the class folders \\(labels.csv\\)",
        ),
        (lambda: (root / "test" / "c").mkdir(), "has class folders that .*train has not \\(c\\)"),
        (lambda: (root / "train" / "a" / "more").mkdir(), "a/more is a folder inside a class folder"),
    ]
    for make, message in cases:
        make()
        with pytest.raises(ValueError, match=message):
            sources.load_image_folder(root, 8)
        shutil.rmtree(root)
        write_folder(root, {"a": 2, "b": 1})


def test_a_decompression_bomb_is_named(tmp_path, monkeypatch):
    """An image whose pixel count exceeds PIL's decompression-bomb limit (here lowered so that an
    8x8 image is one): one line naming the file, not PIL's traceback."""
    from PIL import Image

    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)
    root = tmp_path / "images"
    write_folder(root, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match=r"\.png is not a readable image \(Image size \(64 pixels\) exceeds limit"):
        sources.load_image_folder(root, 8)


def test_sigint_saves_nothing_half_written_and_resume_ends_where_a_straight_run_ends(config_file, tmp_path):
    """A real Ctrl-C to a running `dtokd distill`, then --resume: the same final weights."""
    folder, straight = tmp_path / "run", tmp_path / "straight"
    command = [sys.executable, "-m", "dtokd", "distill", str(config_file), "epochs=40", "data.limit_train=200"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [*command, "--out", str(folder)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.time() + 120
    while not (folder / "checkpoint.pt").is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("the run finished before the interrupt arrived")
    assert process.returncode == 130 and f"--resume --out {folder}" in err and "Traceback" not in err
    assert not list(folder.glob("*.tmp"))
    subprocess.run([*command[:4], "--resume", "--out", str(folder)], check=True, env=env, capture_output=True)
    subprocess.run([*command, "--out", str(straight)], check=True, env=env, capture_output=True)
    a, b = (torch.load(f / "checkpoint.pt", weights_only=False) for f in (folder, straight))
    assert a["epoch"] == b["epoch"] == 40
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])


# ------------------------------------------------------------------------ 7. smaller ones


def test_a_checkpoint_with_flipped_bytes_is_refused(config_file, tmp_path, capsys):
    folder = tmp_path / "run"
    assert run("distill", str(config_file), "--out", str(folder), "epochs=1") == 0
    for name in ("best.pt", "checkpoint.pt"):
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0x10  # inside the tensor data
        (folder / name).write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(["eval", str(folder)]) == 2
    assert "does not match the checksum" in capsys.readouterr().err
    assert run("distill", "--resume", "--out", str(folder), "--extend-epochs", "2") == 2
    assert "does not match the checksum" in capsys.readouterr().err


def test_report_of_an_unfinished_run_and_garbage_logs(config_file, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    interrupt_after(monkeypatch, 1)
    assert run("distill", str(config_file), "--out", str(folder)) == 130
    text = report([folder], tmp_path / "rep").read_text()
    assert "| run (unfinished) | dto | 0 | 1 |" in text and "?" not in text
    (folder / "metrics.jsonl").write_text("{oops\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a JSON object"):
        report([folder], tmp_path / "rep2")


def test_help_lists_methods_and_python_dash_m_runs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "dto-amortized" in out and "gradnorm" in out
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "``" not in capsys.readouterr().out
    result = subprocess.run([sys.executable, "-m", "dtokd", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "dtokd train" in result.stdout


def test_zero_epochs_checks_the_teacher_only(config_file, tmp_path):
    summary = train(load_config(config_file, ["epochs=0"]), tmp_path / "run", progress=False, verbose=False)
    assert summary["epochs_run"] == 0 and summary["method"] == "dto" and summary["teacher"]["test_top1"] > 0
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_a_checkpoint_from_before_the_checksums_still_loads_with_a_warning(config_file, tmp_path):
    from dtokd.models.registry import read_weights

    folder = tmp_path / "run"
    train(load_config(config_file, ["epochs=1"]), folder, progress=False, verbose=False)
    for name in ("best.pt", "checkpoint.pt"):  # as an older dtokd wrote them
        state = torch.load(folder / name, weights_only=False)
        del state["checksum"]
        torch.save(state, folder / name)
    with pytest.warns(RuntimeWarning, match="has no checksum"):
        _, identity = read_weights(folder / "best.pt")
    assert identity["student"] == "mlp_small"
    with pytest.warns(RuntimeWarning, match="has no checksum"):
        summary = train(None, folder, resume=True, extend_epochs=2, progress=False, verbose=False)
    assert summary["epochs_run"] == 2


def test_an_interrupted_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from dtokd.train import checkpoint

    checkpoint.save_atomic({"epoch": 1}, tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "fsync", interrupted)  # Ctrl-C after the bytes, before the rename
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"epoch": 2}, tmp_path / "checkpoint.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert (tmp_path / "checkpoint.pt").read_bytes() == before


def test_nothing_asks_git_at_import():
    """Importing the library, the trainer, the bench and the CLI runs no subprocess for the
    commit: the CLI asks before it dispatches a command (a library user's process never does
    until it trains)."""
    code = (
        "import dtokd, dtokd.train.loop, dtokd.bench, dtokd.cli, dtokd.report\n"
        "from dtokd.train import records\n"
        "print(records.git_commit.cache_info().currsize)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_a_tree_without_its_history_takes_its_commit_from_the_environment(tmp_path):
    """On a lent GPU the tree is a copy without .git: DTOKD_COMMIT (set by benchmarks/gpu_*.sh)
    is the commit every record of the run names; without it, a tree outside git says unknown."""
    code = "from dtokd.train import records; print(records.git_commit())"
    env = {k: v for k, v in os.environ.items() if k != "DTOKD_COMMIT"}
    src = str(Path(__file__).resolve().parents[1] / "src")
    copy = tmp_path / "src"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for extra, expected in (({"DTOKD_COMMIT": "abc1234"}, "abc1234"), ({}, "unknown")):
        run = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            cwd=tmp_path,
            env={**env, **extra, "PYTHONPATH": str(copy)},
        )
        assert run.stdout.strip() == expected


def test_a_checkpoint_holds_the_training_state_and_its_identity(tmp_path):
    """checkpoint.pt = the run's identity + TrainingState.state_dict() (its keys spelled once)."""
    from dtokd.train.state import TrainingState

    overrides = [
        "epochs=1",
        "batch_size=64",
        "data.name=synthetic",
        "student.name=mlp_small",
        "device=cpu",
        "optim.ema_decay=0.9",
    ]
    train(load_config(None, overrides), tmp_path / "run", progress=False, verbose=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    parts = set(TrainingState.PARTS)
    assert set(state) == {"identity", "checksum", "format", "epoch", "history", "rng"} | parts
    assert state["epoch"] == 1 and len(state["history"]) == 1
