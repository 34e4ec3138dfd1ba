"""The causal-LM task: text split by document, the tokenizer, packed blocks, the losses against
the Hugging Face model's own loss, the evaluation by brute force, and runs (train, distil with
DTO, exact resume, eval) on generated text with tiny Llamas."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers", reason="language models need the optional dependency transformers")
pytest.importorskip("tokenizers", reason="language-model data need the optional dependency tokenizers")

from dtokd import cli  # noqa: E402
from dtokd.data import build_data  # noqa: E402
from dtokd.data.fake import write_fake_text  # noqa: E402
from dtokd.data.text import TokenBlocks, read_documents, stdlib_root  # noqa: E402
from dtokd.models import create_model  # noqa: E402
from dtokd.tasks import CausalLMTask, evaluate_causal_lm  # noqa: E402
from dtokd.train import load_config, train  # noqa: E402

from helpers import benchmark_script, interrupt_after, tiny_lm_overrides  # noqa: E402

LLAMA = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 32,
}
WIDER = {**LLAMA, "hidden_size": 48, "num_hidden_layers": 2}
"""The teacher of the hidden-state tests: wider and deeper than the student."""


def _flow(kwargs):
    """A mapping as a YAML flow mapping, for a key=value override."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + "}"


TINY = _flow(LLAMA)
TEXT = {"block_size": 12, "vocab_size": 300, "test_fraction": 0.2}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    return write_fake_text(tmp_path / "text", documents=10, words=200)


def test_documents_split_by_document_with_their_own_seed(corpus):
    a = build_data("text", str(corpus), val_fraction=0.2, seed=0, text=TEXT)
    with pytest.raises(TypeError, match="data set 'text' is not an image classification set"):
        _ = a.normalization  # token blocks have no per-channel statistics
    b = build_data("text", str(corpus), val_fraction=0.2, seed=7, text=TEXT)  # another run seed: the same splits
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).blocks, getattr(b, split).blocks)
    other = build_data("text", str(corpus), val_fraction=0.2, text={**TEXT, "split_seed": 1})
    assert not torch.equal(other.test.blocks, a.test.blocks)
    x, y = a.train.__getitems__([0, 1])
    assert x.shape == y.shape == (2, 12) and torch.equal(x[:, 1:], y[:, :-1])  # y: the next tokens
    assert 257 <= a.num_classes <= 300 and a.classes[0] == "<|endoftext|>"


def test_the_blocks_are_the_documents_tokenized_with_an_end_token_and_packed(corpus):
    from tokenizers import Tokenizer

    data = build_data("text", str(corpus), val_fraction=0.2, text=TEXT)
    tokenizer = Tokenizer.from_file(str(next((corpus.parent / "cache" / "tokenizers").glob("*.json"))))
    names, texts = read_documents(str(corpus), [".txt"], "text")
    order = torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()
    test_docs = sorted(order[:2])
    ids = [t for i in test_docs for t in tokenizer.encode(texts[i]).ids + [0]]
    count = len(ids) // 13
    assert torch.equal(data.test.blocks.long(), torch.tensor(ids[: count * 13]).view(count, 13))


