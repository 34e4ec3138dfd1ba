"""Balancing over parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 a parameter is a DTensor of which each of the R ranks holds one shard (dimension 0).
The forward pass runs on unsharded copies that FSDP all-gathers, and FSDP's post-backward hooks
reduce-scatter their gradients into the sharded parameters' ``.grad``: each rank receives its
shard of the rank average of the local gradients (FSDP's default divide factor R), that is of
the gradient of the global mean loss (equal local batch sizes). ``torch.autograd.grad`` never
reaches the sharded parameters (the unsharded copies are separate leaves, and the hooks do not
run), so the per-objective gradients are taken the only way FSDP gives them:

    for each objective i: .grad = None; backward(L_i, retain_graph=True); s_i,r = rank r's shard
    G[i, j] = sum_r <s_i,r, s_j,r>                   (each rank's partial Gram, all-reduced)
    .grad  += sum_i c_i s_i,r                         (formed shard by shard, a DTensor like FSDP's)

The shards partition the averaged gradients, so ``G`` is the Gram of the global batch's
gradients exactly (no ``1/R^2``, unlike the representation engine's rank-sum). Cost: m backward
passes, each with FSDP's all-gathers and reduce-scatters. Memory: m sharded gradients (1/R of a
gradient each), never a full one. ``.grad`` as it was before the step (accumulated micro-batches)
is kept aside during the m passes and added to.

Contract: every parameter given to the balancer is an FSDP2 DTensor sharded on a 1-D mesh (not
HSDP) covering the balancer's process group, the balancer syncs globally (``sync="global"``: a
partial Gram is not a Gram), FSDP's gradient sync is on and its divide factor the default, and
the balancer's parameters are all the trainable leaves the losses reach (a backward per
objective also accumulates into any other one). A breach of the first three is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # pragma: no cover - a build without torch.distributed has no FSDP either
    DTensor = Shard = distribute_tensor = None  # type: ignore[misc,assignment]

if TYPE_CHECKING:
    from dtokd.balancing.distributed import Sync


def is_sharded(params: Sequence[Tensor]) -> bool:
    """Whether ``params`` are FSDP2-sharded (DTensors); an error if some are and some are not."""
    if DTensor is None:
        return False
    kinds = {isinstance(p, DTensor) for p in params}
    if len(kinds) > 1:
        raise ValueError(
            "some of the balancer's parameters are DTensors (sharded by FSDP2) and some are plain tensors: "
            "apply fully_shard to the root module too (it shards every parameter not yet sharded), and "
            "build the balancer after fully_shard, over model.parameters()"
        )
    return kinds == {True}


def partitioned_by_zero3(params: Sequence[Tensor]) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions ``params`` (it marks them with ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in params)


def refuse_zero3(params: Sequence[Tensor], engine: str) -> None:
    """A ValueError for parameters partitioned by DeepSpeed ZeRO-3: outside its own hooks a
    parameter holds no data and its gradients are partitioned DeepSpeed's way, so one objective's
    gradient cannot be taken (checked on the CPU: ZeRO-3 under gloo with ``DS_ACCELERATOR=cpu``,
    where the representation engine equals one process: ``benchmarks/deepspeed_zero3_check.py``)."""
    if partitioned_by_zero3(params):
        raise ValueError(
            f"engine={engine!r} takes each objective's parameter gradient, which DeepSpeed ZeRO-3 partitions "
            "its own way: use engine='representation' (the Gram at the logits), dto-amortized or fixed weights "
            "under ZeRO-3, or FSDP2 (fully_shard) for the exact engine"
        )


def check_sharded_setup(params: Sequence[Tensor], sync: Sync | None, engine: str, batched: bool) -> None:
    """The combinations under which ``engine`` cannot form the global Gram from shards, as errors:
    no global sync (``sync`` None or not in mode ``"global"``), a batched
    VJP, a mesh other than one dimension of shards, or a mesh other than the sync's group."""
    if sync is None or sync.mode != "global":
        mode = None if sync is None else sync.mode
        raise ValueError(
            f"engine={engine!r} over FSDP2-sharded parameters needs sync='global' (got {mode!r}): each rank "
            "holds a shard of every gradient, so its own Gram is only a part of the Gram, and the parts "
            "must be summed across ranks (use engine='representation' for a per-rank Gram)"
        )
    if batched:
        raise ValueError(
            f"engine={engine!r} with batched=True is not available under FSDP2: a batched VJP "
            "(torch.autograd.grad) bypasses FSDP's reduce-scatter; build the balancer with batched=False"
        )
    for k, p in enumerate(params):
        mesh = p.device_mesh  # type: ignore[attr-defined]
        if mesh.ndim != 1 or not all(isinstance(place, Shard) for place in p.placements):  # type: ignore[attr-defined]
            raise NotImplementedError(
                f"parameter {k} is placed as {p.placements} on a {mesh.ndim}-D mesh: balancing over "  # type: ignore[attr-defined]
                "sharded gradients supports FSDP2's 1-D sharding only (not HSDP or tensor parallelism)"
            )
        if sync.active and mesh.size() != sync.world_size:
            raise ValueError(
                f"parameter {k} is sharded over {mesh.size()} ranks, but the balancer syncs over "
                f"{sync.world_size}: give the balancer the process group of FSDP's mesh"
            )


