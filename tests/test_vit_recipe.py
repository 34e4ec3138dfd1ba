"""The paper's ImageNet recipe at toy scale: a tiny ViT with a distillation token, three balanced
objectives (CE on the class head, DeiT's token loss, VkD's feature loss), mixup, every engine;
each loss against a reference written from the papers; heads averaged at evaluation; timm's own
distillation task driven by a dtokd balancer. Needs timm (a test dependency)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dtokd import make_balancer
from dtokd.losses import cross_entropy, deit_token_loss
from dtokd.models import create_model
from dtokd.tasks import ClassificationTask, evaluate_classifier
from dtokd.train import load_config, train

from helpers import interrupt_after

timm = pytest.importorskip("timm", reason="timm is a test dependency (pip install 'dtokd[test]')")

TINY_VIT = "{img_size: 16, patch_size: 4, embed_dim: 24, depth: 2, num_heads: 2}"
VIT_KWARGS = {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2}
THREE = (
    "losses={task: {type: ce, label_smoothing: 0.1}, token: {type: deit, mode: soft, temperature: 3.0}, "
    "feature: {type: feature, student_tap: patch_mean, teacher_tap: features}}"
)


def tiny_vit(classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("timm:deit_tiny_distilled_patch16_224", classes, 3, 16, VIT_KWARGS)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit") / "teacher"
    train(
        load_config(None, ["data.name=synthetic-rgb", "student.name=cnn_small", "epochs=3", "batch_size=32", "name=t"]),
        folder,
        progress=False,
        verbose=False,
    )
    return folder / "best.pt"


def overrides(teacher, *extra):
    return [
        "data.name=synthetic-rgb",
        "batch_size=32",
        "epochs=1",
        "log_every=3",
        "name=vit",
        "student.name=timm:deit_tiny_distilled_patch16_224",
        f"student.kwargs={TINY_VIT}",
        "teacher.name=cnn_small",
        f"teacher.checkpoint={teacher}",
        THREE,
        "optim.name=adamw",
        "optim.lr=1e-3",
        "optim.weight_decay=0.05",
        "optim.no_decay_1d=true",
        "optim.lr_batch_scale=512",
        "optim.grad_clip=5.0",
        "data.mixup={mixup_alpha: 0.8, cutmix_alpha: 1.0, label_smoothing: 0.1}",
        *extra,
    ]


# ------------------------------------------------------------------------ each loss against its reference


def test_deit_token_loss_matches_the_papers_definition():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    temperature = 3.0
    p_t = torch.softmax(t / temperature, -1)
    reference = (p_t * (p_t.log() - torch.log_softmax(s / temperature, -1))).sum() * temperature**2 / s.numel()
    torch.testing.assert_close(deit_token_loss(s, t, "soft", temperature), reference)
    hard = -torch.log_softmax(s, -1)[torch.arange(6), t.argmax(-1)].mean()
    torch.testing.assert_close(deit_token_loss(s, t, "hard"), hard)
    with pytest.raises(ValueError, match="mode='medium' is not allowed"):
        deit_token_loss(s, t, "medium")


def test_deit_token_loss_against_timms_token_distillation_task():
    """timm's TokenDistillationTask: the same hard loss; its soft loss averages over the batch
    only, so it is C times DeiT's (the normalisation the DeiT code uses)."""
    from timm.task import TokenDistillationTask

    student, teacher = tiny_vit(), create_model("timm:resnet10t", 4, 3, 16)
    teacher.eval()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    for mode in ("hard", "soft"):
        task = TokenDistillationTask(
            student, teacher, criterion=torch.nn.CrossEntropyLoss(), distill_type=mode, temperature=2.0, verbose=False
        )
        out = task(x, y)
        with torch.no_grad():
            teacher_logits = teacher(x)
        _, dist = student(x)
        ours = deit_token_loss(dist, teacher_logits, mode, 2.0)
        expected = ours if mode == "hard" else ours * dist.shape[1]
        torch.testing.assert_close(out["distill_loss"], expected, rtol=1e-5, atol=1e-6)


def test_cross_entropy_with_smoothing_and_soft_targets():
    from timm.loss import SoftTargetCrossEntropy

    g = torch.Generator().manual_seed(1)
    z, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    smoothed = torch.full((6, 4), 0.1 / 4, dtype=torch.float64)
    smoothed[torch.arange(6), y] += 0.9
    reference = -(smoothed * torch.log_softmax(z, -1)).sum(-1).mean()
    torch.testing.assert_close(cross_entropy(z, y, 0.1), reference)
    soft = torch.softmax(torch.randn(6, 4, generator=g, dtype=torch.float64), -1)
    torch.testing.assert_close(cross_entropy(z, soft), SoftTargetCrossEntropy()(z, soft))
    with pytest.raises(ValueError, match="soft targets"):
        cross_entropy(z, soft[:, :3])