def test_sources_and_bad_input(tmp_path, corpus):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p.read_text()}) for p in sorted(corpus.glob("*.txt"))) + "\n")
    from_jsonl = build_data("text", str(jsonl), val_fraction=0.2, text=TEXT)
    from_folder = build_data("text", str(corpus), val_fraction=0.2, text=TEXT)
    assert torch.equal(from_jsonl.test.blocks, from_folder.test.blocks)  # the same documents in the same order
    names, _ = read_documents("stdlib", [], "text")
    assert "os.py" in names and all(n.endswith(".py") for n in names) and stdlib_root().is_dir()
    trained = next((tmp_path / "cache" / "tokenizers").glob("*.json"))
    local = build_data("text", str(corpus), val_fraction=0.2, text={**TEXT, "tokenizer": str(trained)})
    assert torch.equal(local.test.blocks, from_folder.test.blocks)  # a local tokenizer file gives the same tokens
    (corpus / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    cases = [
        (dict(root=str(corpus)), "latin.txt is not UTF-8 text"),
        (dict(root=str(tmp_path / "none")), "does not exist"),
        (dict(root=str(jsonl), text={**TEXT, "field": "body"}), "docs.jsonl:1 has no string under 'body'"),
        (dict(root=str(jsonl), text={**TEXT, "block_size": 1}), "data.text.block_size=1 must be an integer >= 2"),
        (dict(root=str(jsonl), text={**TEXT, "vocab_size": 100}), "vocab_size=100 is too small for a byte-level BPE"),
        (dict(root=str(jsonl), text={**TEXT, "colour": 1}), "data.text: unknown option\\(s\\) \\['colour'\\]"),
        (dict(root=str(jsonl), text={**TEXT, "test_fraction": 0}), "test_fraction=0 must lie strictly between"),
        (
            dict(root=str(jsonl), text={**TEXT, "tokenizer": str(trained), "eos": "<eos>"}),
            "data.text.eos='<eos>' is not in the tokenizer",
        ),
        (dict(root=str(jsonl), text={**TEXT, "tokenizer": str(tmp_path)}), "no tokenizer.json there"),
        (dict(root=str(jsonl), text={**TEXT, "tokenizer": str(jsonl)}), "docs.jsonl is not a tokenizers file"),
        (dict(root=str(jsonl), text={**TEXT, "block_size": 100_000}), "fewer than one block"),
    ]
    for options, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            build_data("text", options["root"], val_fraction=0.2, text=options.get("text", TEXT))


def _models(vocabulary, seed=0):
    torch.manual_seed(seed)
    return create_model("hf-causal-lm:llama", vocabulary, 1, 12, LLAMA), create_model(
        "hf-causal-lm:llama", vocabulary, 1, 12, LLAMA
    )


def test_ce_equals_the_models_own_loss_and_masked_tokens_do_not_count(corpus):
    data = build_data("text", str(corpus), val_fraction=0.2, text=TEXT)
    student, teacher = _models(data.num_classes)
    task = CausalLMTask(
        student, teacher, {"distill": {"type": "token-kd", "divergence": "jsd"}, "task": {"type": "ce"}}
    )
    x, y = data.train.__getitems__([0, 1, 2])
    y_last_masked = y.clone()
    y_last_masked[:, -1] = -100  # what the model's own loss predicts: x[1:] from x[:-1]
    _, losses = task(x, y_last_masked)
    own = student.model(input_ids=x, labels=x).loss
    torch.testing.assert_close(losses["task"], own, rtol=1e-5, atol=1e-6)
    # a masked position changes nothing: replace its target and the teacher's view of it stays out
    y_other = y_last_masked.clone()
    y_other[0, 3] = -100
    _, masked = task(x, y_other)
    assert not torch.isclose(masked["task"], losses["task"])
    counted = y_other != -100
    logits = student(x).double()
    expected = torch.nn.functional.cross_entropy(logits[counted], y_other[counted])
    torch.testing.assert_close(masked["task"].double(), expected, rtol=1e-5, atol=1e-6)


def test_the_cross_entropy_form_of_token_kd_adds_the_teachers_entropy_over_counted_tokens(corpus):
    """``divergence: forward_ce`` in a loss spec: forward KL plus the teacher's next-token entropy,
    averaged over the counted tokens (by hand, in float64), with the same gradient."""
    data = build_data("text", str(corpus), val_fraction=0.2, text=TEXT)
    student, teacher = _models(data.num_classes)
    x, y = data.train.__getitems__([0, 1, 2])
    y = y.clone()  # a view of the inputs' block
    y[0, :5] = -100
    values, grads = {}, {}
    for divergence in ("forward_kl", "forward_ce"):
        task = CausalLMTask(student, teacher, {"distill": {"type": "token-kd", "divergence": divergence}})
        _, losses = task(x, y)
        values[divergence] = losses["distill"]
        grads[divergence] = torch.autograd.grad(losses["distill"], list(student.parameters()))
    with torch.no_grad():
        q = torch.softmax(teacher(x).double(), -1)[y != -100]
    entropy = -(q * q.log()).sum(-1).mean()
    torch.testing.assert_close(
        values["forward_ce"].double(), values["forward_kl"].double() + entropy, rtol=1e-5, atol=1e-6
    )
    for ce_grad, kl_grad in zip(grads["forward_ce"], grads["forward_kl"]):
        torch.testing.assert_close(ce_grad, kl_grad)


def test_evaluation_by_brute_force(corpus):
    data = build_data("text", str(corpus), val_fraction=0.2, text=TEXT)
    student, _ = _models(data.num_classes)
    test = TokenBlocks(data.test.blocks[:7])
    result = evaluate_causal_lm(student, test, 3, torch.device("cpu"))
    losses, hits, tokens = 0.0, 0, 0
    with torch.no_grad():
        for k in range(len(test)):
            x, y = test[k]
            logits = student(x[None])[0].double()
            losses += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            hits += int((logits.argmax(-1) == y).sum())
            tokens += y.numel()
    assert result["loss"] == pytest.approx(losses / tokens, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(losses / tokens), rel=1e-5)
    assert result["top1"] == pytest.approx(100 * hits / tokens)


def _config(corpus, *overrides):
    return load_config(
        None,
        [
            *tiny_lm_overrides(corpus, TINY),
            "optim.name=adamw",
            "optim.lr=0.003",
            "losses={task: {type: ce}}",
            *overrides,
        ],
    )


def test_teacher_distillation_resume_and_eval(corpus, tmp_path, monkeypatch, capsys):
    teacher = train(_config(corpus), tmp_path / "teacher", progress=False, verbose=False)
    assert teacher["metric"] == "top1" and teacher["last_test_ppl"] > 1 and teacher["test_ppl_at_best_val"] > 1
    distill = _config(
        corpus,
        "teacher.name=hf-causal-lm:llama",
        f"teacher.kwargs={TINY}",
        f"teacher.checkpoint={tmp_path / 'teacher' / 'best.pt'}",
        "balancer.method=dto",
        "balancer.engine=representation",
        "losses={distill: {type: token-kd, divergence: forward_kl}, task: {type: ce}}",
    )
    straight = train(distill, tmp_path / "straight", progress=False, verbose=False)
    steps = [json.loads(line) for line in (tmp_path / "straight" / "steps.jsonl").read_text().splitlines()]
    assert all(math.isfinite(s["loss_weight/distill"]) and -1 <= s["cos/distill|task"] <= 1 for s in steps)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train(distill, tmp_path / "resumed", progress=False, verbose=False)
    resumed = train(None, tmp_path / "resumed", resume=True, progress=False, verbose=False)
    assert resumed["last_test_ppl"] == straight["last_test_ppl"]
    a, b = (torch.load(tmp_path / f / "checkpoint.pt", weights_only=False)["student"] for f in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "straight")]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["ppl"] == pytest.approx(straight["last_test_ppl"], rel=1e-6)


