"""Token-level KD losses: float64 against direct full-vocabulary formulas (value and gradient),
the top-k teacher against its bucket formula, masking, chunking, memory, and TRL's GKD loss."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dtokd.losses import token_kd_loss
from dtokd.losses.token_kd import DIVERGENCES


def reference(student, teacher, labels, divergence, beta=0.5, temperature=1.0):
    """The textbook formulas over the whole vocabulary, one token at a time, in float64."""
    total, count = 0.0, 0
    for s, t, y in zip(
        student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]), labels.reshape(-1)
    ):
        if int(y) == -100:
            continue
        p, q = torch.softmax(s / temperature, 0), torch.softmax(t / temperature, 0)
        kl = lambda a, b: (a * (a.log() - b.log())).sum()  # noqa: E731
        if divergence == "forward_kl":
            value = kl(q, p)
        elif divergence == "forward_ce":
            value = -(q * p.log()).sum()
        elif divergence == "reverse_kl":
            value = kl(p, q)
        else:
            m = beta * q + (1 - beta) * p
            value = beta * kl(q, m) + (1 - beta) * kl(p, m)
        total, count = total + value, count + 1
    return total * temperature**2 / max(count, 1)


def bucket_reference(student, topk_log_probs, indices, labels, divergence, beta=0.5, temperature=1.0):
    """The same over k + 1 buckets: the teacher's top-k tokens and the tail."""
    total, count = 0.0, 0
    for s, lq, idx, y in zip(
        student.reshape(-1, student.shape[-1]),
        topk_log_probs.reshape(-1, indices.shape[-1]),
        indices.reshape(-1, indices.shape[-1]),
        labels.reshape(-1),
    ):
        if int(y) == -100:
            continue
        p = torch.softmax(s / temperature, 0)
        pb = torch.cat([p[idx], (1 - p[idx].sum()).reshape(1)])
        qt = lq.exp()
        qb = torch.cat([qt, (1 - qt.sum()).reshape(1)])
        kl = lambda a, b: (a * (a.log() - b.log())).sum()  # noqa: E731
        value = {
            "forward_kl": lambda: kl(qb, pb),
            "forward_ce": lambda: -(qb * pb.log()).sum(),
            "reverse_kl": lambda: kl(pb, qb),
            "jsd": lambda: (
                beta * kl(qb, beta * qb + (1 - beta) * pb) + (1 - beta) * kl(pb, beta * qb + (1 - beta) * pb)
            ),
        }[divergence]()
        total, count = total + value, count + 1
    return total * temperature**2 / max(count, 1)


