"""benchmarks/cell_cost.py: every method of a matrix built and timed side by side on a tiny
matrix (synthetic data, a teacher trained here), its ratios to the reference and a cell's
training part computed from what it measured, and the user's cache left alone."""

import json
import os

import pytest

from dtokd import cli

from helpers import benchmark_script

HALVES = "'balancer.options={weights: [0.5, 0.5]}'"


@pytest.fixture(scope="module")
def cell_cost():
    return benchmark_script("cell_cost")


def test_every_method_is_timed_against_the_reference(cell_cost, tmp_path, monkeypatch):
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "users_cache"))
    common = "batch_size: 16\ndata: {name: synthetic}\n"
    (tmp_path / "t.yaml").write_text(f"name: t\nepochs: 1\n{common}student: {{name: cnn_small}}\n")
    assert cli.main(["train", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "teacher"), "--quiet"]) == 0
    (tmp_path / "s.yaml").write_text(
        f"name: s\n{common}student: {{name: mlp_small}}\nteacher: {{name: cnn_small, checkpoint: none}}\n"
        "losses: {distill: {type: kd}, task: {type: ce}}\n"
    )
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(
        f"name: tiny\nseeds: [0]\nstudent_config: {tmp_path / 's.yaml'}\nteacher_config: {tmp_path / 't.yaml'}\n"
        "base: [epochs=3, data.limit_train=72]\n"
        f"pairs: {{p: {{teacher: cnn_small, student: mlp_small, checkpoint: {tmp_path / 'teacher' / 'best.pt'}}}}}\n"
        f"reference: kd\nmethods:\n  kd: [balancer.method=fixed, {HALVES}]\n  dto: [balancer.method=dto]\n"
        f"  cached: [balancer.method=fixed, {HALVES}, teacher.cache_outputs=true]\n"
    )
    cache_before = sorted(os.listdir(tmp_path / "users_cache")) if (tmp_path / "users_cache").exists() else []
    result = cell_cost.measure(str(matrix), "p", None, steps=2, repeats=2)
    assert os.environ["DTOKD_CACHE"] == str(tmp_path / "users_cache")
    after = sorted(os.listdir(tmp_path / "users_cache")) if (tmp_path / "users_cache").exists() else []
    assert after == cache_before  # the teacher-output cache went to scratch
    assert not (tmp_path / "users_cache" / "teacher-outputs").exists()
    assert list(result["seconds_per_step"]) == ["kd", "dto", "cached"]
    assert all(len(t) == 2 and all(s > 0 for s in t) for t in result["seconds_per_step"].values())
    per_step = result["median_seconds_per_step"]
    assert result["ratio_to_reference"] == {m: per_step[m] / per_step["kd"] for m in per_step}
    assert result["ratio_to_reference"]["kd"] == 1.0
    # a cell: 72 images in batches of 16 (the last partial batch dropped), 3 epochs = 12 steps
    assert result["cell_training_minutes"] == {m: per_step[m] * 12 / 60 for m in per_step}
    table = cell_cost.markdown(result)
    assert "| dto |" in table and "vs kd" in table
    json.dumps(result)  # the record is JSON