def test_the_amortized_rule_distils_a_causal_lm_with_coefficients_that_sum_to_one(corpus, tmp_path):
    """The rule the CIFAR-10 evidence recommends, on a causal LM: its same-batch update runs
    after every step (a forgotten one is an error), and its coefficients on the raw losses,
    pi_i / (c L_i) with c = sum_i pi_i / L_i, are positive and sum to one at every logged step."""
    train(_config(corpus, "epochs=1"), tmp_path / "teacher", progress=False, verbose=False)
    distill = _config(
        corpus,
        "teacher.name=hf-causal-lm:llama",
        f"teacher.kwargs={TINY}",
        f"teacher.checkpoint={tmp_path / 'teacher' / 'best.pt'}",
        "balancer.method=dto-amortized",
        "balancer.engine=exact",
        "losses={distill: {type: token-kd, divergence: forward_kl}, task: {type: ce}}",
    )
    summary = train(distill, tmp_path / "amortized", progress=False, verbose=False)
    assert summary["method"] == "dto-amortized" and summary["last_test_ppl"] > 1
    steps = [json.loads(line) for line in (tmp_path / "amortized" / "steps.jsonl").read_text().splitlines()]
    assert len(steps) >= 2
    for s in steps:
        coefficients = [s["loss_weight/distill"], s["loss_weight/task"]]
        assert min(coefficients) > 0 and sum(coefficients) == pytest.approx(1.0, abs=1e-6)
    assert steps[-1]["weight/distill"] != steps[0]["weight/distill"]  # it learned from the updates


