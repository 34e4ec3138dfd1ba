"""Token-level distillation losses for language models, over valid tokens only, in chunks.

For a student's next-token logits ``s`` and a teacher's ``t`` at temperature ``T``, with
``p = softmax(s / T)`` and ``q = softmax(t / T)``, the loss of one token is one of

- ``forward_kl``: ``KL(q || p) = sum_v q_v (log q_v - log p_v)`` (Hinton's KD; TRL's
  generalized JSD at ``beta = 0``),
- ``forward_ce``: the cross-entropy to the teacher's distribution, ``H(q, p) = -sum_v q_v log p_v
  = KL(q || p) + H(q)`` (torchtune's ``ForwardKLLoss``): forward KL's gradient, but its floor is
  the teacher's entropy ``H(q)`` instead of 0, as the next-token cross-entropy's floor is the
  data's. A balancer of log losses (DTO's rules) weighs a loss by ``1 / L``: under the
  amortized rule a KL that nears 0 as the student matches its teacher takes an ever larger
  share, the cross-entropy form does not; under the min-norm rule (``dto``) the larger loss
  shortens the KL's log-gradient and the rule then goes almost wholly to it, so keep
  ``forward_kl`` there (docs/methods.md, "Which to pick"),
- ``reverse_kl``: ``KL(p || q)`` (mode-seeking; MiniLLM; TRL's generalized JSD at ``beta = 1``),
- ``jsd``: the generalized Jensen-Shannon divergence of GKD (Agarwal et al., ICLR 2024),
  ``beta KL(q || m) + (1 - beta) KL(p || m)`` with ``m = beta q + (1 - beta) p``, for
  ``0 < beta < 1`` (``beta = 0.5``: the symmetric JSD),

times ``T^2`` (so that the gradient's scale does not depend on ``T``; at ``T = 1`` nothing
changes). The loss is the **mean over valid tokens**: positions whose label is
``ignore_index`` (-100: padding, prompt tokens) are left out, and the sum over the others is
divided by their number (TRL's ``batchmean`` with labels; a batch without a valid token gives 0).
Labels are aligned with the logits (for a causal LM: the logits at position ``i`` and the
token at ``i + 1``, shifted by the caller, as the model's own loss does).

**Memory.** A (batch x length x vocabulary) float32 tensor is never materialised beyond
``chunk_tokens`` rows: the forward pass computes the loss chunk by chunk without keeping a
graph, and the backward pass recomputes each chunk's softmaxes and writes the analytic
gradient ``(1 / T) p * (g - <p, g>)``, ``g = dL/dp``, into the logits' gradient (the one
tensor of the logits' size a backward pass needs anyway). The teacher is a constant: it
receives no gradient.

**A teacher given as its top-k.** ``teacher_topk=(log_probs, indices)`` (the teacher's
log-probabilities at temperature ``T`` of its ``k`` most likely tokens, as an offline cache
stores them) compares the two distributions over ``k + 1`` buckets: the ``k`` tokens, and the
rest of the vocabulary as one bucket holding the tail mass ``1 - sum(top-k)`` (the student's
tail is summed over its own logits). With ``k`` = the vocabulary it is the full loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("forward_kl", "forward_ce", "reverse_kl", "jsd")
DEFAULT_CHUNK_TOKENS = 1024


def token_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """The mean over valid tokens of ``T^2 D(teacher, student)`` (see the module notes).

    ``student_logits``: ``(..., V)``; ``teacher_logits``: the same shape, or ``None`` with
    ``teacher_topk = (log_probs (..., k), indices (..., k))``; ``labels``: ``(...)`` aligned
    with the logits, ``ignore_index`` where a position does not count (``None``: all count).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is not allowed; use one of {list(DIVERGENCES)}")
    if divergence == "jsd" and not (isinstance(beta, (int, float)) and 0 < beta < 1):
        raise ValueError(
            f"beta={beta!r} must lie strictly between 0 and 1 for 'jsd' (its limits are 'forward_kl' and 'reverse_kl')"
        )
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a positive number")
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens!r} must be a positive integer")
    vocabulary = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocabulary)
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("give the teacher as teacher_logits or as teacher_topk=(log_probs, indices), not both")
    if teacher_logits is not None:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits {tuple(teacher_logits.shape)} must match student_logits {tuple(student_logits.shape)}"
            )
        teacher: tuple[Tensor, ...] = (teacher_logits.detach().reshape(-1, vocabulary),)
    else:
        log_probs, indices = teacher_topk  # type: ignore[misc]
        if log_probs.shape != indices.shape or log_probs.shape[:-1] != student_logits.shape[:-1]:
            raise ValueError(
                f"teacher_topk log_probs {tuple(log_probs.shape)} and indices {tuple(indices.shape)} must "
                f"share the student's leading shape {tuple(student_logits.shape[:-1])} and one k"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocabulary):
            raise ValueError(f"teacher_topk indices must lie in [0, {vocabulary})")
        k = log_probs.shape[-1]
        teacher = (log_probs.detach().reshape(-1, k), indices.reshape(-1, k))
    if labels is None:
        valid = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
    else:
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"labels {tuple(labels.shape)} must match the logits' leading shape {tuple(student_logits.shape[:-1])}"
            )
        valid = labels.reshape(-1) != ignore_index
    return _ChunkedTokenKD.apply(student, valid, divergence, float(beta), float(temperature), chunk_tokens, *teacher)


