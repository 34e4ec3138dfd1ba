"""GPU memory a causal-LM distillation run needs, estimated from the two models' shapes.

Parameters are counted exactly by building both models on PyTorch's ``meta`` device (no memory
is allocated, nothing is downloaded); the rest is arithmetic, per GPU, without sharding:

- student: bf16 weights for the forward (2 B/param) over fp32 master weights (4), fp32
  gradients (4) and AdamW's two fp32 moments (8): 18 B per parameter (``amp: bf16``);
- teacher: bf16 weights, frozen, no gradients: 2 B per parameter;
- activations kept for the student's backward: about ``(34 h + 5 a s) b s`` bytes per layer at
  bf16 (Korthikanti et al. 2022, without recomputation; ``s`` the block length, ``b`` the batch,
  ``h`` the hidden size, ``a`` the heads; with SDPA/flash attention the ``5 a s`` attention-score
  term is not stored, so both bounds are shown);
- logits: the student's and teacher's ``b x s x V`` in bf16 (kept for the loss), and the token
  KD's float32 working set of ``chunk_tokens x V`` (a few copies) instead of ``b s x V``.

    python benchmarks/lm_memory.py                                # Llama-3.1-8B -> Llama-3.2-1B, b 8, s 2048
    python benchmarks/lm_memory.py --batch 4 --block 4096 --chunk 1024
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


def estimate(student: dict, teacher: dict, batch: int, block: int, chunk: int) -> dict[str, float]:
    """GiB per component (see the module notes)."""
    n_s, n_t = parameters(student), parameters(teacher)
    h, a, layers, vocab = (
        student[k] for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
    )
    tokens = batch * block
    return {
        "student parameters (B)": n_s / 1e9,
        "teacher parameters (B)": n_t / 1e9,
        "student weights, grads, AdamW (18 B/param)": 18 * n_s / GIB,
        "teacher weights, bf16": 2 * n_t / GIB,
        "student activations, flash attention": 34 * h * tokens * layers / GIB,
        "student activations, scores stored": (34 * h + 5 * a * block) * tokens * layers / GIB,
        "logits of both, bf16": 2 * 2 * tokens * vocab / GIB,
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
    args = parser.parse_args()
    if min(args.batch, args.block, args.chunk) < 1:
        parser.error("--batch, --block and --chunk must be positive")
    parts = estimate(SHAPES[args.student], SHAPES[args.teacher], args.batch, args.block, args.chunk)
    print(f"{args.teacher} -> {args.student}, batch {args.batch} x {args.block} tokens per GPU, chunk {args.chunk}\n")
    for name, value in parts.items():
        print(f"  {name:48s} {value:8.2f}" + ("" if "(B)" in name else " GiB"))
    low = sum(
        parts[k]
        for k in (
            "student weights, grads, AdamW (18 B/param)",
            "teacher weights, bf16",
            "student activations, flash attention",
            "logits of both, bf16",
            "token KD working set, fp32 (4 x chunk x V)",
        )
    )
    print(f"\n  total with flash attention, no recomputation      {low:8.2f} GiB (plus framework and allocator slack)")


if __name__ == "__main__":
    main()