def test_a_run_chosen_on_validation_perplexity_and_its_report(corpus, tmp_path):
    """``eval.select=ppl``: ``best.pt`` is the epoch of the lowest validation perplexity (from the
    run's own records), the summary leads with the perplexity and adds top-1, the report reads it."""
    folder = tmp_path / "lm"
    summary = train(_config(corpus, "epochs=3", "eval.select=ppl", "eval.test=end"), folder, progress=False)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    lowest = min(range(len(rows)), key=lambda i: (rows[i]["val_ppl"], -i))
    assert summary["metric"] == "ppl" and summary["best_epoch"] == lowest + 1
    assert summary["best_val_ppl"] == rows[lowest]["val_ppl"]
    assert summary["test_ppl_at_best_val"] > 1 and 0 <= summary["test_top1_at_best_val"] <= 100
    assert cli.main(["report", str(folder), "--out", str(tmp_path / "report")]) == 0
    assert "test ppl at best val" in (tmp_path / "report" / "report.md").read_text()


def test_the_task_and_its_losses_are_checked_before_the_corpus_is_read(corpus, tmp_path, monkeypatch):
    """Each setting error is reported before the corpus is read and a tokenizer trained (on a
    real corpus that takes minutes); the model's own kwargs are checked when it is built."""
    import dtokd.train.build as build

    cases = [
        (["losses={distill: {type: token-kd, divergence: kl}, task: {type: ce}}"], "divergence='kl' is not allowed"),
        (["losses={distill: {type: kd}}"], "losses.distill.type='kd' is not allowed for task 'causal-lm'"),
        (["task=classification"], "data.name='text' is a text corpus: set task: causal-lm"),
        (["student.name=mlp_small", "student.kwargs={}"], "must name hf-causal-lm:<model_type>"),
        (["teacher.name=resnet20"], "\\['teacher.name'\\] must name hf-causal-lm"),
        (["balancer.representation=features"], "for causal-lm the representation is the student's logits"),
        (["teacher.normalize={mean: [0.5], std: [0.2]}"], "teacher.normalize is for images"),
    ]
    with monkeypatch.context() as patch:
        patch.setattr(
            build, "data_of", lambda *a, **k: pytest.fail("the data was read before the settings were checked")
        )
        for overrides, message in cases:
            with pytest.raises(ValueError, match=message):
                train(_config(corpus, *overrides), tmp_path / "run", progress=False, verbose=False)
    with pytest.raises(ValueError, match="does not take kwargs \\['colour'\\]"):
        train(
            _config(corpus, "student.kwargs={hidden_size: 32, colour: 3}"),
            tmp_path / "run",
            progress=False,
            verbose=False,
        )


