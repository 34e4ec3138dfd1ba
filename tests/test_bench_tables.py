"""The bench's tables from finished cells' records, without training: a metric the summaries
report beside the one that chooses the epoch (a causal LM's perplexity) gets its columns and
its paired difference, computed here by hand."""

import csv
import json
import statistics

from dtokd.bench import aggregate, other_metrics

from helpers import bench_matrix


def _finish(out, method, seed, top1, ppl, last_ppl):
    folder = out / "p" / method / f"seed{seed}"
    folder.mkdir(parents=True)
    summary = {
        "metric": "top1",
        "best_val_top1": top1,
        "test_top1_at_best_val": top1,
        "best_test_top1": top1,
        "last_test_top1": top1,
        "test_ppl_at_best_val": ppl,
        "last_test_ppl": last_ppl,
        "seconds_per_epoch": 10.0,
        "test_evaluated": "every",
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = [{"epoch": 0, "val_top1": top1, "test_top1": top1, "test_ppl": last_ppl}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "steps.jsonl").write_text(json.dumps({"step": 0, "loss_weight/task": 0.5}) + "\n")


def test_the_metrics_beside_the_choosing_one_are_the_summaries_other_at_best_val_keys():
    summary = {"metric": "top1", "test_top1_at_best_val": 1.0, "test_ppl_at_best_val": 2.0, "test_evaluated": "end"}
    assert other_metrics([summary], "top1") == ["ppl"]
    assert other_metrics([{"test_top1_at_best_val": 1.0}], "top1") == []
    assert other_metrics([], "top1") == []


def test_perplexity_columns_and_their_paired_differences(tmp_path):
    values = {("kd", 0): (30.0, 33.0, 33.5), ("kd", 1): (31.0, 34.0, 34.2)}
    values |= {("dto", 0): (30.5, 32.0, 32.1), ("dto", 1): (30.0, 33.5, 33.9)}
    for (method, seed), v in values.items():
        _finish(tmp_path, method, seed, *v)
    md = aggregate(bench_matrix(tmp_path), tmp_path).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| pair"))
    for column in ("test ppl at best val", "paired ppl vs ref.", "last test ppl"):
        assert f"| {column} |" in header
    assert "for a perplexity, lower is better" in md
    rows = {r["method"].split(" ")[0]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    differences = [values[("dto", s)][1] - values[("kd", s)][1] for s in (0, 1)]  # -1.0, -0.5
    assert float(rows["dto"]["paired_ppl_vs_reference"]) == statistics.fmean(differences)
    assert float(rows["dto"]["paired_ppl_vs_reference_std"]) == statistics.stdev(differences)
    assert float(rows["dto"]["test_ppl_at_best_val"]) == statistics.fmean([32.0, 33.5])
    assert float(rows["dto"]["last_test_ppl"]) == statistics.fmean([32.1, 33.9])
    assert float(rows["kd"]["paired_ppl_vs_reference"]) == 0.0
    dto_line = next(line for line in md.splitlines() if line.startswith("| p | dto"))
    assert "| 32.75 ± 1.06 | -0.75 ± 0.35 | 33.00 ± 1.27 |" in dto_line


def test_a_classification_table_has_no_columns_for_other_metrics(tmp_path):
    for method, seed in (("kd", 0), ("dto", 0)):
        folder = tmp_path / "p" / method / f"seed{seed}"
        _finish(tmp_path, method, seed, 70.0, 0.0, 0.0)
        summary = json.loads((folder / "summary.json").read_text())
        del summary["test_ppl_at_best_val"], summary["last_test_ppl"]
        (folder / "summary.json").write_text(json.dumps(summary))
    md = aggregate(bench_matrix(tmp_path), tmp_path).read_text()
    assert "ppl" not in md
    header = next(line for line in md.splitlines() if line.startswith("| pair"))
    assert header.count("|") == 15  # the 14 columns


def _teacher(out, method, seed, **record):
    (out / "p" / method / f"seed{seed}" / "teacher.json").write_text(json.dumps({"name": "t", **record}))


def test_paired_differences_skip_seeds_whose_cells_learned_from_different_teachers(tmp_path):
    values = {("kd", 0): (30.0, 33.0, 33.0), ("kd", 1): (31.0, 34.0, 34.0)}
    values |= {("dto", 0): (30.5, 32.0, 32.0), ("dto", 1): (30.0, 33.5, 33.5)}
    for (method, seed), v in values.items():
        _finish(tmp_path, method, seed, *v)
    for method in ("kd", "dto"):  # seed 0: one teacher, by its weights' digest
        _teacher(tmp_path, method, 0, weights="aa", test_loss=3.5)
    _teacher(tmp_path, "kd", 1, weights="aa", test_loss=3.5)
    _teacher(tmp_path, "dto", 1, weights="bb", test_loss=3.5)  # seed 1: retrained, other weights
    aggregate(bench_matrix(tmp_path), tmp_path)
    rows = {r["method"].split(" ")[0]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert int(rows["dto"]["paired_seeds"]) == 1
    assert float(rows["dto"]["paired_vs_reference"]) == 30.5 - 30.0  # seed 0's difference alone
    assert float(rows["dto"]["paired_ppl_vs_reference"]) == 32.0 - 33.0
    assert float(rows["dto"]["test_top1_at_best_val"]) == statistics.fmean([30.5, 30.0])  # both seeds still


def test_same_teacher_by_digest_else_by_the_measured_figures_and_none_pairs_with_any(tmp_path):
    from dtokd.bench import same_teacher

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert same_teacher(a, b)  # neither distilled
    (a / "teacher.json").write_text(json.dumps({"name": "t", "checkpoint": "x", "weights": "aa", "test_loss": 3.5}))
    assert same_teacher(a, b)  # the student alone pairs with any teacher's run
    (b / "teacher.json").write_text(json.dumps({"name": "t", "checkpoint": "y", "weights": "aa", "test_loss": 3.6}))
    assert same_teacher(a, b)  # the digest decides where both have it (another path, same weights)
    (b / "teacher.json").write_text(json.dumps({"name": "t", "checkpoint": "x", "weights": "bb", "test_loss": 3.5}))
    assert not same_teacher(a, b)
    (b / "teacher.json").write_text(json.dumps({"name": "t", "checkpoint": "y", "test_loss": 3.5}))  # an older record
    assert same_teacher(a, b)
    (b / "teacher.json").write_text(json.dumps({"name": "t", "checkpoint": "x", "test_loss": 3.51}))
    assert not same_teacher(a, b)
    (b / "teacher.json").write_text(json.dumps({"name": "u", "checkpoint": "x", "test_loss": 3.5}))
    assert not same_teacher(a, b)
