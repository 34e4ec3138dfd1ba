"""The gradients a cross-batch rule keeps from one step to the next (:mod:`~dtokd.balancing.cross_batch`,
:mod:`~dtokd.balancing.gated`), and their form in a checkpoint.

They are kept as the exact engine gave them: flat chunks of each objective's whole gradient (one
process, DDP), or of this rank's shard of it (FSDP2: m shards, never a whole gradient, between
steps). In a state dict:

- unsharded: ``{"chunks": [[flat chunk, ...] per objective], "norms"}``;
- FSDP2: ``{"full": [[each parameter's whole gradient] per objective], "norms"}``, gathered
  from every rank's shards. Gathering is a collective: every rank calls :meth:`KeptGradients.state`
  (as every rank calls FSDP's own state-dict functions), and each gets the whole tensors, m
  gradient copies in host memory while the checkpoint is written.

Either form restores on either kind of parameters and on any number of FSDP ranks
(:func:`restore`: each rank cuts its shard from the whole tensor as FSDP2 places it, ``Shard(0)``),
so a run resumes on the checkpoint's world size or another, as the pipeline's FSDP checkpoints do.
``norms`` (each kept gradient's global norm, from the engine's Gram) need no gathering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dtokd.balancing import sharded
from dtokd.balancing.engines import StoredGradients
from dtokd.balancing.flat import ChunkLayout


@dataclass
class KeptGradients:
    """One step's per-objective gradients as flat chunks, with their norms; under FSDP2 also the
    chunks' layout and the sharded parameters, to gather them whole for a checkpoint."""

    chunks: list[list[Tensor]]
    norms: Tensor
    shards: tuple[ChunkLayout, list[Tensor]] | None = None

    @classmethod
    def of(cls, gradients: StoredGradients, norms: Tensor) -> KeptGradients:
        """``gradients``' chunks (not copied) and ``norms``."""
        shards = (gradients.layout, gradients.params) if gradients.sharded else None
        return cls(gradients.chunks, norms, shards)

    def state(self) -> dict[str, Any]:
        """CPU copies: the flat chunks, or under FSDP2 each parameter's whole gradient (a collective)."""
        norms = self.norms.detach().cpu().clone()
        if self.shards is None:
            return {"chunks": [[c.detach().cpu().clone() for c in row] for row in self.chunks], "norms": norms}
        layout, params = self.shards
        return {"full": [sharded.gather_whole(params, layout.views(row)) for row in self.chunks], "norms": norms}


def restore(state: Mapping[str, Any], params: Sequence[Tensor], who: str) -> KeptGradients:
    """:meth:`KeptGradients.state`'s entries as this process's kept gradients for the trainable
    ``params`` (FSDP2 DTensors or plain tensors). Unsharded chunks on unsharded parameters are
    taken as they are (a layout that no longer matches only starts the comparison again);
    every other case goes through each parameter's whole gradient, whose shapes must match."""
    norms = state["norms"].to(torch.float64).clone()
    is_sharded = sharded.is_sharded(params)
    if "chunks" in state and not is_sharded:
        return KeptGradients([[c.to(params[0].device) for c in row] for row in state["chunks"]], norms)
    whole_layout = ChunkLayout.of(params)  # a DTensor's numel and shape are the whole parameter's
    rows = state["full"] if "full" in state else [whole_layout.views(row) for row in state["chunks"]]
    for row in rows:
        shapes = [tuple(t.shape) for t in row]
        if shapes != [tuple(p.shape) for p in params]:
            raise ValueError(
                f"{who} state: its kept gradients are shaped {shapes}, the balancer's trainable parameters "
                f"{[tuple(p.shape) for p in params]}: resume with the same trainable parameters"
            )
    if not is_sharded:
        return KeptGradients([whole_layout.flatten([t.to(p) for t, p in zip(row, params)]) for row in rows], norms)
    local: list[list[Tensor | None]] = [[sharded.local_shard(t, p) for t, p in zip(row, params)] for row in rows]
    layout = ChunkLayout.of([p.to_local() for p in params], breaks=[len(params)])  # type: ignore[attr-defined]
    return KeptGradients([layout.flatten(row) for row in local], norms, (layout, list(params)))
