"""Gradient engines: how the Gram matrix of the objective gradients is obtained, and how the
combined gradient ``sum_i c_i grad L_i`` is written into ``.grad``.

Three engines, by name (:data:`ENGINES`):

``"exact"``
    One vector-Jacobian product per objective over the given parameters (or one batched
    product with ``batched=True``). Each objective's gradient is kept as a few flat chunks
    (:mod:`dtokd.balancing.flat`): ``G = sum_k J_k J_k^T`` over chunks k, and the combination
    is formed chunk by chunk and written back as views, in a handful of kernel launches
    whatever the number of parameter tensors. Memory: the m gradients, plus one chunk while
    they are flattened. Cost: m backward passes.
``"subset"``
    The Gram over ``gram_params`` only (e.g. the last block), then one ordinary backward of
    ``sum_i c_i L_i`` over all parameters. Cost: m partial backward passes + 1 full one.
``"representation"``
    The Gram of the gradients with respect to a tensor the caller passes (the logits, a
    feature map), then one backward of the combination: from the representation itself,
    with gradient ``sum_i c_i dL_i/dz``, when every path from the losses to a trainable
    leaf passes through it (checked on the graph each step, a few microseconds), else an
    ordinary backward of ``sum_i c_i L_i``. Cost: about one backward.

Every engine takes ``representation=`` (the exact and subset engines ignore it), so that a
driver passes the student's logits whatever the engine. Every engine accumulates into
``.grad`` exactly like ``loss.backward()`` does: call
``optimizer.zero_grad()`` as usual. Gram entries: dot products in the gradients' precision
(float32 at least) per chunk, summed in float64. Under
``torch.distributed`` the engines make the Gram that of the global batch (see
:mod:`dtokd.balancing.distributed`); the weighted-sum backward relies on DDP's averaging.

Under FSDP2 (the balancer's parameters are DTensors sharded by ``fully_shard``), the exact and
subset engines take each objective's gradient as FSDP's reduce-scattered shard, one ordinary
backward per objective, and form the Gram and the update shard by shard (see
:mod:`dtokd.balancing.sharded`); every backward of these engines runs without ``inputs=``
(which would stop the gradient at FSDP's unsharded copies), FSDP reducing it into the shards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from dtokd.balancing import flat, sharded
from dtokd.balancing.distributed import Sync
from dtokd.balancing.flat import ChunkLayout

EngineName = Literal["exact", "subset", "representation"]
ENGINES: tuple[str, ...] = ("exact", "subset", "representation")
ONE_BACKWARD_PASS: frozenset[str] = frozenset({"representation"})
"""The engines whose step runs one backward pass through the model (the others run one per
objective, keeping the forward graph between them)."""


class ObjectiveGradients(Protocol):
    """The per-objective gradients of one step, as an engine holds them."""

    gram: Tensor
    """m x m float64 Gram matrix of the objective gradients ``<grad L_i, grad L_j>``."""

    def backward(self, coefficients: Tensor) -> None:
        """Accumulate ``sum_i coefficients[i] * grad L_i`` into the parameters' ``.grad``."""


def trainable(params: Sequence[Tensor]) -> list[Tensor]:
    """The parameters that currently require grad; an error if there are none."""
    live = [p for p in params if p.requires_grad]
    if not live:
        raise ValueError("none of the balancer's parameters requires grad: nothing to update")
    return live


def weighted_sum_backward(losses: Sequence[Tensor], coefficients: Tensor, params: Sequence[Tensor]) -> None:
    """One ordinary backward pass of ``sum_i c_i L_i`` into ``params`` only (c detached)."""
    stacked = torch.stack([loss.reshape(()) for loss in losses])
    total = torch.dot(coefficients.detach().to(stacked.dtype), stacked)
    backward_into([total], None, params)


def backward_into(tensors: Sequence[Tensor], grad_tensors: Sequence[Tensor] | None, params: Sequence[Tensor]) -> None:
    """``torch.autograd.backward(tensors, grad_tensors)`` accumulating into ``params`` only; into
    every leaf of the graph when ``params`` are FSDP2 shards, which autograd never reaches
    (FSDP's hooks reduce-scatter the gradients of its unsharded copies into them)."""
    live = trainable(params)
    inputs = None if sharded.is_sharded(live) else live
    torch.autograd.backward(list(tensors), grad_tensors=grad_tensors, inputs=inputs)


def _per_objective_grads(
    losses: Sequence[Tensor], inputs: Sequence[Tensor], batched: bool, keep_graph: bool
) -> tuple[list[list[Tensor]], list[bool]]:
    """grads[i][k] = d losses[i] / d inputs[k] (zeros where a loss does not reach an input),
    and for each loss whether it reaches any input at all."""
    m = len(losses)
    if batched and m > 1:
        stacked = torch.stack(list(losses))
        eye = torch.eye(m, dtype=stacked.dtype, device=stacked.device)
        per_input = torch.autograd.grad(
            stacked, inputs, grad_outputs=eye, is_grads_batched=True, retain_graph=keep_graph, allow_unused=True
        )
        columns = [
            torch.zeros((m, *x.shape), dtype=x.dtype, device=x.device) if g is None else g
            for g, x in zip(per_input, inputs)
        ]
        reaches = any(g is not None for g in per_input)
        return [[column[i] for column in columns] for i in range(m)], [reaches] * m
    grads, reached = [], []
    for i, loss in enumerate(losses):
        retain = keep_graph or i < m - 1
        row = torch.autograd.grad(loss, inputs, retain_graph=retain, allow_unused=True)
        grads.append([torch.zeros_like(x) if g is None else g for g, x in zip(row, inputs)])
        reached.append(any(g is not None for g in row))
    return grads, reached


