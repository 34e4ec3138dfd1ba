"""``eval.select``: the validation metric that chooses ``best.pt`` and that summaries and benches
report first; a perplexity or loss chooses its lowest epoch. Checked by hand on written histories,
by brute force against the loop's own choice of ``best.pt``, and in the bench's grid and tables."""

import csv
import json

import pytest

from dtokd.bench import aggregate, grid_choice
from dtokd.train import ConfigError, load_config, loop, train
from dtokd.train.config import SELECTION_METRICS, selection_metric

from helpers import bench_matrix

LM = ["task=causal-lm", "data.name=text", "student.name=hf-causal-lm:llama"]

HISTORY = [  # top1 and ppl disagree: top1 is best at epoch 3, ppl at epoch 2 (and tied at 4: the later wins)
    {"epoch_seconds": 1.0, "val_top1": 20.0, "val_ppl": 50.0, "test_top1": 19.0, "test_ppl": 52.0},
    {"epoch_seconds": 1.0, "val_top1": 25.0, "val_ppl": 40.0, "test_top1": 24.0, "test_ppl": 41.0},
    {"epoch_seconds": 1.0, "val_top1": 30.0, "val_ppl": 45.0, "test_top1": 29.0, "test_ppl": 46.0},
    {"epoch_seconds": 1.0, "val_top1": 28.0, "val_ppl": 40.0, "test_top1": 27.0, "test_ppl": 39.0},
    {"epoch_seconds": 1.0, "val_top1": 29.0, "val_ppl": 42.0, "test_top1": 28.0, "test_ppl": 43.0},
]


def test_each_task_defaults_to_its_first_metric_and_select_overrides_it():
    assert selection_metric(load_config(None, [])) == "top1"
    assert selection_metric(load_config(None, ["task=detection"])) == "AP"
    assert selection_metric(load_config(None, LM)) == "top1"
    assert selection_metric(load_config(None, [*LM, "eval.select=ppl"])) == "ppl"
    assert {task: metrics[0] for task, metrics in SELECTION_METRICS.items()} == {
        "classification": "top1",
        "detection": "AP",
        "causal-lm": "top1",
    }


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["eval.select=ppl"],
            "eval.select='ppl' is not allowed for task 'classification'; use one of ['top1', 'top5']",
        ),
        ([*LM, "eval.select=bleu"], "eval.select='bleu' is not allowed for task 'causal-lm'"),
        (["task=detection", "eval.select=top1"], "use one of ['AP', 'AP50', 'AP75'] or null"),
    ],
)
def test_a_metric_the_task_does_not_measure_is_refused_with_the_allowed_ones(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, overrides)


def test_a_perplexity_chooses_its_lowest_epoch_the_latest_of_ties():
    summary = loop.summarize(HISTORY, load_config(None, [*LM, "eval.select=ppl"]))
    assert summary["metric"] == "ppl" and summary["best_epoch"] == 4  # 40.0 at epochs 2 and 4
    assert summary["best_val_ppl"] == 40.0 and summary["test_ppl_at_best_val"] == 39.0
    assert summary["best_test_ppl"] == 39.0  # the lowest test perplexity, not the highest
    assert summary["last_test_ppl"] == 43.0
    # the other figure a causal LM reports beside the choosing one: top-1 at the same epochs
    assert summary["test_top1_at_best_val"] == 27.0 and summary["last_test_top1"] == 28.0
    assert "best_val_top1" not in summary


def test_the_default_still_chooses_on_next_token_top1_and_adds_the_perplexity():
    summary = loop.summarize(HISTORY, load_config(None, LM))
    assert summary["metric"] == "top1" and summary["best_epoch"] == 3
    assert summary["best_test_top1"] == 29.0 and summary["test_top1_at_best_val"] == 29.0
    assert summary["test_ppl_at_best_val"] == 46.0 and summary["last_test_ppl"] == 43.0


@pytest.mark.parametrize("metric", ["top1", "ppl"])
def test_the_loop_keeps_as_best_pt_the_epoch_the_summary_chooses(metric):
    config = load_config(None, [*LM, f"eval.select={metric}"])
    for end in range(1, len(HISTORY) + 1):  # brute force over every prefix of the history
        prefix = HISTORY[:end]
        assert loop._is_best(prefix, metric) == (loop.summarize(prefix, config)["best_epoch"] == end)


def test_a_run_keeps_the_epoch_chosen_on_the_selected_metric(tmp_path, monkeypatch):
    """Scripted validation figures that disagree (top-1 best at epoch 2, top-5 at epoch 3): with
    ``eval.select=top5`` the run keeps epoch 3 as ``best.pt``, and its end-of-run test on
    ``best.pt`` (which refuses a checkpoint other than the one the history chooses) agrees."""
    scripted = iter([(50.0, 80.0), (60.0, 85.0), (55.0, 90.0), (40.0, 70.0)])
    evaluate = loop._evaluate

    def fake(config, p, model, ema, splits):
        row = evaluate(config, p, model, ema, splits)
        if splits == ("val",):
            row["val_top1"], row["val_top5"] = next(scripted)
        return row

    monkeypatch.setattr(loop, "_evaluate", fake)
    config = load_config(
        None,
        [
            "data.name=synthetic",
            "student.name=mlp_small",
            "batch_size=32",
            "eval_batch_size=64",
            "epochs=4",
            "eval.test=end",
            "eval.select=top5",
        ],
    )
    summary = train(config, tmp_path / "run", progress=False, verbose=False)
    assert summary["metric"] == "top5" and summary["best_epoch"] == 3 and summary["best_val_top5"] == 90.0
    assert loop.torch.load(tmp_path / "run" / "best.pt", weights_only=False)["epoch"] == 3


def _finish(out, method, seed, val_ppl, test_ppl, curve):
    folder = out / "p" / method / f"seed{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    summary = {
        "metric": "ppl",
        "best_val_ppl": val_ppl,
        "test_ppl_at_best_val": test_ppl,
        "best_test_ppl": min(curve),
        "last_test_ppl": curve[-1],
        "seconds_per_epoch": 10.0,
        "test_evaluated": "every",
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = [{"epoch": k, "val_ppl": v, "test_ppl": v} for k, v in enumerate(curve)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "steps.jsonl").write_text(json.dumps({"step": 0, "loss_weight/task": 0.5}) + "\n")


def test_a_perplexity_grid_chooses_its_lowest_member(tmp_path):
    matrix = bench_matrix(tmp_path, methods={"kd-a": [], "kd-b": [], "dto": []}, reference="kd-a", grid_prefix="kd-")
    _finish(tmp_path, "kd-a", 0, 40.0, 41.0, [60.0, 41.0])
    _finish(tmp_path, "kd-b", 0, 35.0, 36.0, [55.0, 36.0])
    assert grid_choice(matrix, tmp_path / "p") == "kd-b"


def test_a_perplexity_bench_counts_epochs_to_the_references_final_downwards(tmp_path):
    _finish(tmp_path, "kd", 0, 40.0, 41.0, [60.0, 50.0, 41.0])
    _finish(tmp_path, "dto", 0, 38.0, 39.0, [55.0, 40.0, 39.0])  # at or below 41 from epoch 2
    md = aggregate(bench_matrix(tmp_path), tmp_path).read_text()
    assert "test ppl at best val" in md and (tmp_path / "accuracy_p.png").is_file()
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "results.csv"))}
    assert rows["dto"]["epochs_to_reference_final"] == "2" and rows["kd"]["epochs_to_reference_final"] == "3"
    assert float(rows["dto"]["paired_vs_reference"]) == 39.0 - 41.0
