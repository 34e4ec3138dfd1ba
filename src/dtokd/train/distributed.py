"""Running the trainer under ``torchrun``: process group, device, and batch sharding.

``torchrun --nproc_per_node N -m dtokd.cli distill CONFIG ...`` starts N processes; each
initialises the process group from the environment (gloo on CPU, NCCL on CUDA), takes device
``cuda:LOCAL_RANK`` when the config says ``cuda``, and trains on its slice of every global
batch: ``batch_size`` is the global batch, each rank takes ``batch_size / N`` consecutive
samples of it. Every rank draws the same global batch (order and augmentation fixed by seed
and epoch), so a run's data do not depend on N. Rank 0 alone writes logs, checkpoints and
reports. BatchNorm statistics stay per rank (PyTorch's default under DDP), so models with
BatchNorm differ slightly from a one-process run; BatchNorm-free models match it.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """This run initialised the process group (and so tears it down, :meth:`close`)."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch_size: int) -> slice:
        """This rank's part of a global batch of ``batch_size`` samples."""
        per_rank = batch_size // self.world
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def from_main(self, value: Any) -> Any:
        """The main process's ``value`` on every rank (a picklable object, broadcast from rank 0;
        itself in one process): a decision all ranks must take alike."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self, finished: bool) -> None:
        """Tear down the process group this run initialised, after a barrier when the run
        ``finished`` (so no peer's collective is still in flight; after an error a peer may
        never arrive). The caller drops its models first: a DDP reducer or an FSDP module
        holds the group, and a group that outlives the interpreter's exit aborts the process
        (gloo's worker threads outliving it); the garbage collection frees models caught in
        reference cycles, so the group's threads are joined here."""
        if not self.owns_group or not dist.is_initialized():
            return
        if finished:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; ``cpu``, ``cuda`` and
    ``cuda:N`` as given, with an error when CUDA (or device N) is not there."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r} is not allowed; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={name!r}, but no CUDA device is available here "
                "(torch.cuda.is_available() is False); use device=auto or device=cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name!r}, but only {torch.cuda.device_count()} CUDA device(s) are present")
    return device


def setup(device_name: str, batch_size: int) -> tuple[Ranks, torch.device]:
    """Join the process group that ``torchrun`` describes (if any) and pick this rank's device
    (see :func:`resolve_device`; under torchrun a CUDA run takes ``cuda:LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world <= 1:
        return Ranks(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} (the global batch) must be divisible by the {world} processes")
    cuda = device.type == "cuda"
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if cuda else device
    if cuda:
        torch.cuda.set_device(device)
    return Ranks(rank, world, local_rank, owns_group), device
