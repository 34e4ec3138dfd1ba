"""Balancing under data parallelism (``torch.distributed``, e.g. ``torchrun`` + DDP).

Each rank sees its own shard of the batch. Without care every rank would compute weights from
its own Gram matrix, and the "balanced" update would differ between ranks and from the one the
method defines for the global batch. With equal local batch sizes (``DistributedSampler`` with
``drop_last=True``, or the trainer's sharding) the global loss is ``L_i = mean_r L_i,r`` and
its gradient is the rank average of the local gradients; the modes are:

``"global"`` (default when a process group is initialised)
    The Gram matrix of the global batch, exactly:

    - exact / subset engines: the per-objective gradients are averaged across ranks before the
      Gram is formed (one all-reduce of each objective's gradient: for m = 2 about one gradient
      all-reduce more than plain DDP); the combined update is then formed from the averaged
      gradients, identical on every rank, and written to ``.grad`` directly;
    - representation engine: ``G = (1 / R^2) sum_r G_r`` (the gradient of the global mean loss
      with respect to rank r's part of the representation is ``1/R`` of the local one), one
      all-reduce of m x m numbers; then one ordinary DDP backward of ``sum_i c_i L_i``;
    - the log transform uses the global losses (one all-reduce of m numbers): the objective is
      ``log`` of the global mean loss, not the mean of the local logs.

    The weights are then broadcast from rank 0, so randomised rules (PCGrad's order) agree too.
``"local"``
    Each rank's own Gram and weights; the weights are averaged across ranks, and the update
    goes through one ordinary DDP backward (or one averaged write for the exact engine).
    Cheap, but not the method's update for the global batch.
``"off"``
    Ignore the process group (single-process semantics on each rank).

``check=True`` (default: ``DTOKD_DEBUG=1`` in the environment) compares, every step, a
fingerprint of the parameters and the weights every rank computed before the broadcast, and
raises if they differ: a desynchronised rank is reported (cost: two reductions of a few numbers
and one pass over the parameters). Under FSDP2 only the weights are compared (each rank holds
its own shards).

FSDP2 (``fully_shard``; the balancer's parameters are sharded DTensors): global mode only for
the exact and subset engines, whose Gram is the rank sum of the partial Grams of each rank's
gradient shards, ``G = sum_r G_r`` (see :mod:`dtokd.balancing.sharded`); the representation
engine and the Gram-free rules work as under DDP, FSDP's reduce-scatter averaging the update.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from dtokd.balancing.sharded import is_sharded

SyncMode = Literal["global", "local", "off"]
SYNC_MODES = ("global", "local", "off")


class Sync:
    """The collective operations a balancer needs, or none outside a process group."""

    def __init__(
        self, mode: SyncMode = "global", *, check: bool | None = None, group: dist.ProcessGroup | None = None
    ) -> None:
        if mode not in SYNC_MODES:
            raise ValueError(f"sync={mode!r} is not allowed; use one of {list(SYNC_MODES)}")
        self.mode = mode
        self.group = group
        self.check = os.environ.get("DTOKD_DEBUG", "") == "1" if check is None else bool(check)

    @property
    def active(self) -> bool:
        return self.mode != "off" and dist.is_available() and dist.is_initialized() and self.world_size > 1

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def global_mode(self) -> bool:
        return self.active and self.mode == "global"

    @property
    def local_mode(self) -> bool:
        return self.active and self.mode == "local"

    def mean(self, tensor: Tensor) -> Tensor:
        """The rank average of ``tensor`` (a new tensor, on ``tensor``'s device)."""
        return self.sum(tensor) / self.world_size

    def sum(self, tensor: Tensor) -> Tensor:
        """The rank sum of ``tensor`` (a new tensor, on ``tensor``'s device; reduced on the
        backend's device, so CPU tensors work under NCCL)."""
        out = tensor.detach().to(self._backend_device(tensor), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out.to(tensor.device)

    def average_in_place(self, tensors: list[Tensor]) -> None:
        """Average each tensor across ranks, in place: one all-reduce per tensor, so pass a few
        large flat buffers (the engines' gradient chunks), not one tensor per parameter."""
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            t.div_(self.world_size)

    def _backend_device(self, tensor: Tensor) -> torch.device:
        """Where a collective on ``tensor`` can run: the current CUDA device under NCCL."""
        if tensor.device.type == "cpu" and dist.get_backend(self.group) == dist.Backend.NCCL:
            return torch.device("cuda", torch.cuda.current_device())
        return tensor.device

    def agree(self, weights: Tensor, params: list[Tensor]) -> Tensor:
        """Rank 0's ``weights`` on every rank. With ``check``, first verify that all ranks hold
        the same parameters (a fingerprint: sum and sum of squares; not for FSDP2-sharded parameters,
        of which each rank holds its own shard) and computed the same weights."""
        if self.check and not is_sharded(params):
            fingerprint = torch.stack(
                [
                    torch.stack([p.detach().double().sum() for p in params]).sum(),
                    torch.stack([p.detach().double().pow(2).sum() for p in params]).sum(),
                ]
            )
            self._check_equal(fingerprint, "parameters (sum, sum of squares)")
        if self.check:
            self._check_equal(weights, "balancing weights")
        out = weights.detach().to(self._backend_device(weights), copy=True)
        dist.broadcast(out, src=0, group=self.group)
        return out.to(weights.device)

    def _check_equal(self, value: Tensor, what: str) -> None:
        device = self._backend_device(value)
        low, high = value.detach().to(device, copy=True), value.detach().to(device, copy=True)
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        spread = (high - low).abs().max().item()
        if spread > 1e-6 * max(high.abs().max().item(), 1e-12):
            raise RuntimeError(
                f"ranks disagree on the {what}: rank {dist.get_rank(self.group)} has {value.tolist()}, "
                f"spread {spread:.3g} across ranks; a rank is desynchronised"
            )
