"""A run without a teacher is one run across the pairs that share its configuration: the bench
runs it once and every such pair's table reads it (decided from configurations and records,
without training)."""

import csv
import json

from dtokd import bench
from dtokd.bench import Pair, aggregate, shared_runs, training

from helpers import bench_matrix

ALONE = ["teacher.name=null", "teacher.checkpoint=null", "losses={task: {type: ce}}"]
ALONE += ["balancer.method=fixed", "balancer.options={weights: {task: 1.0}}"]


def _matrix(tmp_path, **pairs):
    return bench_matrix(
        tmp_path,
        pairs=pairs
        or {
            "a": Pair(teacher="cnn_small", student="mlp_small"),
            "b": Pair(teacher="mlp_small", student="mlp_small", overrides=["teacher.key_map=null"]),
            "c": Pair(teacher="cnn_small", student="cnn_small"),
            "d": Pair(teacher="cnn_small", student="mlp_small", overrides=["optim.lr=0.5"]),
        },
        methods={"kd": ["balancer.method=fixed"], "alone": ALONE},
    )


def test_only_a_teacher_free_cell_with_the_same_configuration_is_shared(tmp_path):
    shared = shared_runs(_matrix(tmp_path))
    # b: another teacher, the same student run; c: another student; d: another learning rate
    assert shared == {("b", "alone", s): ("a", "alone", s) for s in (0, 1)}


def test_a_cell_of_a_shared_run_trains_the_first_pairs_folder(tmp_path, monkeypatch):
    matrix = _matrix(tmp_path)
    teacher = tmp_path / "teacher.pt"
    teacher.write_bytes(b"")
    trained = []
    monkeypatch.setattr(training, "train", lambda config, folder, **_: trained.append((folder, config.teacher.name)))
    bench.run_cell(matrix, tmp_path / "out", "b", "alone", 1, teacher)
    bench.run_cell(matrix, tmp_path / "out", "b", "kd", 1, teacher)
    assert trained == [
        (tmp_path / "out" / "a" / "alone" / "seed1", None),
        (tmp_path / "out" / "b" / "kd" / "seed1", "mlp_small"),
    ]


def test_the_runs_a_selection_stands_for_are_named_once(tmp_path, capsys):
    shared = shared_runs(_matrix(tmp_path))
    cells = [("a", "alone", 0), ("b", "alone", 0), ("b", "kd", 0), ("b", "alone", 1)]
    assert bench._the_runs(cells, shared) == [("a", "alone", 0), ("b", "kd", 0), ("a", "alone", 1)]
    said = capsys.readouterr().out
    assert "b alone 0 is the run of pair 'a'" in said and "b alone 1 is the run of pair 'a'" in said


def _finish(out, pair, method, seed, top1):
    folder = out / pair / method / f"seed{seed}"
    folder.mkdir(parents=True)
    summary = {"metric": "top1", "best_val_top1": top1, "test_top1_at_best_val": top1, "best_test_top1": top1}
    summary |= {"last_test_top1": top1, "seconds_per_epoch": 1.0}
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "val_top1": top1}) + "\n")
    (folder / "steps.jsonl").write_text("")


def test_every_sharing_pairs_table_reads_the_one_run(tmp_path):
    matrix = _matrix(
        tmp_path,
        a=Pair(teacher="cnn_small", student="mlp_small"),
        b=Pair(teacher="mlp_small", student="mlp_small"),
    )
    out = tmp_path / "out"
    for seed, (alone, kd_a, kd_b) in enumerate([(60.0, 70.0, 65.0), (61.0, 72.0, 64.0)]):
        _finish(out, "a", "alone", seed, alone)
        _finish(out, "a", "kd", seed, kd_a)
        _finish(out, "b", "kd", seed, kd_b)
    md = aggregate(matrix, out).read_text()
    assert not (out / "b" / "alone").exists()
    assert "| b | alone (run in a) | 60.50 ± 0.71 |" in md
    assert "| a | alone | 60.50 ± 0.71 |" in md  # its own pair: no mark
    rows = {(r["pair"], r["method"]): r for r in csv.DictReader(open(out / "results.csv"))}
    assert float(rows[("b", "alone (run in a)")]["paired_vs_reference"]) == ((60 - 65) + (61 - 64)) / 2
    assert float(rows[("a", "alone")]["paired_vs_reference"]) == ((60 - 70) + (61 - 72)) / 2