def test_the_memory_estimate_counts_a_llamas_parameters_as_by_hand():
    """benchmarks/lm_memory.py counts parameters on the meta device; by hand a Llama has
    embeddings V h, per layer q and o (h x h), k and v (h x kv d), the MLP 3 h i and two norms
    2 h, a final norm h, and an untied head V h."""
    lm_memory = benchmark_script("lm_memory")
    for tied in (True, False):
        shape = dict(
            vocab_size=50,
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
        )
        h, kv = 24, 2 * 24 // 4
        by_hand = 50 * h + 3 * (2 * h * h + 2 * h * kv + 3 * h * 40 + 2 * h) + h + (0 if tied else 50 * h)
        assert lm_memory.parameters(shape) == by_hand
    assert round(lm_memory.parameters(lm_memory.SHAPES["llama-3.1-8b"]) / 1e9, 2) == 8.03  # the published size
    # sharded over 2 and offline, by hand: the tied shape has n = 50 h + 3 layer + h parameters
    n, root, gib = lm_memory.parameters(shape | {"tie_word_embeddings": True}), 50 * 24 + 24, 2**30
    layer = (n - root) / 3
    tied = shape | {"tie_word_embeddings": True}
    sharded = lm_memory.estimate(tied, tied, 2, 5, 4, shards=2)
    assert sharded["student fp32 weights, grads, AdamW (16 B/param / R)"] * gib == pytest.approx(16 * n / 2)
    assert sharded["student bf16 weights gathered for compute"] * gib == pytest.approx(2 * (root + 2 * layer))
    assert sharded["teacher bf16 weights (shard)"] * gib == pytest.approx(2 * n / 2)
    assert sharded["teacher bf16 weights gathered at its peak"] * gib == pytest.approx(2 * (root + 2 * layer) - n)
    offline = lm_memory.estimate(tied, tied, 2, 5, 4, teacher_mode="offline", k=3)
    assert offline["teacher bf16 weights (shard)"] == offline["teacher bf16 weights gathered at its peak"] == 0
    assert offline["logits (student; live teacher's bf16, or its top-k)"] * gib == pytest.approx(
        2 * 10 * 50 + 12 * 10 * 3
    )


def _pair(vocabulary):
    """A 1-layer student of width 32 and the wider, deeper teacher."""
    torch.manual_seed(0)
    return (
        create_model("hf-causal-lm:llama", vocabulary, 1, 12, LLAMA),
        create_model("hf-causal-lm:llama", vocabulary, 1, 12, WIDER),
    )


def _smooth_l1(d):
    return torch.where(d.abs() < 1, 0.5 * d**2, d.abs() - 0.5)


@pytest.mark.parametrize(
    "options",
    [
        {},  # mse to the layer-normalised last teacher state
        {"distance": "smooth_l1", "teacher_norm": "standardize", "student_layer": 0, "teacher_layer": 1},
        {"teacher_norm": "none", "student_layer": -2, "teacher_layer": 0},
    ],
)
def test_the_hidden_state_loss_by_hand_over_counted_tokens_only(corpus, options):
    """In float64 from the models' own hidden states: the projected student state against the
    normalised teacher state, averaged over counted tokens and the teacher's width; the masked
    positions weigh nothing (the reference multiplies by the mask instead of selecting)."""
    data = build_data("text", str(corpus), val_fraction=0.2, text=TEXT)
    student, teacher = _pair(data.num_classes)
    spec = {"type": "hidden", **options}
    task = CausalLMTask(student, teacher, {"feat": spec, "task": {"type": "ce"}})
    x, y = data.train.__getitems__([0, 1, 2])
    y = y.clone()
    y[0, :5] = -100
    y[2, 3] = -100
    _, losses = task(x, y)

    with torch.no_grad():
        hs = student.model(input_ids=x, output_hidden_states=True).hidden_states[options.get("student_layer", -1)]
        ht = teacher.model(input_ids=x, output_hidden_states=True).hidden_states[options.get("teacher_layer", -1)]
    hs, ht = hs.double(), ht.double()
    mask = (y != -100).double()[..., None]
    projected = hs @ task.projectors["feat"].proj.weight.double().T
    norm = options.get("teacher_norm", "layernorm")
    if norm == "layernorm":
        target = (ht - ht.mean(-1, keepdim=True)) / torch.sqrt(ht.var(-1, unbiased=False, keepdim=True) + 1e-5)
    elif norm == "standardize":  # per channel over the counted tokens, unbiased
        n = mask.sum()
        mean = (mask * ht).sum((0, 1)) / n
        std = torch.sqrt((mask * (ht - mean) ** 2).sum((0, 1)) / (n - 1))
        target = (ht - mean) / std.clamp_min(1e-6)
    else:
        target = ht
    d = projected - target
    per_element = _smooth_l1(d) if options.get("distance") == "smooth_l1" else d**2
    expected = (mask * per_element).sum() / (mask.sum() * ht.shape[-1])
    torch.testing.assert_close(losses["feat"].double(), expected, rtol=1e-4, atol=1e-6)
    losses["feat"].backward()
    assert task.projectors["feat"].proj.weight.grad.abs().sum() > 0


