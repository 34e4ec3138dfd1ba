"""The gradients a cross-batch rule keeps from one step to the next (:mod:`~dtokd.balancing.cross_batch`,
:mod:`~dtokd.balancing.gated`), and their form in a checkpoint.

They are kept as the exact engine gave them: flat chunks of each objective's whole gradient (one
process, DDP), or of this rank's shard of it (FSDP2: m shards, never a whole gradient, between
steps). Two steps' gradients are compared only if they share a :func:`signature`, which is the
same on every rank (under FSDP2 the parameters' global shapes, not a rank's shard sizes: a rank
whose shard of a parameter is empty must decide as the others do, or the sum of the dot
products across ranks would wait for it). In a state dict:

- unsharded: ``{"chunks": [[flat chunk, ...] per objective], "norms"}``;
- FSDP2: ``{"full": [[each parameter's whole gradient] per objective], "norms"}``, gathered
  from every rank's shards to the first rank of the parameters' mesh, as the pipeline's
  checkpoints gather the model (every rank calls :meth:`KeptGradients.state`, a collective; the
  first rank holds m whole gradient copies in host memory while the checkpoint is written, the
  others ``"full": None``, a state that is refused if loaded).

Either form restores on either kind of parameters and on any number of FSDP ranks
(:func:`restore`: each rank cuts its shard from the whole tensor as FSDP2 places it, ``Shard(0)``),
so a run resumes on the checkpoint's world size or another, as the pipeline's FSDP checkpoints do.
Kept gradients that do not fit the trainable parameters on resume (a layer frozen or unfrozen
since) are dropped: the comparison starts again, as in a run that froze the layer at that step.
``norms`` (each kept gradient's global norm, from the engine's Gram) need no gathering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dtokd.balancing import sharded
from dtokd.balancing.engines import StoredGradients, trainable
from dtokd.balancing.flat import ChunkLayout

Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


@dataclass
class KeptGradients:
    """One step's per-objective gradients as flat chunks, with their norms and :func:`signature`;
    under FSDP2 also the chunks' layout and the sharded parameters, to gather them whole."""

    chunks: list[list[Tensor]]
    norms: Tensor
    signature: Signature
    shards: tuple[ChunkLayout, list[Tensor]] | None = None

    @classmethod
    def of(cls, gradients: StoredGradients, norms: Tensor) -> KeptGradients:
        """``gradients``' chunks (not copied) and ``norms``."""
        shards = (gradients.layout, gradients.params) if gradients.sharded else None
        return cls(gradients.chunks, norms, signature(gradients), shards)

    def state(self) -> dict[str, Any]:
        """CPU copies: the flat chunks, or under FSDP2 each parameter's whole gradient on the
        mesh's first rank (a collective; ``None`` on the other ranks)."""
        norms = self.norms.detach().cpu().clone()
        if self.shards is None:
            return {"chunks": [[c.detach().cpu().clone() for c in row] for row in self.chunks], "norms": norms}
        layout, params = self.shards
        rows = [sharded.gather_whole(params, layout.views(row)) for row in self.chunks]
        return {"full": None if rows[0] is None else rows, "norms": norms}


def signature(gradients: StoredGradients) -> Signature:
    """What two steps' gradients must share to be compared, the same on every rank: under FSDP2
    each parameter's global shape and dtype, else each chunk's size and dtype."""
    if gradients.sharded:
        return _of_params(gradients.params)
    return _of_chunks(gradients.chunks[0])


def restore(state: Mapping[str, Any], params: Sequence[Tensor], who: str) -> KeptGradients | None:
    """:meth:`KeptGradients.state`'s entries as this process's kept gradients for the trainable
    ones of ``params`` (FSDP2 DTensors or plain tensors); None where they do not fit them (see
    the module). Unsharded chunks on unsharded parameters are taken as they are (the next
    comparison checks the fit); every other case goes through each parameter's whole gradient."""
    if "full" in state and state["full"] is None:
        raise ValueError(
            f"{who} state: its kept gradients were gathered to the first rank only (FSDP2): load the first "
            "rank's state on every rank, as the pipeline's checkpoints do"
        )
    norms = state["norms"].to(torch.float64).clone()
    params = trainable(params)
    is_sharded = sharded.is_sharded(params)
    if "chunks" in state and not is_sharded:
        chunks = [[c.to(params[0].device) for c in row] for row in state["chunks"]]
        return KeptGradients(chunks, norms, _of_chunks(chunks[0]))
    whole_layout = ChunkLayout.of(params)  # a DTensor's numel and shape are the whole parameter's
    rows = state["full"] if "full" in state else _split(state["chunks"], whole_layout)
    if rows is None or any([tuple(t.shape) for t in row] != [tuple(p.shape) for p in params] for row in rows):
        return None
    if not is_sharded:
        chunks = [whole_layout.flatten([t.to(p) for t, p in zip(row, params)]) for row in rows]
        return KeptGradients(chunks, norms, _of_chunks(chunks[0]))
    local: list[list[Tensor | None]] = [[sharded.local_shard(t, p) for t, p in zip(row, params)] for row in rows]
    layout = ChunkLayout.of([p.to_local() for p in params], breaks=[len(params)])  # type: ignore[attr-defined]
    return KeptGradients([layout.flatten(row) for row in local], norms, _of_params(params), (layout, list(params)))


def _of_params(params: Sequence[Tensor]) -> Signature:
    return tuple((tuple(p.shape), p.dtype) for p in params)


def _of_chunks(row: Sequence[Tensor]) -> Signature:
    return tuple(((c.numel(),), c.dtype) for c in row)


def _split(rows: list[list[Tensor]], layout: ChunkLayout) -> list[list[Tensor]] | None:
    """Unsharded chunks as each parameter's tensor of ``layout``, or None if they are not its chunks."""
    sizes = [sum(layout.shapes[k].numel() for k in group) for group in layout.groups]
    if any([c.numel() for c in row] != sizes for row in rows):
        return None
    return [layout.views(row) for row in rows]
