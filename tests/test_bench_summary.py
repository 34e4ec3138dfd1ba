"""The summary over the matrices (``dtokd summary``): paired differences, seeds ahead, the KD
choice, missing cells and their command, the pages' blocks and the figure, from hand-made
records whose figures are worked out here."""

import json
import statistics
from pathlib import Path

import pytest

from dtokd.bench.summary import BEGIN, END, read_block, summaries, summary_markdown, write_block, write_summary
from dtokd.cli import main

ROOT = Path(__file__).resolve().parents[1]
ALONE = "[teacher.name=null, teacher.checkpoint=null, 'losses={task: {type: ce}}', balancer.method=fixed]"


def _project(tmp_path, recommended_override: str = "") -> Path:
    """A project folder: a matrix over a tiny config (seeds 0-2; KD reference, one grid member,
    the rule, the student alone) and a summary file naming one setting."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "student.yaml").write_text(
        "name: s\ndata: {name: synthetic}\nstudent: {name: mlp_small}\n"
        "teacher: {name: cnn_small, checkpoint: none}\nlosses: {distill: {type: kd}, task: {type: ce}}\n"
    )
    (configs / "matrix.yaml").write_text(
        "name: tiny\nseeds: [0, 1, 2]\nstudent_config: configs/student.yaml\nteacher_config: configs/student.yaml\n"
        "pairs: {p: {teacher: cnn_small, student: mlp_small}}\nreference: kd-fixed\ngrid_prefix: kd-\n"
        "methods:\n  kd-fixed: [balancer.method=fixed]\n  kd-a: [balancer.method=fixed]\n"
        f"  rule: [balancer.method=dto-amortized]\n  alone: {ALONE}\n"
    )
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "summary.yaml").write_text(
        "recommended: rule\nsettings:\n  - {name: tiny setting, matrix: configs/matrix.yaml, "
        f"record: records/tiny, pair: p, student_alone: alone{recommended_override}}}\n"
    )
    return tmp_path


def _finish(project: Path, method: str, seed: int, test: float, val: float | None = None, ppl: float | None = None):
    folder = project / "records" / "tiny" / "cells" / "p" / method / f"seed{seed}"
    folder.mkdir(parents=True)
    summary = {"metric": "top1", "best_val_top1": test if val is None else val, "test_top1_at_best_val": test}
    if ppl is not None:
        summary["test_ppl_at_best_val"] = ppl
    (folder / "summary.json").write_text(json.dumps(summary))


def _filled(tmp_path, **kwargs) -> Path:
    """KD's grid: kd-a wins seed 0's validation (72 > 70); the rule is +1, -0.5, +2 against it and
    ahead of the student alone on seeds 0 and 1; the student alone's seed 2 is missing."""
    project = _project(tmp_path, **kwargs)
    _finish(project, "kd-fixed", 0, 69.0, val=70.0)
    for seed, (kd, rule, alone) in enumerate([(71.0, 72.0, 65.0), (70.0, 69.5, 66.0), (70.5, 72.5, None)]):
        _finish(project, "kd-a", seed, kd, val=72.0 if seed == 0 else None)
        _finish(project, "rule", seed, rule)
        if alone is not None:
            _finish(project, "alone", seed, alone)
    return project


def test_paired_differences_seeds_ahead_and_the_tuned_choice(tmp_path):
    project = _filled(tmp_path)
    (found,) = summaries(project / "benchmarks" / "summary.yaml")
    assert found.kd_choice == "kd-a (tuned on seed 0)"
    assert found.versus_kd.values == [1.0, -0.5, 2.0]
    assert found.ahead(found.versus_kd) == 2
    assert found.versus_student.values == [7.0, 3.5]
    assert found.missing == [("alone", 2)]
    table = summary_markdown([found])
    std = statistics.stdev([1.0, -0.5, 2.0])
    assert f"| tiny setting | rule | top1 | kd-a (tuned on seed 0) | 0.83 ± {std:.2f} (n=3) | 2/3 |" in table
    assert f"| 5.25 ± {statistics.stdev([7.0, 3.5]):.2f} (n=2) | 2/2 | 1 |" in table
    assert (
        "missing: alone seed 2. Runs them: `python benchmarks/bench_record.py restore records/tiny runs/matrix && "
        in table
    )
    assert "dtokd bench configs/matrix.yaml --out runs/matrix --pairs p --methods alone --seeds 2 && " in table
    assert "python benchmarks/bench_record.py save runs/matrix records/tiny`" in table
    assert "The bench trains this pair's teacher again" in table  # the matrix gives no checkpoint


def test_a_diverged_cell_another_teacher_and_one_seed_are_said(tmp_path):
    project = _filled(tmp_path)
    folder = project / "records" / "tiny" / "cells" / "p"
    (folder / "rule" / "seed1" / "summary.json").unlink()
    (folder / "rule" / "seed1" / "diverged.json").write_text("{}")
    for method, weights in (("rule", "aaa"), ("kd-a", "bbb")):
        (folder / method / "seed2" / "teacher.json").write_text(json.dumps({"weights": weights}))
    (found,) = summaries(project / "benchmarks" / "summary.yaml")
    assert found.versus_kd.values == [1.0]  # seed 1 diverged, seed 2 had another teacher
    assert found.diverged == [("rule", 1)] and found.unpaired == [("kd-a", 2)]
    table = summary_markdown([found])
    assert "| 1.00 (n=1) | 1/1 |" in table  # one seed: no spread shown
    assert "diverged (no figures, not compared): rule seed 1" in table
    assert "not paired (the rule's cell had another teacher): kd-a seed 2" in table


