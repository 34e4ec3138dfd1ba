"""A language-model teacher given to the pipeline as its offline top-k outputs (teacher.outputs,
written by ``dtokd teacher-outputs``): blocks found by content, a run from outputs at k = the
vocabulary equal to the run with the live teacher, and every mismatch refused naming the field."""

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="language models need the optional dependency transformers")
pytest.importorskip("tokenizers", reason="language-model data need the optional dependency tokenizers")

from dtokd import cli  # noqa: E402
from dtokd.data.block_hash import HASH_BASE, block_hashes  # noqa: E402
from dtokd.data.fake import write_fake_text  # noqa: E402
from dtokd.data.offline_teacher import OfflineTeacher  # noqa: E402
from dtokd.data.teacher_outputs import TeacherOutputs  # noqa: E402
from dtokd.data.teacher_outputs_writer import write_teacher_outputs  # noqa: E402
from dtokd.models import create_model  # noqa: E402
from dtokd.train import load_config, train  # noqa: E402
from dtokd.train.config import ConfigError  # noqa: E402

from helpers import tiny_lm_overrides  # noqa: E402

LLAMA = "{hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2, " + (
    "intermediate_size: 64, max_position_embeddings: 32}"
)
KD = "losses={distill: {type: token-kd, divergence: forward_kl, temperature: 2.0}, task: {type: ce}}"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A fake corpus, a teacher with seeded random weights saved as a plain state dict, and the
    overrides of a fixed-KD run over them (SGD: a run's weights move linearly with its gradients,
    so two runs whose losses agree to float32 rounding end close)."""
    folder = tmp_path_factory.mktemp("offline")
    corpus = write_fake_text(folder / "text", documents=10, words=200)
    overrides = [
        *tiny_lm_overrides(corpus, LLAMA),
        "teacher.name=hf-causal-lm:llama",
        f"teacher.kwargs={LLAMA}",
        f"teacher.checkpoint={folder / 'teacher.pt'}",
        "optim.name=sgd",
        "optim.lr=0.5",
        "optim.weight_decay=0",
        "balancer.method=fixed",
        "balancer.options={weights: {distill: 0.5, task: 0.5}}",
        KD,
    ]
    config = load_config(None, overrides)
    from dtokd.train.build import data_of

    data = data_of(config)
    torch.manual_seed(3)
    teacher = create_model("hf-causal-lm:llama", data.num_classes, 1, data.image_size, config.teacher.kwargs)
    torch.save(teacher.state_dict(), folder / "teacher.pt")
    return {"folder": folder, "overrides": overrides, "vocabulary": data.num_classes, "data": data}


def _cli_args(setting, out, k, *extra):
    """``dtokd teacher-outputs`` for the run's settings (an empty config file and overrides)."""
    config = setting["folder"] / "run.yaml"
    config.write_text("{}\n")
    return [
        "teacher-outputs",
        str(config),
        *setting["overrides"],
        *extra,
        "--out",
        str(out),
        "--k",
        str(k or setting["vocabulary"]),
        "--dtype",
        "float32",
    ]


def tiny_teacher(length: int):
    """A 1-layer Llama of width 16 over a vocabulary of 50, for blocks of ``length`` tokens."""
    shape = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2}
    return create_model("hf-causal-lm:llama", 50, 1, length, {**shape, "intermediate_size": 32})


def test_blocks_are_found_by_content_in_any_order_and_others_are_refused(tmp_path):
    ids = torch.randint(0, 50, (9, 6), generator=torch.Generator().manual_seed(0))
    ids[4] = ids[1]  # a duplicate block: either copy answers (their outputs are the same)
    teacher = tiny_teacher(6)
    write_teacher_outputs(
        teacher, ids, tmp_path / "out", k=4, tokenizer="t", teacher_name="tiny", batch_size=4, shard_bytes=300
    )
    offline = OfflineTeacher(TeacherOutputs(tmp_path / "out"))
    offline.check_covers(ids[[3, 1, 8]])
    assert offline.outputs._open == {}  # starting and the coverage check read the block index only
    order = torch.tensor([8, 1, 0, 4, 5, 1])
    located = offline.locate(ids[order])
    assert torch.equal(offline.outputs.input_ids(located).long(), ids[order])
    log_probs, indices = offline(ids[order])
    expected = offline.outputs.topk(located)
    assert torch.equal(log_probs, expected[0].float()) and torch.equal(indices, expected[1])
    assert log_probs.dtype == torch.float32 and indices.dtype == torch.int64
    other = ids[:3].clone()
    other[1, 2] += 1  # one token changed: not among the stored blocks
    with pytest.raises(ValueError, match=r"1 of 3 input blocks are not among the teacher outputs"):
        offline.locate(other)
    with pytest.raises(ValueError, match=r"2 of 11 input blocks are not among"):
        offline.check_covers(torch.cat([ids, other[1:2], other[1:2]]), chunk=4)
    with pytest.raises(ValueError, match=r"hold blocks of 6 input ids; got input ids of shape \(2, 5\)"):
        offline.locate(ids[:2, :5])