def _flat_gradients(
    losses: Sequence[Tensor], inputs: Sequence[Tensor], batched: bool, keep_graph: bool, sync: Sync | None
) -> tuple[ChunkLayout, list[list[Tensor]], list[bool]]:
    """Each loss's gradients as flat chunks (see :mod:`dtokd.balancing.flat`), averaged across
    ranks in ``sync``'s global mode; and for each loss whether it reaches any input."""
    grads, reached = _per_objective_grads(losses, inputs, batched, keep_graph)
    layout = ChunkLayout.of(inputs)
    chunks = [layout.flatten(row) for row in grads]  # type: ignore[arg-type]
    if sync is not None and sync.global_mode:
        for row in chunks:
            sync.average_in_place(row)
    return layout, chunks, reached


@dataclass
class StoredGradients:
    """Exact engine: the gradients are kept as flat chunks and combined chunk by chunk
    (the combination averaged across ranks when ``average`` is a local-mode Sync), and added
    to ``.grad`` by ``accumulate`` (FSDP2: :func:`~dtokd.balancing.sharded.accumulate_shards`)."""

    gram: Tensor
    layout: ChunkLayout
    chunks: list[list[Tensor]]
    params: list[Tensor]
    average: Sync | None = None
    accumulate: Callable[[Sequence[Tensor], Sequence[Tensor]], None] = flat.accumulate_grads
    sharded: bool = False
    """Whether the chunks are this rank's FSDP2 shards of the gradients (the Gram is still the global one)."""

    def backward(self, coefficients: Tensor) -> None:
        combined = flat.combine(self.chunks, coefficients.detach().to("cpu", torch.float64).tolist())
        if self.average is not None:
            self.average.average_in_place(combined)
        self.accumulate(self.params, self.layout.views(combined))


def _sharded_gradients(
    engine: str,
    losses: Sequence[Tensor],
    gram_params: list[Tensor],
    other_params: list[Tensor],
    sync: Sync | None,
    batched: bool,
    keep_graph: bool,
) -> StoredGradients:
    """Exact and subset engines under FSDP2: every parameter's shard of each objective's
    gradient (one backward per objective), the Gram over ``gram_params``' shards summed across
    ranks, ``G = sum_r G_r``, and the update written from the shards (no further backward)."""
    params = gram_params + other_params
    sharded.check_sharded_setup(params, sync, engine, batched)
    shards = sharded.objective_shards(losses, params, keep_graph)
    layout = ChunkLayout.of([p.to_local() for p in params], breaks=[len(gram_params)])  # type: ignore[attr-defined]
    chunks = [layout.flatten(row) for row in shards]  # type: ignore[arg-type]
    within = layout.chunks_before(len(gram_params))
    gram = flat.gram([row[:within] for row in chunks])
    if sync is not None and sync.global_mode:
        gram = sync.sum(gram)
    return StoredGradients(gram, layout, chunks, params, accumulate=sharded.accumulate_shards, sharded=True)


@dataclass
class _BackwardLater:
    """Subset and representation engines: one weighted-sum backward pass at the end."""

    gram: Tensor
    losses: list[Tensor]
    params: list[Tensor]

    def backward(self, coefficients: Tensor) -> None:
        weighted_sum_backward(self.losses, coefficients, self.params)


class ExactEngine:
    """Gram over all given parameters, one VJP per objective (``batched``: one vmapped VJP)."""

    name = "exact"
    checks_before_writing = True
    """A step with this engine's Gram is checked on the host before its update is written: its
    m full backward passes dwarf the one host read, and a failed check leaves ``.grad`` as it
    was. (The cheaper engines let a device-form rule queue the update first.)"""

    def __init__(self, params: Sequence[Tensor], *, batched: bool = False) -> None:
        self.params = list(params)
        self.batched = bool(batched)

    def gradients(
        self,
        losses: Mapping[str, Tensor],
        representation: object = None,
        sync: Sync | None = None,
        *,
        keep_graph: bool = False,
    ) -> ObjectiveGradients:
        """``keep_graph``: leave the losses' graph for a later backward (``Balancer.combine``)."""
        params = trainable(self.params)
        sharded.refuse_zero3(params, self.name)
        if sharded.is_sharded(params):
            return _sharded_gradients(self.name, list(losses.values()), params, [], sync, self.batched, keep_graph)
        layout, chunks, _ = _flat_gradients(list(losses.values()), params, self.batched, keep_graph, sync)
        average = sync if (sync is not None and sync.local_mode) else None
        return StoredGradients(flat.gram(chunks), layout, chunks, params, average)


