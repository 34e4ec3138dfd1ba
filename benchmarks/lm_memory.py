"""GPU memory a causal-LM distillation run needs, estimated from the two models' shapes.

Parameters are counted exactly by building both models on PyTorch's ``meta`` device (no memory
is allocated, nothing is downloaded); the rest is arithmetic, per GPU:

- student: fp32 master weights (4 B/param), fp32 gradients (4) and AdamW's two fp32 moments
  (8): 16 B per parameter, divided by R under FSDP over R GPUs (``--fsdp R``: ``parallel=fsdp``),
  plus bf16 weights for the computation (2 B/param; under FSDP only what is gathered at once:
  the root, i.e. embeddings, head and final norm, which FSDP keeps gathered from the forward to
  the backward pass, and two blocks, the one computing and the one prefetched);
- teacher (``--teacher-mode``): ``live``, bf16 weights, frozen, no gradients: 2 B per
  parameter (under FSDP a 1/R shard plus, at the peak of its forward pass, its root and two
  blocks gathered); ``offline`` (top-k outputs read from disk): no weights at all;
- activations kept for the student's backward: about ``(34 h + 5 a s) b s`` bytes per layer at
  bf16 (Korthikanti et al. 2022, without recomputation; ``s`` the block length, ``b`` the batch,
  ``h`` the hidden size, ``a`` the heads; with SDPA/flash attention the ``5 a s`` attention-score
  term is not stored, so both bounds are shown);
- logits: the student's and teacher's ``b x s x V`` in bf16 (kept for the loss; offline: the
  teacher's top-k, ``b s k`` float32 log-probabilities and int64 ids, 12 B each), and the token
  KD's float32 working set of ``chunk_tokens x V`` (a few copies) instead of ``b s x V``.

    python benchmarks/lm_memory.py                                # Llama-3.1-8B -> Llama-3.2-1B, b 8, s 2048
    python benchmarks/lm_memory.py --batch 4 --block 4096 --chunk 1024
    python benchmarks/lm_memory.py --fsdp 8                       # both sharded over 8 GPUs
    python benchmarks/lm_memory.py --teacher-mode offline --k 32  # no teacher in memory
"""

from __future__ import annotations

import argparse

import torch

SHAPES = {  # the published architectures (config.json of the released models)
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "llama-3.2-3b": dict(
        vocab_size=128256,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}
GIB = 2**30


def parameters(shape: dict) -> int:
    """The exact parameter count of a Llama of these shapes (built on the meta device)."""
    import transformers

    config = transformers.LlamaConfig(**shape)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def root_parameters(shape: dict) -> int:
    """The parameters outside the decoder layers: embeddings, the head (unless tied) and the final norm."""
    embeddings = shape["vocab_size"] * shape["hidden_size"]
    return embeddings * (1 if shape["tie_word_embeddings"] else 2) + shape["hidden_size"]


def gathered_bf16(shape: dict, total: int, shards: int) -> float:
    """Bytes of bf16 weights a model holds for its computation: all of them (``shards`` 1), or
    under FSDP its root and two decoder layers (the one computing, the one prefetched)."""
    if shards == 1:
        return 2 * total
    root = root_parameters(shape)
    return 2 * (root + 2 * (total - root) / shape["num_hidden_layers"])


TEACHER_MODES = ("live", "offline")
UPPER_BOUNDS = ("student activations, scores stored", "unchunked KD would add, fp32 (4 x b s x V)")
"""Components shown beside the total, not in it (what flash attention and chunking avoid)."""


def estimate(
    student: dict,
    teacher: dict,
    batch: int,
    block: int,
    chunk: int,
    *,
    shards: int = 1,
    teacher_mode: str = "live",
    k: int = 32,
) -> dict[str, float]:
    """GiB per component and GPU (see the module notes); ``shards``: FSDP over that many GPUs (1: none)."""
    n_s, n_t = parameters(student), parameters(teacher)
    h, a, layers, vocab = (
        student[k] for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
    )
    tokens = batch * block
    live = teacher_mode == "live"
    return {
        "student parameters (B)": n_s / 1e9,
        "teacher parameters (B)": n_t / 1e9,
        "student fp32 weights, grads, AdamW (16 B/param / R)": 16 * n_s / shards / GIB,
        "student bf16 weights gathered for compute": gathered_bf16(student, n_s, shards) / GIB,
        "teacher bf16 weights (shard)": (2 * n_t / shards if live else 0) / GIB,
        "teacher bf16 weights gathered at its peak": (
            gathered_bf16(teacher, n_t, shards) - 2 * n_t / shards if live and shards > 1 else 0
        )
        / GIB,
        "student activations, flash attention": 34 * h * tokens * layers / GIB,
        "student activations, scores stored": (34 * h + 5 * a * block) * tokens * layers / GIB,
        "logits (student; live teacher's bf16, or its top-k)": (
            2 * tokens * vocab + (2 * tokens * vocab if live else 12 * tokens * k)
        )
        / GIB,
        "token KD working set, fp32 (4 x chunk x V)": 4 * 4 * min(chunk, tokens) * vocab / GIB,
        "unchunked KD would add, fp32 (4 x b s x V)": 4 * 4 * tokens * vocab / GIB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="llama-3.2-1b", choices=sorted(SHAPES))
    parser.add_argument("--teacher", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=8, help="sequences per GPU")
    parser.add_argument("--block", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--chunk", type=int, default=1024, help="token KD chunk (losses.distill.chunk_tokens)")
    parser.add_argument("--fsdp", type=int, default=1, metavar="R", help="shard both models over R GPUs (1: none)")
    parser.add_argument(
        "--teacher-mode", default="live", choices=TEACHER_MODES, help="a live teacher, or offline top-k"
    )
    parser.add_argument("--k", type=int, default=32, help="top-k of offline teacher outputs")
    args = parser.parse_args()
    if min(args.batch, args.block, args.chunk, args.fsdp, args.k) < 1:
        parser.error("--batch, --block, --chunk, --fsdp and --k must be positive")
    parts = estimate(
        SHAPES[args.student],
        SHAPES[args.teacher],
        args.batch,
        args.block,
        args.chunk,
        shards=args.fsdp,
        teacher_mode=args.teacher_mode,
        k=args.k,
    )
    print(
        f"{args.teacher} -> {args.student}, batch {args.batch} x {args.block} tokens per GPU, chunk {args.chunk}, "
        f"FSDP over {args.fsdp} GPU(s), teacher {args.teacher_mode}"
        + (f" (top-{args.k})" if args.teacher_mode == "offline" else "")
        + "\n"
    )
    for name, value in parts.items():
        print(f"  {name:54s} {value:8.2f}" + ("" if "(B)" in name else " GiB"))
    low = sum(value for name, value in parts.items() if "(B)" not in name and name not in UPPER_BOUNDS)
    print(
        f"\n  {'total with flash attention, no recomputation':54s} {low:8.2f} GiB (plus framework and allocator slack)"
    )


if __name__ == "__main__":
    main()