def test_blocks_whose_hashes_collide_are_told_apart_by_their_ids(tmp_path, monkeypatch):
    """Every block hashed alike (the worst collision): each is still answered with its own outputs."""
    from dtokd.data import offline_teacher, teacher_outputs_writer

    def colliding(ids):
        return torch.zeros(len(ids), dtype=torch.int64)

    monkeypatch.setattr(teacher_outputs_writer, "block_hashes", colliding)  # the index the writer keeps
    monkeypatch.setattr(offline_teacher, "block_hashes", colliding)  # the reader's lookup
    ids = torch.randint(0, 50, (6, 5), generator=torch.Generator().manual_seed(1))
    teacher = tiny_teacher(5)
    write_teacher_outputs(teacher, ids, tmp_path / "out", k=3, tokenizer="t", teacher_name="tiny")
    offline = OfflineTeacher(TeacherOutputs(tmp_path / "out"))
    order = torch.tensor([5, 0, 3, 3, 1])
    assert torch.equal(offline.locate(ids[order]), order)
    other = ids[:1] + 1
    with pytest.raises(ValueError, match="1 of 1 input blocks are not among"):
        offline.locate(other)


def test_the_block_hash_by_hand():
    row = [3, 0, 7, 1]
    by_hand = sum((token + 1) * HASH_BASE**i for i, token in enumerate(row)) % 2**64
    by_hand = by_hand - 2**64 if by_hand >= 2**63 else by_hand
    assert block_hashes(torch.tensor([row])).item() == by_hand


def test_a_run_from_outputs_at_k_equal_to_the_vocabulary_equals_the_live_teachers_run(setting, tmp_path, capsys):
    assert cli.main(_cli_args(setting, tmp_path / "outputs", None)) == 0
    printed = capsys.readouterr().out
    assert "bytes per token" in printed and f"teacher.outputs={tmp_path / 'outputs'}" in printed
    live = train(load_config(None, setting["overrides"]), tmp_path / "live", progress=False, verbose=False)
    offline_config = load_config(None, [*setting["overrides"], f"teacher.outputs={tmp_path / 'outputs'}"])
    offline = train(offline_config, tmp_path / "offline", progress=False, verbose=False)

    def steps(run):
        return [json.loads(line) for line in (tmp_path / run / "steps.jsonl").read_text().splitlines()]

    assert len(steps("live")) == len(steps("offline")) >= 4
    for a, b in zip(steps("live"), steps("offline")):
        assert b["loss/distill"] == pytest.approx(a["loss/distill"], rel=1e-4, abs=1e-6)
        assert b["loss/task"] == pytest.approx(a["loss/task"], rel=1e-5)
    assert offline["last_test_ppl"] == pytest.approx(live["last_test_ppl"], rel=1e-4)
    a, b = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=False)["student"] for r in ("live", "offline"))
    assert all(torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5) for key in a)
    recorded = json.loads((tmp_path / "offline" / "teacher.json").read_text())
    manifest = json.loads((tmp_path / "outputs" / "manifest.json").read_text())
    assert recorded["outputs"] == str(tmp_path / "outputs") and recorded["weights"] == manifest["teacher_hash"]
    assert not (tmp_path / "offline" / "teacher.json").read_text().count("test_top1")  # nothing was measured