class SubsetEngine:
    """Gram over ``gram_params`` (a subset of ``params``); the update still reaches all params.
    Under FSDP2 a backward cannot stop at the subset: m full backward passes, the update formed
    from their shards (the exact engine's cost, a Gram over the subset only)."""

    name = "subset"
    checks_before_writing = False

    def __init__(self, params: Sequence[Tensor], gram_params: Sequence[Tensor], *, batched: bool = False) -> None:
        self.params = list(params)
        self.gram_params = list(gram_params)
        if not self.gram_params:
            raise ValueError("engine='subset' needs a non-empty gram_params (e.g. the last block's parameters)")
        ids = {id(p) for p in self.params}
        outside = [i for i, p in enumerate(self.gram_params) if id(p) not in ids]
        if outside:
            raise ValueError(f"gram_params at positions {outside} are not among the balancer's params")
        self.batched = bool(batched)

    def gradients(
        self,
        losses: Mapping[str, Tensor],
        representation: object = None,
        sync: Sync | None = None,
        *,
        keep_graph: bool = False,
    ) -> ObjectiveGradients:
        values = list(losses.values())  # the graph is always kept: the update is a backward of the losses
        sharded.refuse_zero3(self.params, self.name)
        if sharded.is_sharded(trainable(self.params)):  # m full backward passes anyway: update from the shards
            inside = trainable(self.gram_params)
            ids = {id(p) for p in inside}
            outside = [p for p in trainable(self.params) if id(p) not in ids]
            return _sharded_gradients(self.name, values, inside, outside, sync, self.batched, keep_graph)
        _, chunks, _ = _flat_gradients(values, trainable(self.gram_params), self.batched, True, sync)
        return _BackwardLater(flat.gram(chunks), values, self.params)


@dataclass
class _BackwardFromRepresentation:
    """Representation engine, losses reaching the parameters only through the representation:
    the combination ``sum_i c_i dL_i/dz`` is formed at z (device coefficients, no host read)
    and back-propagated from z, so the losses' own graphs are not traversed again."""

    gram: Tensor
    layout: ChunkLayout
    chunks: list[list[Tensor]]
    tensors: list[Tensor]
    params: list[Tensor]

    def backward(self, coefficients: Tensor) -> None:
        c = coefficients.detach()
        combined = [c.to(rows[0].dtype) @ torch.stack(rows) for rows in zip(*self.chunks)]
        backward_into(self.tensors, self.layout.views(combined), self.params)


def only_through(losses: Sequence[Tensor], tensors: Sequence[Tensor]) -> bool:
    """Whether every path of the autograd graph from ``losses`` to a leaf that requires grad
    passes through one of ``tensors`` (non-leaf tensors; False if one is a leaf)."""
    if any(z.grad_fn is None for z in tensors):
        return False
    stops = {(z.grad_fn, z.output_nr) for z in tensors}
    seen, pending = set(), [loss.grad_fn for loss in losses]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for following, output in node.next_functions:
            if following is None or (following, output) in stops:
                continue
            if type(following).__name__ == "AccumulateGrad":
                return False
            pending.append(following)
    return True


class RepresentationEngine:
    """Gram of the gradients with respect to a shared tensor (logits, features) of the step."""

    name = "representation"
    checks_before_writing = False

    def __init__(self, params: Sequence[Tensor], *, batched: bool = False) -> None:
        self.params = list(params)
        self.batched = bool(batched)

    def gradients(
        self,
        losses: Mapping[str, Tensor],
        representation: Tensor | Sequence[Tensor] | None = None,
        sync: Sync | None = None,
        *,
        keep_graph: bool = False,
    ) -> ObjectiveGradients:
        tensors = _representation_tensors(representation)
        values = list(losses.values())
        from_representation = only_through(values, tensors) and not keep_graph
        layout, chunks, reached = _flat_gradients(values, tensors, self.batched, not from_representation, sync=None)
        missing = [name for name, ok in zip(losses, reached) if not ok]
        if missing:
            raise ValueError(
                f"loss(es) {missing} do not depend on the representation tensor: the representation "
                "engine needs every loss computed from it (pass e.g. the student's logits or a feature "
                "map that all losses use, or use engine='exact')"
            )
        gram = flat.gram(chunks)
        if sync is not None and sync.global_mode:
            gram = sync.sum(gram) / sync.world_size**2
        if from_representation:
            return _BackwardFromRepresentation(gram, layout, chunks, tensors, self.params)
        return _BackwardLater(gram, values, self.params)


def _representation_tensors(representation: Tensor | Sequence[Tensor] | None) -> list[Tensor]:
    if representation is None:
        raise ValueError(
            "engine='representation' needs backward(losses, representation=z), z a tensor all losses "
            "are computed from (e.g. the student's logits)"
        )
    tensors = [representation] if isinstance(representation, Tensor) else list(representation)
    for k, z in enumerate(tensors):
        if not isinstance(z, Tensor) or not z.requires_grad:
            raise ValueError(f"representation[{k}] must be a tensor in the autograd graph (requires_grad=True)")
    return tensors