def test_vkd_feature_loss_against_a_hand_written_reference():
    student, teacher = tiny_vit(), create_model("cnn_small", 4, 3, 16)
    teacher.eval()
    sample = torch.randn(2, 3, 16, 16)
    task = ClassificationTask(
        student,
        teacher,
        {"feature": {"type": "feature", "student_tap": "patch_mean", "teacher_tap": "features"}},
        sample,
    )
    x = torch.randn(5, 3, 16, 16)
    _, losses = task(x, torch.randint(0, 4, (5,)))
    with torch.no_grad():
        feats = student.forward_features(x)  # final norm applied: (B, 2 + patches, D)
        patch_mean = feats[:, student.num_prefix_tokens :].mean(1)
        t = teacher.forward_features(x)
    weight = task.projectors["feature"].proj.weight  # (teacher width, student width), orthogonal rows/columns
    projected = patch_mean @ weight.T
    target = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)
    diff = (projected - target).abs()
    reference = torch.where(diff < 1.0, 0.5 * diff**2, diff - 0.5).mean()
    torch.testing.assert_close(losses["feature"].detach(), reference, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ heads at evaluation


def test_evaluation_averages_the_two_heads_and_reports_each():
    from dtokd.data import build_data

    data = build_data("synthetic-rgb", seed=0, augment=False)
    model = tiny_vit()
    model.set_distilled_training(True)
    metrics = evaluate_classifier(model, data.test, 16, torch.device("cpu"))
    model.eval()
    x, y = data.test.__getitems__(list(range(len(data.test))))
    with torch.no_grad():
        tokens = model.forward_features(x)
        cls, dist = model.head(tokens[:, 0]), model.head_dist(tokens[:, 1])
        torch.testing.assert_close(model(x), (cls + dist) / 2)  # DeiT's rule, the model's own eval output
    for prefix, logits in (("", (cls + dist) / 2), ("cls_", cls), ("dist_", dist)):
        assert metrics[f"{prefix}top1"] == pytest.approx(100.0 * (logits.argmax(1) == y).float().mean().item())
        assert metrics[f"{prefix}loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


# ------------------------------------------------------------------------ the three-objective recipe


@pytest.mark.parametrize(
    "engine, extra",
    [
        ("exact", []),
        ("subset", ["balancer.gram_params=head"]),
        ("representation", ["balancer.representation=norm"]),
    ],
)
def test_three_objectives_through_every_engine_with_mixup(teacher, tmp_path, engine, extra):
    summary = train(
        load_config(None, overrides(teacher, "balancer.method=dto", f"balancer.engine={engine}", *extra)),
        tmp_path / "run",
        progress=False,
        verbose=False,
    )
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert steps and all(set(s) >= {"weight/task", "weight/token", "weight/feature", "cos/task|feature"} for s in steps)
    for s in steps:
        assert sum(s[f"weight/{n}"] for n in ("task", "token", "feature")) == pytest.approx(1.0)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"val_cls_top1", "val_dist_top1", "test_top1"} <= set(row) and math.isfinite(row["loss/feature"])
    assert summary["epochs_run"] == 1


def test_amortized_three_objectives_and_the_projector_stays_orthogonal(teacher, tmp_path):
    train(
        load_config(None, overrides(teacher, "balancer.method=dto-amortized", "epochs=2")),
        tmp_path / "run",
        progress=False,
        verbose=False,
    )
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("feature.") for k in state["projectors"])
    student, teacher_model = tiny_vit(), create_model("cnn_small", 4, 3, 16)
    task = ClassificationTask(
        student,
        teacher_model,
        {"feature": {"type": "feature", "student_tap": "patch_mean", "teacher_tap": "features"}},
        torch.randn(2, 3, 16, 16),
    )
    task.projectors.load_state_dict(state["projectors"])
    w = task.projectors["feature"].proj.weight.detach().double()
    small = min(w.shape)
    gram = w @ w.T if w.shape[0] == small else w.T @ w
    torch.testing.assert_close(gram, torch.eye(small, dtype=torch.float64), atol=1e-5, rtol=0)
    weights = state["balancer"]["logits"]
    assert weights.shape == (3,) and not torch.allclose(weights, torch.zeros(3, dtype=torch.float64))  # it learned


def test_resume_of_the_three_objective_run_is_bit_identical(teacher, tmp_path, monkeypatch):
    config = overrides(teacher, "balancer.method=dto", "epochs=3")
    train(load_config(None, config), tmp_path / "straight", progress=False, verbose=False)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train(load_config(None, config), tmp_path / "resumed", progress=False, verbose=False)
    train(None, tmp_path / "resumed", resume=True, progress=False, verbose=False)
    a, b = (torch.load(tmp_path / f / "checkpoint.pt", weights_only=False) for f in ("straight", "resumed"))
    assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"])
    assert all(torch.equal(a["projectors"][k], b["projectors"][k]) for k in a["projectors"])