def test_a_record_without_cells_gets_no_restore_and_a_missing_metric_is_named(tmp_path):
    project = _project(tmp_path)
    (found,) = summaries(project / "benchmarks" / "summary.yaml")
    assert found.versus_kd.values == [] and len(found.missing) == 3 * 3 + 1
    assert found.resume.startswith("OMP_NUM_THREADS=1 dtokd bench configs/matrix.yaml --out runs/matrix ")
    (tmp_path / "again").mkdir()
    project = _filled(tmp_path / "again", recommended_override=", metric: ppl")
    with pytest.raises(ValueError, match="metric 'ppl' is not recorded by the cells; they have \\['top1'\\]"):
        summaries(project / "benchmarks" / "summary.yaml")


def test_an_unfinished_grid_compares_with_the_reference_and_lists_the_grid_cell(tmp_path):
    project = _project(tmp_path)
    for seed in (0, 1, 2):
        _finish(project, "kd-fixed", seed, 70.0)
        _finish(project, "rule", seed, 71.0)
    (found,) = summaries(project / "benchmarks" / "summary.yaml")
    assert found.kd_choice == "kd-fixed (grid unfinished)"
    assert found.versus_kd.values == [1.0, 1.0, 1.0]
    assert ("kd-a", 0) in found.missing and ("kd-a", 1) not in found.missing


def test_a_lower_is_better_metric_counts_the_lower_value_as_ahead(tmp_path):
    project = _project(tmp_path, recommended_override=", metric: ppl")
    for seed, (kd, rule) in enumerate([(30.0, 29.0), (30.0, 31.0), (30.0, 29.5)]):
        _finish(project, "kd-fixed", seed, 40.0, ppl=kd)
        _finish(project, "kd-a", seed, 39.0, ppl=kd)
        _finish(project, "rule", seed, 40.0, ppl=rule)
    (found,) = summaries(project / "benchmarks" / "summary.yaml")
    assert found.metric == "ppl" and found.versus_kd.values == [-1.0, 1.0, -0.5]
    assert found.ahead(found.versus_kd) == 2
    assert "| ppl (lower is better) |" in summary_markdown([found])


def test_a_method_the_matrix_lacks_and_an_unknown_key_are_named(tmp_path):
    project = _project(tmp_path, recommended_override=", recommended: nope")
    with pytest.raises(ValueError, match="method 'nope' is not one of configs/matrix.yaml's"):
        summaries(project / "benchmarks" / "summary.yaml")
    (project / "benchmarks" / "summary.yaml").write_text("recommended: rule\ncolour: red\nsettings: []\n")
    with pytest.raises(ValueError, match="colour"):
        summaries(project / "benchmarks" / "summary.yaml")


def test_the_block_is_written_between_the_markers_only_and_a_page_without_them_is_refused(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nbefore\n{BEGIN}\nold table\n{END}\nafter\n")
    assert write_block(page, "| new |\n")
    assert page.read_text() == f"# Title\n\nbefore\n{BEGIN}\n| new |\n{END}\nafter\n"
    assert read_block(page) == "| new |\n"
    assert not write_block(page, "| new |\n")  # unchanged: not rewritten
    plain = tmp_path / "plain.md"
    plain.write_text(f"mine, naming {END} first\n{BEGIN}\n")
    with pytest.raises(ValueError, match="has no <!-- summary --> ... <!-- /summary --> block"):
        write_block(plain, "| new |\n")
    assert plain.read_text() == f"mine, naming {END} first\n{BEGIN}\n"
    named_first = tmp_path / "named.md"
    named_first.write_text(f"the end marker {END} named in the text\n{BEGIN}\nold\n{END}\n")
    assert write_block(named_first, "| new |\n") and read_block(named_first) == "| new |\n"


def test_no_page_is_written_when_one_of_them_has_no_block(tmp_path):
    project = _filled(tmp_path)
    good, bad = project / "good.md", project / "bad.md"
    good.write_text(f"{BEGIN}\nold\n{END}\n")
    bad.write_text("no block\n")
    with pytest.raises(ValueError, match="bad.md has no"):
        write_summary(project / "benchmarks" / "summary.yaml", pages=[good, bad])
    assert good.read_text() == f"{BEGIN}\nold\n{END}\n"


def test_the_command_writes_the_figure_and_the_pages(tmp_path, monkeypatch, capsys):
    project = _filled(tmp_path)
    page = project / "results.md"
    page.write_text(f"{BEGIN}\n{END}\n")
    monkeypatch.chdir(project)
    assert main(["summary", "benchmarks/summary.yaml", "--figure", "summary.png", "--write", "results.md"]) == 0
    assert (project / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert read_block(page) == capsys.readouterr().out


def test_the_readme_and_the_results_page_carry_the_summary_of_the_records():
    table = write_summary(ROOT / "benchmarks" / "summary.yaml")
    for page in (ROOT / "README.md", ROOT / "docs" / "results.md"):
        assert read_block(page) == table, (
            f"{page.name}'s summary is not the records' one: run "
            "dtokd summary benchmarks/summary.yaml --figure benchmarks/results/summary.png "
            "--write README.md docs/results.md"
        )