def objective_shards(losses: Sequence[Tensor], params: Sequence[Tensor], keep_graph: bool) -> list[list[Tensor]]:
    """``shards[i][k]``: this rank's shard of objective i's gradient for ``params[k]`` (a local
    tensor; zeros where the objective does not reach it), from one FSDP backward pass per
    objective. ``.grad`` is left as it was. ``keep_graph``: keep the losses' graph after the last
    pass. An error if no objective left a gradient in any parameter."""
    prior = [p.grad for p in params]
    shards: list[list[Tensor]] = []
    reached = False
    try:
        for i, loss in enumerate(losses):
            for p in params:
                p.grad = None
            torch.autograd.backward(loss, retain_graph=keep_graph or i < len(losses) - 1)
            reached = reached or any(p.grad is not None for p in params)
            shards.append([_local_grad(p) for p in params])
    finally:
        for p, grad in zip(params, prior):
            p.grad = grad
    if not reached:
        raise RuntimeError(
            "no objective left a gradient in the FSDP2-sharded parameters: is FSDP's gradient sync off "
            "(set_requires_gradient_sync(False)), or are the balancer's parameters not the sharded model's?"
        )
    return shards


def _local_grad(p: Tensor) -> Tensor:
    """This rank's shard of ``p.grad`` (zeros shaped like the parameter's shard where None)."""
    if p.grad is None:
        return torch.zeros_like(p.to_local())  # type: ignore[attr-defined]
    return p.grad.to_local().detach()  # type: ignore[attr-defined]


def accumulate_shards(params: Sequence[Tensor], updates: Sequence[Tensor]) -> None:
    """``p.grad += update`` for sharded parameters, ``update`` being this rank's shard (a local
    tensor): ``.grad`` becomes (or stays) a DTensor with the parameter's mesh, placements and
    global shape, as FSDP's reduce-scatter leaves it, so that any optimizer steps as usual."""
    for p, update in zip(params, updates):
        if p.grad is not None:
            p.grad.to_local().add_(update)  # type: ignore[attr-defined]  # the local shard, in place
            continue
        p.grad = placed_like(p, update)


def placed_like(p: Tensor, shard: Tensor) -> Tensor:
    """This rank's ``shard`` (a local tensor shaped like ``p``'s) as a DTensor placed as the
    sharded parameter ``p`` (its mesh, placements, global shape and stride)."""
    return DTensor.from_local(
        shard,
        p.device_mesh,  # type: ignore[attr-defined]
        p.placements,  # type: ignore[attr-defined]
        run_check=False,
        shape=p.shape,
        stride=p.stride(),
    )


def gather_whole(params: Sequence[Tensor], shards: Sequence[Tensor]) -> list[Tensor] | None:
    """Each parameter's whole tensor, on the CPU of the first rank of its mesh, from this rank's
    ``shards`` of it (local tensors shaped like its shard): an all-gather per parameter, so every
    rank calls it; the other ranks get None."""
    first = all(p.device_mesh.get_local_rank() == 0 for p in params)  # type: ignore[attr-defined]
    whole = []
    for p, shard in zip(params, shards):
        gathered = placed_like(p, shard).full_tensor()  # type: ignore[attr-defined]
        if first:
            whole.append(gathered.cpu())
    return whole if first else None


def local_shard(whole: Tensor, p: Tensor) -> Tensor:
    """This rank's shard of ``whole`` (shaped like the sharded parameter ``p``), placed as ``p``
    is: cut from the whole tensor every rank holds, no communication."""
    placed = distribute_tensor(
        whole.to(device=p.device, dtype=p.dtype),
        p.device_mesh,  # type: ignore[attr-defined]
        p.placements,  # type: ignore[attr-defined]
        src_data_rank=None,
    )
    return placed.to_local()