def test_no_weight_decay_on_norms_biases_and_tokens_and_the_scaled_lr(teacher, tmp_path):
    from dtokd.train.config import OptimConfig
    from dtokd.train.optim import make_optimizer

    student = tiny_vit()
    named = [(f"student.{n}", p) for n, p in student.named_parameters()]
    optimizer = make_optimizer(
        named,
        OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05, no_decay_1d=True, lr_batch_scale=512),
        1024,
        [f"student.{n}" for n in student.no_weight_decay()],
    )
    decay, plain = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0 and decay["lr"] == pytest.approx(2e-3)
    by_id = {id(p): n for n, p in named}
    plain_names = {by_id[id(p)] for p in plain["params"]}
    assert {
        "student.cls_token",
        "student.dist_token",
        "student.pos_embed",
        "student.norm.weight",
        "student.blocks.0.attn.qkv.bias",
    } <= plain_names
    assert all(by_id[id(p)].endswith("weight") and p.ndim > 1 for p in decay["params"])


def test_a_dist_loss_needs_a_distillation_head(teacher, tmp_path):
    with pytest.raises(ValueError, match="use the 'dist' output, but student .* has no distillation token"):
        train(
            load_config(None, overrides(teacher, "student.name=timm:vit_tiny_patch16_224")),
            tmp_path / "x",
            progress=False,
            verbose=False,
        )
    with pytest.raises(ValueError, match="does not take kwargs"):
        train(
            load_config(None, overrides(teacher, "student.kwargs={wings: 2}")),
            tmp_path / "y",
            progress=False,
            verbose=False,
        )


def test_a_balancer_drives_timms_token_distillation_task():
    """The example in docs/recipes.md: timm's task computes the named losses, a dtokd balancer balances
    them. The update equals the DTO combination of the two losses' gradients (a reference
    from two separate backward passes)."""
    from timm.task import TokenDistillationTask

    student, teacher = tiny_vit(), create_model("timm:resnet10t", 4, 3, 16)
    task = TokenDistillationTask(
        student, teacher, criterion=torch.nn.CrossEntropyLoss(), distill_type="hard", verbose=False
    )
    balancer = make_balancer("dto", task.trainable_module.parameters())
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    out = task(x, y)
    info = balancer.backward({"distill": out["distill_loss"], "task": out["task_loss"]})
    params = [p for p in student.parameters() if p.requires_grad]
    got = [p.grad.clone() for p in params]
    out = task(x, y)
    g_d = torch.autograd.grad(out["distill_loss"], params, retain_graph=True, allow_unused=True)
    g_t = torch.autograd.grad(out["task_loss"], params, allow_unused=True)
    c = info.loss_weights
    for a, d, t in zip(got, g_d, g_t):
        d = torch.zeros_like(a) if d is None else d
        t = torch.zeros_like(a) if t is None else t
        torch.testing.assert_close(a, c["distill"] * d + c["task"] * t, rtol=1e-5, atol=1e-7)


def test_two_processes_match_one_process_for_three_objectives(teacher, tmp_path):
    """torchrun with 2 processes (gloo): the Gram of the global batch, mixup on the global batch
    before each rank takes its half; a LayerNorm-only student matches one process."""
    from test_torchrun import finish, torchrun

    config = tmp_path / "vit.yaml"
    config.write_text("name: vit\n")
    extra = overrides(teacher, "balancer.method=dto", "epochs=2")
    finish(torchrun(config, tmp_path / "two", *extra))
    train(load_config(config, extra), tmp_path / "one", progress=False, verbose=False)
    two, one = (torch.load(tmp_path / f / "checkpoint.pt", weights_only=False) for f in ("two", "one"))
    for key in one["student"]:
        torch.testing.assert_close(two["student"][key], one["student"][key], rtol=1e-4, atol=1e-5)
    for key in one["projectors"]:
        torch.testing.assert_close(two["projectors"][key], one["projectors"][key], rtol=1e-4, atol=1e-5)


def test_ema_of_the_student_is_evaluated_checkpointed_and_resumed(teacher, tmp_path, monkeypatch):
    config = overrides(teacher, "balancer.method=dto", "epochs=2", "optim.ema_decay=0.9")
    summary = train(load_config(None, config), tmp_path / "straight", progress=False, verbose=False)
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert {"ema_val_top1", "ema_test_top1", "ema_test_cls_top1"} <= set(rows[0])
    assert summary["ema_last_test_top1"] == rows[-1]["ema_test_top1"]
    state = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    ema, student = state["ema"], state["student"]
    assert int(ema["n_averaged"]) == 2 * ((256 - round(0.1 * 256)) // 32)  # one update per step: 7 an epoch
    assert any(not torch.equal(ema[f"module.{k}"], v) for k, v in student.items() if v.is_floating_point())
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train(load_config(None, config), tmp_path / "resumed", progress=False, verbose=False)
    train(None, tmp_path / "resumed", resume=True, progress=False, verbose=False)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)["ema"]
    assert all(torch.equal(ema[k], resumed[k]) for k in ema)