def test_the_hidden_state_loss_without_counted_tokens_and_bad_options(corpus):
    data = build_data("text", str(corpus), val_fraction=0.2, text=TEXT)
    student, teacher = _pair(data.num_classes)
    task = CausalLMTask(student, teacher, {"feat": {"type": "hidden"}, "task": {"type": "ce"}})
    x, y = data.train.__getitems__([0, 1])
    _, losses = task(x, torch.full_like(y, -100))
    assert losses["feat"].item() == 0.0 and losses["feat"].requires_grad
    losses["feat"].backward()  # in the graph, with zero gradients
    assert all(p.grad is None or not p.grad.any() for p in task.parameters())

    cases = [
        ({"student_layer": 2}, "losses.feat.student_layer=2 is out of range: the model has 2 hidden states"),
        ({"teacher_layer": -4}, "losses.feat.teacher_layer=-4 is out of range: the model has 3 hidden states"),
        ({"student_layer": 1.5}, "losses.feat.student_layer=1.5 must be an integer"),
        ({"student_layer": True}, "losses.feat.student_layer=True is not allowed; it must be a finite number"),
        ({"distance": "l2"}, "losses.feat.distance='l2' is not allowed; use one of \\['mse', 'smooth_l1'\\]"),
        ({"teacher_norm": "pearson"}, "losses.feat.teacher_norm='pearson' is not allowed"),
        ({"projector": False}, "without a projector needs equal widths; the student feature has 32 channels"),
        ({"width": 3}, "unknown option\\(s\\) \\['width'\\] for type 'hidden'"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            CausalLMTask(student, teacher, {"feat": {"type": "hidden", **options}})
    with pytest.raises(ValueError, match="need a teacher"):
        CausalLMTask(student, None, {"feat": {"type": "hidden"}})
    with pytest.raises(ValueError, match="representation='norm'.*use one of \\['outputs', 'hidden'\\]"):
        CausalLMTask(student, teacher, {"task": {"type": "ce"}}, representation="norm")


def test_the_hidden_representation_is_the_last_hidden_state(corpus):
    """``representation: hidden`` returns the student's last hidden state, which the logits and
    a last-layer hidden loss depend on: the representation engine's Gram there equals the
    Gram of the losses' gradients with respect to that state, taken one by one; a hidden loss
    at an earlier layer does not reach it, and the engine says so."""
    from dtokd.balancing.engines import RepresentationEngine

    data = build_data("text", str(corpus), val_fraction=0.2, text=TEXT)
    student, teacher = _pair(data.num_classes)
    specs = {"feat": {"type": "hidden"}, "distill": {"type": "token-kd"}, "task": {"type": "ce"}}
    task = CausalLMTask(student, teacher, specs, representation="hidden")
    x, y = data.train.__getitems__([0, 1])
    representation, losses = task(x, y)
    with torch.no_grad():
        last = student.model(input_ids=x, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(representation, last)
    grads = [torch.autograd.grad(v, representation, retain_graph=True)[0].flatten().double() for v in losses.values()]
    stacked = torch.stack(grads)
    engine = RepresentationEngine(list(task.parameters()))
    gram = engine.gradients(losses, representation, keep_graph=True).gram
    torch.testing.assert_close(gram, stacked @ stacked.T, rtol=1e-4, atol=1e-10)
    earlier = CausalLMTask(student, teacher, {**specs, "feat": {"type": "hidden", "student_layer": 0}}, "hidden")
    representation, losses = earlier(x, y)
    with pytest.raises(ValueError, match="loss\\(es\\) \\['feat'\\] do not depend on the representation"):
        engine.gradients(losses, representation)


def test_a_hidden_state_loss_in_the_pipeline_trains_its_projector_and_resumes_exactly(corpus, tmp_path, monkeypatch):
    data = build_data("text", str(corpus), val_fraction=0.2, text=TEXT)
    _, teacher = _pair(data.num_classes)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    distill = _config(
        corpus,
        "teacher.name=hf-causal-lm:llama",
        f"teacher.kwargs={_flow(WIDER)}",
        f"teacher.checkpoint={tmp_path / 'teacher.pt'}",
        "balancer.method=dto",
        "balancer.engine=representation",
        "balancer.representation=hidden",
        "losses={distill: {type: token-kd}, hidden: {type: hidden}, task: {type: ce}}",
    )
    straight = train(distill, tmp_path / "straight", progress=False, verbose=False)
    assert straight["last_test_ppl"] > 1
    steps = [json.loads(line) for line in (tmp_path / "straight" / "steps.jsonl").read_text().splitlines()]
    assert all(math.isfinite(s["loss/hidden"]) and math.isfinite(s["loss_weight/hidden"]) for s in steps)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train(distill, tmp_path / "resumed", progress=False, verbose=False)
    first_epoch = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["projectors"]
    train(None, tmp_path / "resumed", resume=True, progress=False, verbose=False)
    a, b = (torch.load(tmp_path / f / "checkpoint.pt", weights_only=False) for f in ("straight", "resumed"))
    assert a["projectors"].keys() == {"hidden.proj.weight"}
    for part in ("student", "projectors"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert not torch.equal(first_epoch["hidden.proj.weight"], a["projectors"]["hidden.proj.weight"])  # it trains


def test_a_local_model_folder_loads_in_float32_unless_its_kwargs_give_a_dtype(tmp_path):
    """A bf16 checkpoint is not trained with bf16 weights and optimizer state by accident."""
    import transformers

    shape = dict(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, intermediate_size=32
    )
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=40, **shape)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "folder")
    loaded = create_model(f"hf-causal-lm:{tmp_path / 'folder'}", 40, 1, 12, {})
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    kept = create_model(f"hf-causal-lm:{tmp_path / 'folder'}", 40, 1, 12, {"dtype": "bfloat16"})
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}


def test_a_loss_type_added_as_a_record_is_checked_computed_and_needs_its_teacher(corpus, monkeypatch):
    """Adding a loss is a function and a record: the task fills its defaults, refuses a bad option
    and a missing teacher, and computes it, with no other edit."""
    from dtokd.tasks.causal_lm_losses import LOSS_TYPES, TokenLossInputs
    from dtokd.tasks.specs import LossType

    def logit_mse(spec, inputs: TokenLossInputs):
        counted = inputs.targets != -100
        return spec["scale"] * (inputs.logits[counted] - inputs.teacher_outputs[counted]).pow(2).mean()

    monkeypatch.setitem(LOSS_TYPES, "logit-mse", LossType({"scale": 0.5}, logit_mse))
    data = build_data("text", str(corpus), val_fraction=0.2, text=TEXT)
    student, teacher = _models(data.num_classes)
    task = CausalLMTask(student, teacher, {"mse": {"type": "logit-mse"}, "task": {"type": "ce"}})
    assert task.specs["mse"] == {"type": "logit-mse", "scale": 0.5}
    x, y = data.train.__getitems__([0, 1])
    y = y.clone()  # the targets may share the blocks' storage with the inputs
    y[:, :2] = -100
    _, losses = task(x, y)
    counted = y != -100
    with torch.no_grad():
        expected = 0.5 * (student(x).double()[counted] - teacher(x).double()[counted]).pow(2).mean()
    torch.testing.assert_close(losses["mse"].double(), expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match=r"losses.mse: unknown option\(s\) \['scal'\]"):
        CausalLMTask(student, teacher, {"mse": {"type": "logit-mse", "scal": 1.0}})
    with pytest.raises(ValueError, match=r"loss\(es\) \['mse'\] need a teacher"):
        CausalLMTask(student, None, {"mse": {"type": "logit-mse"}, "task": {"type": "ce"}})