def test_outputs_that_do_not_fit_the_run_are_refused_naming_the_field(setting, tmp_path, capsys):
    out = tmp_path / "outputs"
    assert cli.main(_cli_args(setting, out, 5)) == 0
    base = [*setting["overrides"], f"teacher.outputs={out}"]

    def refused(*extra):
        with pytest.raises(ValueError) as error:
            train(load_config(None, [*base, *extra]), tmp_path / "run", progress=False, verbose=False)
        return str(error.value)

    temperature = KD.replace("temperature: 2.0", "temperature: 1.0")
    assert "losses.distill.temperature=1.0" in refused(temperature) and "written at temperature 2.0" in refused(
        temperature
    )
    hidden = "losses={distill: {type: token-kd, temperature: 2.0}, h: {type: hidden}, task: {type: ce}}"
    assert "need its hidden states: give the teacher itself" in refused(hidden, "balancer.method=mean")
    torch.manual_seed(4)
    other = create_model("hf-causal-lm:llama", setting["vocabulary"], 1, 12, load_config(None, base).teacher.kwargs)
    torch.save(other.state_dict(), tmp_path / "other.pt")
    assert "field 'teacher_hash'" in refused(f"teacher.checkpoint={tmp_path / 'other.pt'}")
    assert "field 'teacher_name'" in refused("teacher.name=hf-causal-lm:gpt2")
    assert "field 'block_length'" in refused("data.text={block_size: 10, vocab_size: 300, test_fraction: 0.2}")
    other_vocabulary = refused("data.text={block_size: 12, vocab_size: 280, test_fraction: 0.2}")
    assert "field 'tokenizer'" in other_vocabulary and "a different vocab_size, split_seed" in other_vocabulary
    assert "input blocks are not among the teacher outputs" in refused("seed=1")  # another seed's subset
    # written for the whole training split, the outputs serve every seed's subset, with no checkpoint to check
    assert cli.main(_cli_args(setting, tmp_path / "all", 5, "data.limit_train=null")) == 0
    config = load_config(None, [*base, f"teacher.outputs={tmp_path / 'all'}", "seed=1", "teacher.checkpoint=null"])
    summary = train(config, tmp_path / "seed1", progress=False, verbose=False)
    assert summary["last_test_ppl"] > 1
    capsys.readouterr()
    assert cli.main(_cli_args(setting, out, 5)) == 2  # never written over unasked
    assert "is not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["task=classification", "data.name=fashion-mnist"], "task='classification' takes none"),
        (["teacher.name=null"], "needs teacher.name"),
        (["teacher.cache_outputs=true"], "both replace the teacher"),
    ],
)
def test_the_setting_is_checked_when_the_config_is_read(setting, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*setting["overrides"], f"teacher.outputs={tmp_path}", *extra])


def _lm_matrix(setting, tmp_path, methods, teacher_topk=5, seeds=(0, 1)):
    import yaml

    student = tmp_path / "student.yaml"
    student.write_text("{}\n")
    base = [o for o in setting["overrides"] if not o.startswith(("teacher.", "student.name", "balancer.", "losses="))]
    matrix = {
        "name": "lm",
        "seeds": list(seeds),
        "base": [*base, "epochs=1"],
        "student_config": str(student),
        "teacher_config": str(student),
        "pairs": {
            "llama": {
                "teacher": "hf-causal-lm:llama",
                "student": "hf-causal-lm:llama",
                "checkpoint": str(setting["folder"] / "teacher.pt"),
                "overrides": [f"teacher.kwargs={LLAMA}"],
            }
        },
        "methods": methods,
        "reference": next(iter(methods)),
        "teacher_topk": teacher_topk,
    }
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(matrix))
    return path


def test_a_bench_writes_each_pairs_outputs_once_and_its_distilling_cells_read_them(setting, tmp_path):
    from dtokd.bench import load_matrix, run_matrix

    fixed = ["balancer.method=fixed", "balancer.options={weights: {distill: 0.5, task: 0.5}}", KD]
    methods = {
        "kd": fixed,
        "amortized": ["balancer.method=dto-amortized", KD.replace("forward_kl", "forward_ce")],
        "ce": ["teacher.name=null", "teacher.checkpoint=null", "losses={task: {type: ce}}", "balancer.method=fixed"],
    }
    path = _lm_matrix(setting, tmp_path, methods)
    out = tmp_path / "bench"
    run_matrix(load_matrix(path), out, progress=False)
    folder = out / "teacher-outputs" / "llama-top5"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["k"] == 5 and manifest["temperature"] == 2.0
    assert manifest["num_blocks"] > 12  # the whole training split, not one seed's subset of 12
    written = (folder / "manifest.json").stat().st_mtime_ns
    for method in ("kd", "amortized"):
        for seed in (0, 1):
            recorded = json.loads((out / "llama" / method / f"seed{seed}" / "teacher.json").read_text())
            assert recorded["outputs"] == str(folder)
    assert not (out / "llama" / "ce" / "seed0" / "teacher.json").exists()
    run_matrix(load_matrix(path), out, progress=False)  # finished: nothing is written again
    assert (folder / "manifest.json").stat().st_mtime_ns == written
    # outputs of an older format, and a cell still to run: they are written again, then read
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": "dtokd-teacher-topk-v2"}))
    shutil.rmtree(out / "llama" / "kd" / "seed1")
    run_matrix(load_matrix(path), out, progress=False)
    assert json.loads((folder / "manifest.json").read_text())["format"] == "dtokd-teacher-topk-v3"
    assert (out / "llama" / "kd" / "seed1" / "summary.json").is_file()