def _bucketed(
    student_log_probs: Tensor, teacher: tuple[Tensor, ...], temperature: float
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(student, teacher) log-probabilities over the buckets of a chunk, and the top-k indices
    (None: the buckets are the vocabulary). With ``k`` below the vocabulary the last bucket is
    the tail; the teacher's tail mass is at least the smallest positive float (a top-k whose
    mass rounds to 1 still leaves the rest of the vocabulary possible)."""
    dtype = student_log_probs.dtype
    if len(teacher) == 1:
        return student_log_probs, F.log_softmax(teacher[0].to(dtype) / temperature, dim=-1), None
    teacher_top, indices = teacher
    teacher_top = teacher_top.to(dtype)
    student_top = student_log_probs.gather(-1, indices)
    if indices.shape[-1] == student_log_probs.shape[-1]:  # every token listed: no tail bucket
        return student_top, teacher_top - torch.logsumexp(teacher_top, -1, keepdim=True), indices
    student_tail = torch.logsumexp(student_log_probs.scatter(-1, indices, float("-inf")), dim=-1, keepdim=True)
    teacher_mass = torch.logsumexp(teacher_top, dim=-1, keepdim=True).clamp(max=0.0)
    teacher_tail = torch.log(-torch.expm1(teacher_mass)).clamp(min=math.log(torch.finfo(dtype).tiny))
    return torch.cat([student_top, student_tail], -1), torch.cat([teacher_top, teacher_tail], -1), indices


def _divergence(log_p: Tensor, log_q: Tensor, divergence: str, beta: float) -> tuple[Tensor, Tensor]:
    """Per row: the divergence, and ``h = p * dD/dp`` over the buckets (from which the
    gradient at the logits is ``h - p sum(h)``), with ``0 log 0 = 0``. A NaN probability (a
    NaN or +inf logit) is not a zero: it makes the row's loss NaN, as its gradient is."""
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        loss = torch.where(q == 0, 0.0, q * (log_q - log_p)).sum(-1)
        return loss, -q
    if divergence == "forward_ce":
        return torch.where(q == 0, 0.0, -q * log_p).sum(-1), -q
    if divergence == "reverse_kl":
        terms = torch.where(p == 0, 0.0, p * (log_p - log_q))
        return terms.sum(-1), terms + p
    log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log1p(-beta))
    teacher_part = torch.where(q == 0, 0.0, q * (log_q - log_m)).sum(-1)
    student_terms = torch.where(p == 0, 0.0, p * (log_p - log_m))
    return beta * teacher_part + (1 - beta) * student_terms.sum(-1), (1 - beta) * student_terms


class _ChunkedTokenKD(torch.autograd.Function):
    """The loss chunk by chunk of tokens; the backward pass recomputes each chunk."""

    @staticmethod
    def forward(ctx, student, valid, divergence, beta, temperature, chunk_tokens, *teacher):
        ctx.save_for_backward(student, valid, *teacher)
        ctx.settings = (divergence, beta, temperature, chunk_tokens)
        count = int(valid.sum())
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for rows in _chunks(valid, chunk_tokens):
            log_p, log_q, _ = _bucketed(
                _student_log_probs(student, rows, temperature), tuple(part[rows] for part in teacher), temperature
            )
            total += _divergence(log_p, log_q, divergence, beta)[0].sum().double()
        ctx.count = count
        # every divergence is >= 0: a rounding error below 0 (a student at its teacher) is 0, which
        # a balancer of log losses needs (its gradient, the backward's, is unchanged)
        return (total.clamp_min(0.0) * temperature**2 / max(count, 1)).to(_compute_dtype(student))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        student, valid, *teacher = ctx.saved_tensors
        divergence, beta, temperature, chunk_tokens = ctx.settings
        grad = torch.zeros_like(student)
        scale = grad_output.to(_compute_dtype(student)) * temperature / max(ctx.count, 1)  # T^2 / T: through s / T
        for rows in _chunks(valid, chunk_tokens):
            log_probs = _student_log_probs(student, rows, temperature)
            log_p, log_q, indices = _bucketed(log_probs, tuple(part[rows] for part in teacher), temperature)
            h = _divergence(log_p, log_q, divergence, beta)[1]
            if indices is None:
                h_vocab = h
            elif h.shape[-1] == indices.shape[-1]:  # every token listed
                h_vocab = torch.zeros_like(log_probs).scatter(-1, indices, h)
            else:  # the tail bucket's h spread over its tokens in proportion to their probability
                share = torch.where(torch.isfinite(log_p[:, -1:]), (log_probs - log_p[:, -1:]).exp(), 0.0)
                h_vocab = (h[:, -1:] * share).scatter(-1, indices, h[:, :-1])
            p = log_probs.exp()
            grad[rows] = ((h_vocab - p * h_vocab.sum(-1, keepdim=True)) * scale).to(grad.dtype)
        return (grad, None, None, None, None, None, *([None] * len(teacher)))


def _chunks(valid: Tensor, chunk_tokens: int):
    """The indices of the valid rows, ``chunk_tokens`` at a time."""
    rows = valid.nonzero().squeeze(-1)
    for start in range(0, rows.numel(), chunk_tokens):
        yield rows[start : start + chunk_tokens]


def _compute_dtype(student: Tensor) -> torch.dtype:
    """float32 (float64 for float64 logits): half-precision logits are upcast one chunk at a time."""
    return torch.float64 if student.dtype == torch.float64 else torch.float32


def _student_log_probs(student: Tensor, rows: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(student[rows].to(_compute_dtype(student)) / temperature, dim=-1)
