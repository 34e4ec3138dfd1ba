"""Every shipped config builds and trains: a dry run (two steps on a generated image folder at
the config's image size, the teacher with random weights) through the command line."""

from pathlib import Path

import pytest

from dtokd import cli
from dtokd.train import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("bench_"))


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=[str(p.relative_to(CONFIGS)) for p in RUN_CONFIGS])
def test_every_config_dry_runs(config, capsys, tmp_path, monkeypatch):
    if "timm:" in config.read_text():
        pytest.importorskip("timm", reason="timm is a test dependency (pip install 'dtokd[test]')")
    monkeypatch.chdir(tmp_path)  # nothing may be written where the command runs
    command = "distill" if load_config(config).teacher.name else "train"
    assert cli.main([command, str(config), "--dry-run", "--quiet"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "2 steps ran" in out and "evaluation ran" in out
    assert not any(tmp_path.iterdir())


def test_dry_run_needs_a_config(capsys):
    assert cli.main(["distill", "--dry-run"]) == 2
    assert "needs a CONFIG" in capsys.readouterr().err