def test_a_bench_whose_cells_want_outputs_at_two_temperatures_is_refused(setting, tmp_path):
    from dtokd.bench import load_matrix, run_matrix

    methods = {
        "kd": ["balancer.method=fixed", "balancer.options={weights: {distill: 0.5, task: 0.5}}", KD],
        "kd-t1": ["balancer.method=fixed", KD.replace("temperature: 2.0", "temperature: 1.0")],
    }
    with pytest.raises(ValueError, match=r"pair llama: teacher_topk writes one set of top-5 outputs per pair"):
        run_matrix(load_matrix(_lm_matrix(setting, tmp_path, methods)), tmp_path / "bench", progress=False)
    # at two k's the two temperatures are two sets of outputs: allowed
    load_matrix(_lm_matrix(setting, tmp_path, methods, teacher_topk={"kd": 5, "kd-t1": 8}))
    with pytest.raises(ValueError, match=r"teacher_topk=0 must be a positive integer"):
        load_matrix(_lm_matrix(setting, tmp_path, methods, teacher_topk=0))
    with pytest.raises(ValueError, match=r"teacher_topk names \['kd-t2'\], not among the methods"):
        load_matrix(_lm_matrix(setting, tmp_path, methods, teacher_topk={"kd-t2": 5}))
    with pytest.raises(ValueError, match=r"teacher_topk \{'kd': 0\}: each k must be a positive integer"):
        load_matrix(_lm_matrix(setting, tmp_path, methods, teacher_topk={"kd": 0}))
    for k in (8.0, "8", True, None):
        with pytest.raises(ValueError, match=r"teacher_topk \{'kd': .*\}: each k must be a positive integer"):
            load_matrix(_lm_matrix(setting, tmp_path, methods, teacher_topk={"kd": k}))


def test_a_bench_with_a_k_per_method_pairs_offline_cells_with_live_ones_on_one_teacher(setting, tmp_path):
    """``teacher_topk: {method: k}``: the named methods read their pair's outputs at their own k
    (written once per k), the others run the teacher live; at k = the vocabulary the offline
    cell trains as the live one does (the pipeline's equality, here through the bench)."""
    from dtokd.bench import load_matrix, run_matrix, same_teacher, select_cells
    from dtokd.bench.plan import plan

    fixed = ["balancer.method=fixed", "balancer.options={weights: {distill: 0.5, task: 0.5}}", KD]
    vocabulary = setting["vocabulary"]
    methods = {"kd": fixed, "kd-top5": fixed, "kd-full": fixed}
    path = _lm_matrix(setting, tmp_path, methods, teacher_topk={"kd-top5": 5, "kd-full": vocabulary}, seeds=[0])
    out = tmp_path / "bench"
    planned = plan(load_matrix(path), out, select_cells(load_matrix(path)))
    for k in (5, vocabulary):
        assert (
            f"offline outputs of pair llama, top-{k}: {out / 'teacher-outputs' / f'llama-top{k}'}: to write"
            in "\n".join(planned)
        )
    run_matrix(load_matrix(path), out, progress=False)
    planned = plan(load_matrix(path), out, select_cells(load_matrix(path)))
    assert sum(line.endswith(": written") for line in planned) == 2 and planned[-1].startswith("in all: 3 finished")
    assert sorted(p.name for p in (out / "teacher-outputs").iterdir()) == sorted(
        ["llama-top5", f"llama-top{vocabulary}"]
    )
    for method, k in (("kd-top5", 5), ("kd-full", vocabulary)):
        folder = out / "teacher-outputs" / f"llama-top{k}"
        assert json.loads((folder / "manifest.json").read_text())["k"] == k
        assert json.loads((out / "llama" / method / "seed0" / "teacher.json").read_text())["outputs"] == str(folder)
    assert "outputs" not in json.loads((out / "llama" / "kd" / "seed0" / "teacher.json").read_text())
    live, full, top5 = (
        json.loads((out / "llama" / m / "seed0" / "summary.json").read_text())["last_test_ppl"]
        for m in ("kd", "kd-full", "kd-top5")
    )
    assert full == pytest.approx(live, rel=1e-4)
    assert top5 != pytest.approx(live, rel=1e-4)  # the top-5 divergence is another loss: the check can fail
    # offline cells pair with the live one: the same teacher by the weights' hash
    for method in ("kd-top5", "kd-full"):
        assert same_teacher(out / "llama" / "kd" / "seed0", out / "llama" / method / "seed0")