def batch(seed=0, shape=(3, 5), vocabulary=11, masked=(0, 1, 7)):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(*shape, vocabulary, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = 2 * torch.randn(*shape, vocabulary, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocabulary, shape, generator=g)
    labels.view(-1)[list(masked)] = -100
    return student, teacher, labels


CASES = [("forward_kl", 0.5), ("forward_ce", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)]


@pytest.mark.parametrize("divergence, beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("chunk_tokens", [1, 4, 1000])
def test_value_and_gradient_equal_the_full_vocabulary_formulas(divergence, beta, temperature, chunk_tokens):
    student, teacher, labels = batch()
    ours = token_kd_loss(
        student, teacher, labels, divergence=divergence, beta=beta, temperature=temperature, chunk_tokens=chunk_tokens
    )
    (ours_grad,) = torch.autograd.grad(ours, student)
    expected = reference(student, teacher, labels, divergence, beta, temperature)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert ours_grad.view(-1, 11)[[0, 1, 7]].abs().max() == 0  # masked tokens get no gradient


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(divergence):
    student, teacher, labels = batch(shape=(2, 3), vocabulary=5, masked=(2,))
    torch.autograd.gradcheck(
        lambda s: token_kd_loss(s, teacher, labels, divergence=divergence, temperature=1.7, chunk_tokens=2), (student,)
    )


@pytest.mark.parametrize("divergence, beta", CASES)
@pytest.mark.parametrize("k", [1, 3, 11])
def test_a_top_k_teacher_equals_its_bucket_formula(divergence, beta, k):
    student, teacher, labels = batch(seed=1)
    temperature = 2.0
    log_q = torch.log_softmax(teacher / temperature, -1)
    top, indices = log_q.topk(k, dim=-1)
    ours = token_kd_loss(
        student,
        None,
        labels,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        teacher_topk=(top, indices),
        chunk_tokens=4,
    )
    (ours_grad,) = torch.autograd.grad(ours, student)
    if k == 11:  # every token listed: the full loss
        expected = reference(student, teacher, labels, divergence, beta, temperature)
    else:
        expected = bucket_reference(student, top, indices, labels, divergence, beta, temperature)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours_grad, expected_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_the_cross_entropy_form_is_forward_kl_plus_the_teachers_entropy_with_the_same_gradient(temperature):
    """``forward_ce = forward_kl + T^2 * mean over valid tokens of H(q)``, by hand; the gradients
    are the same tensor's (the entropy is the teacher's, a constant)."""
    student, teacher, labels = batch(seed=3)
    kl = token_kd_loss(student, teacher, labels, divergence="forward_kl", temperature=temperature)
    ce = token_kd_loss(student, teacher, labels, divergence="forward_ce", temperature=temperature, chunk_tokens=2)
    q = torch.softmax(teacher / temperature, -1)
    entropy = -(q * q.log()).sum(-1)[labels != -100].mean() * temperature**2
    torch.testing.assert_close(ce, kl + entropy, rtol=1e-12, atol=1e-12)
    assert float(ce.detach()) >= float(entropy) > 0  # its floor: the teacher's entropy, not 0
    (kl_grad,) = torch.autograd.grad(kl, student)
    (ce_grad,) = torch.autograd.grad(ce, student)
    torch.testing.assert_close(ce_grad, kl_grad, rtol=1e-10, atol=1e-13)
    matched = token_kd_loss(teacher.clone(), teacher, labels, divergence="forward_ce", temperature=temperature)
    torch.testing.assert_close(matched, entropy, rtol=1e-12, atol=1e-12)  # a student equal to its teacher


def test_edge_cases():
    student, teacher, labels = batch()
    same = token_kd_loss(student, student.detach(), labels, divergence="jsd")
    (grad,) = torch.autograd.grad(same, student)
    assert abs(float(same.detach())) < 1e-15 and grad.abs().max() < 1e-15  # equal distributions: 0, and no pull
    none_valid = token_kd_loss(student, teacher, torch.full_like(labels, -100))
    (grad,) = torch.autograd.grad(none_valid, student)
    assert float(none_valid.detach()) == 0 and grad.abs().max() == 0
    unmasked = token_kd_loss(student, teacher)
    torch.testing.assert_close(unmasked, reference(student, teacher, torch.zeros_like(labels), "forward_kl"))
    # a teacher that is sure of one token: the reverse KL stays finite
    sure = torch.full_like(teacher, -1e4)
    sure[..., 0] = 1e4
    loss = token_kd_loss(student, sure, labels, divergence="reverse_kl")
    assert torch.isfinite(loss)
    # the teacher is a constant
    teacher_with_grad = teacher.clone().requires_grad_()
    token_kd_loss(student, teacher_with_grad, labels).backward()
    assert teacher_with_grad.grad is None


def test_bf16_logits_are_upcast_per_chunk():
    student, teacher, labels = batch(seed=3)
    low = student.detach().bfloat16().requires_grad_()
    loss = token_kd_loss(low, teacher.bfloat16(), labels, divergence="jsd", chunk_tokens=2)
    loss.backward()
    assert loss.dtype == torch.float32 and low.grad.dtype == torch.bfloat16
    expected = reference(low.detach().double(), teacher.bfloat16().double(), labels, "jsd")
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


class LargestFloat32(TorchDispatchMode):
    """The largest float32 tensor any operation produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("teacher_form", ["logits", "top-k"])
def test_no_float32_tensor_beyond_one_chunk(teacher_form):
    """bf16 logits of 4 x 64 tokens x 512: forward and backward never hold a float32 tensor of
    more than one chunk's rows (the unchunked form makes 64 times more)."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 64, 512, generator=g).bfloat16().requires_grad_()
    teacher = torch.randn(4, 64, 512, generator=g).bfloat16()
    labels = torch.randint(0, 512, (4, 64), generator=g)
    topk = torch.log_softmax(teacher.float(), -1).topk(8, -1) if teacher_form == "top-k" else None
    tracker = LargestFloat32()
    with tracker:
        loss = token_kd_loss(
            student,
            teacher if topk is None else None,
            labels,
            divergence="jsd",
            chunk_tokens=4,
            teacher_topk=None if topk is None else (topk.values, topk.indices),
        )
        loss.backward()
    assert tracker.largest <= 4 * 512
    unchunked = LargestFloat32()
    with unchunked:
        token_kd_loss(student, teacher, labels, divergence="jsd", chunk_tokens=4 * 64).backward()
    assert unchunked.largest >= 4 * 64 * 512


def test_bad_arguments_are_named():
    student, teacher, labels = batch()
    with pytest.raises(ValueError, match="divergence='kl' is not allowed"):
        token_kd_loss(student, teacher, labels, divergence="kl")
    with pytest.raises(ValueError, match="beta=1.0 must lie strictly between 0 and 1"):
        token_kd_loss(student, teacher, labels, divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="temperature=0 must be a positive number"):
        token_kd_loss(student, teacher, labels, temperature=0)
    with pytest.raises(ValueError, match="teacher_logits \\(3, 5, 10\\) must match"):
        token_kd_loss(student, teacher[..., :10], labels)
    with pytest.raises(ValueError, match="labels \\(3, 4\\) must match"):
        token_kd_loss(student, teacher, labels[:, :4])
    with pytest.raises(ValueError, match="not both"):
        token_kd_loss(student, None, labels)
    with pytest.raises(ValueError, match="indices must lie in \\[0, 11\\)"):
        token_kd_loss(student, None, labels, teacher_topk=(teacher[..., :2], torch.full((3, 5, 2), 11)))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_agrees_with_trls_generalized_jsd(beta):
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer", reason="TRL (test extra trl) is not installed")
    student, teacher, labels = batch(seed=5)
    divergence = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    temperature = 2.0
    ours = token_kd_loss(
        student,
        teacher,
        labels,
        divergence=divergence,
        beta=beta if divergence == "jsd" else 0.5,
        temperature=temperature,
    )
    theirs = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours / temperature**2, theirs, rtol=1e-10, atol=1e-12)
    assert math.isfinite(float(theirs.detach()))


def _torchtune_kd_losses():
    """torchtune's KD loss module, read from its file: torchtune's package needs torchao to
    import, its losses need only torch."""
    import importlib.util

    spec = importlib.util.find_spec("torchtune")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchtune is not installed (make setup installs it without its dependencies)")
    path = f"{list(spec.submodule_search_locations)[0]}/modules/loss/kd_losses.py"
    module_spec = importlib.util.spec_from_file_location("torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "divergence, theirs",
    [("forward_kl", "ForwardKLLoss"), ("forward_ce", "ForwardKLLoss"), ("reverse_kl", "ReverseKLLoss")],
)
def test_agrees_with_torchtunes_kl_losses(divergence, theirs):
    """torchtune's losses are the cross-entropy to the teacher (``-sum q log p``: our
    ``forward_ce``) and the reverse KL (``sum p (log p - log q)``), in float32, over (tokens,
    vocabulary): its forward loss is our ``forward_kl`` plus the teacher's entropy, a constant;
    the gradients are equal."""
    losses = _torchtune_kd_losses()
    student, teacher, labels = batch(seed=6)
    flat_student = student.detach().float().reshape(-1, 11).requires_grad_()
    flat_teacher, flat_labels = teacher.float().reshape(-1, 11), labels.reshape(-1)
    theirs_value = getattr(losses, theirs)()(flat_student, flat_teacher, flat_labels)
    (theirs_grad,) = torch.autograd.grad(theirs_value, flat_student)
    ours = token_kd_loss(flat_student, flat_teacher, flat_labels, divergence=divergence)
    (ours_grad,) = torch.autograd.grad(ours, flat_student)
    offset = 0.0
    if divergence == "forward_kl":
        q = torch.softmax(flat_teacher, -1)
        offset = float(-(q * q.log()).sum(-1)[flat_labels != -100].mean())
    torch.testing.assert_close(float(ours.detach()) + offset, float(theirs_value.detach()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-6)
