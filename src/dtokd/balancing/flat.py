"""Per-objective gradients held as a few flat buffers ("chunks") instead of one tensor per
parameter.

A Gram matrix formed tensor by tensor costs ``m(m+1)/2 x T`` dot products for T parameter
tensors, and the combination ``sum_i c_i g_i`` another ``m x T`` element-wise operations: on a
GPU, small students are bound by kernel launches, not arithmetic (ResNet-20 has 65 tensors).
Here each objective's gradients are concatenated into chunks of consecutive tensors that share
a device and dtype, at most :data:`CHUNK_NUMEL` elements each, and then

    G[i, j]  = sum over chunks k of <chunk_k(g_i), chunk_k(g_j)>   (float64 sum of the dots)
    update_k = sum_i c_i chunk_k(g_i)                               (written back as views)

cost ``m(m+1)/2`` dots and ``m`` fused multiply-adds per chunk. Memory: a chunk replaces the
per-tensor gradients it was built from as soon as it exists, so the peak is the per-tensor
gradients plus at most one chunk (``CHUNK_NUMEL`` elements) per objective. Half-precision
chunks are upcast to float32 for the dot products only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CHUNK_NUMEL = 1 << 25
"""Largest number of elements concatenated into one chunk (128 MB of float32)."""


@dataclass(frozen=True)
class ChunkLayout:
    """Which tensors (by position) form each chunk, and their shapes."""

    groups: tuple[tuple[int, ...], ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, tensors: Sequence[Tensor], max_numel: int | None = None, *, breaks: Sequence[int] = ()) -> ChunkLayout:
        """Consecutive tensors of one device and dtype, at most ``max_numel`` (default
        :data:`CHUNK_NUMEL`) elements per chunk; a larger tensor is a chunk of its own. A chunk
        starts at every position in ``breaks`` (so that the chunks before it cover exactly the
        tensors before it)."""
        max_numel = CHUNK_NUMEL if max_numel is None else max_numel
        if max_numel < 1:
            raise ValueError(f"max_numel must be a positive number of elements, got {max_numel!r}")
        groups: list[list[int]] = []
        size = 0
        for k, t in enumerate(tensors):
            current = groups[-1] if groups else None
            fits = current is not None and size + t.numel() <= max_numel
            same_kind = current is not None and (tensors[current[0]].device, tensors[current[0]].dtype) == (
                t.device,
                t.dtype,
            )
            if fits and same_kind and k not in breaks:
                current.append(k)  # type: ignore[union-attr]
                size += t.numel()
            else:
                groups.append([k])
                size = t.numel()
        return cls(tuple(map(tuple, groups)), tuple(t.shape for t in tensors))

    def chunks_before(self, position: int) -> int:
        """How many chunks hold only tensors before ``position`` (a break of :meth:`of`)."""
        return sum(1 for group in self.groups if group[-1] < position)

    def flatten(self, row: list[Tensor | None]) -> list[Tensor]:
        """One flat tensor per chunk from ``row`` (tensors shaped like the layout's). Entries of
        ``row`` are set to None as they are consumed, so their memory can be released."""
        chunks = []
        for group in self.groups:
            parts = [row[k].reshape(-1) for k in group]  # type: ignore[union-attr]
            chunks.append(parts[0] if len(parts) == 1 else torch.cat(parts))
            for k in group:
                row[k] = None
        return chunks

    def views(self, chunks: Sequence[Tensor]) -> list[Tensor]:
        """The per-tensor views of ``chunks`` (no copies), in the layout's tensor order."""
        out: list[Tensor | None] = [None] * len(self.shapes)
        for group, chunk in zip(self.groups, chunks):
            pieces = chunk.split([self.shapes[k].numel() for k in group])
            for k, piece in zip(group, pieces):
                out[k] = piece.view(self.shapes[k])
        return out  # type: ignore[return-value]


def gram(chunks: Sequence[Sequence[Tensor]]) -> Tensor:
    """``G[i, j] = sum_k <chunks[i][k], chunks[j][k]>`` as an m x m float64 tensor on the first
    chunk's device (each chunk's dots in its own precision, float32 at least; chunks summed in
    float64)."""
    m = len(chunks)
    pairs = [(i, j) for i in range(m) for j in range(i, m)]
    device = chunks[0][0].device
    per_chunk = []
    for k in range(len(chunks[0])):
        flat = [_at_least_float32(row[k]) for row in chunks]
        dots = torch.stack([torch.dot(flat[i], flat[j]) for i, j in pairs])
        per_chunk.append(dots.to(device=device, dtype=torch.float64))
    upper = per_chunk[0] if len(per_chunk) == 1 else torch.stack(per_chunk).sum(0)
    return upper[_symmetric_index(m, device)]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``<a, b>`` of two gradients held as matching chunks, as a float64 scalar on ``a``'s
    device (each chunk's dot in its own precision, float32 at least, as in :func:`gram`)."""
    device = a[0].device
    dots = [
        torch.dot(_at_least_float32(x), _at_least_float32(y)).to(device, torch.float64)
        for x, y in zip(a, b, strict=True)
    ]
    return torch.stack(dots).sum()


def combine(chunks: Sequence[Sequence[Tensor]], coefficients: Sequence[float]) -> list[Tensor]:
    """``sum_i coefficients[i] * chunks[i][k]`` for every chunk k (new tensors)."""
    combined = []
    for k in range(len(chunks[0])):
        total = torch.mul(chunks[0][k], coefficients[0])
        for row, c in zip(chunks[1:], coefficients[1:]):
            total.add_(row[k], alpha=c)
        combined.append(total)
    return combined


def accumulate_grads(params: Sequence[Tensor], updates: Sequence[Tensor]) -> None:
    """``p.grad += update`` for every parameter (``p.grad = update`` where it is None), the
    additions fused into one multi-tensor operation."""
    existing = [(p.grad, u) for p, u in zip(params, updates) if p.grad is not None]
    if existing:
        torch._foreach_add_([g for g, _ in existing], [u for _, u in existing])
    for p, update in zip(params, updates):
        if p.grad is None:
            p.grad = update


def _at_least_float32(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@functools.lru_cache(maxsize=32)
def _symmetric_index(m: int, device: torch.device) -> Tensor:
    """index[i, j] = position of the pair (min(i, j), max(i, j)) in row-major upper-triangle order."""
    position = {pair: n for n, pair in enumerate((i, j) for i in range(m) for j in range(i, m))}
    return torch.tensor([[position[min(i, j), max(i, j)] for j in range(m)] for i in range(m)], device=device)
