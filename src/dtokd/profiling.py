"""Counting what a step costs the host: synchronisations on a CUDA device, dispatched operations."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def host_syncs(fn: Callable[[], object]) -> int:
    """How many times ``fn()`` makes the host wait for the GPU: the synchronising calls
    (``.item()``, ``.cpu()``, ``.tolist()``, blocking copies, ...) that CUDA's sync debug mode
    reports while ``fn`` runs. Needs a CUDA device; the debug mode is reset afterwards."""
    if not torch.cuda.is_available():
        raise RuntimeError("host_syncs needs a CUDA device")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) and "prototype" not in str(w.message) for w in caught)


def waits_for_device(fn: Callable[[], object], cycles: int = 10**9) -> bool:
    """Whether ``fn()`` returns only after the device finished the work queued before it: a
    kernel that spins for ``cycles`` GPU clock cycles (about half a second) is queued first,
    and the stream is queried as ``fn`` returns. Catches every kind of wait, event waits
    included (which :func:`host_syncs` does not see). Needs a CUDA device."""
    if not torch.cuda.is_available():
        raise RuntimeError("waits_for_device needs a CUDA device")
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    fn()
    drained = torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    return drained


class ComputeOpCounter(TorchDispatchMode):
    """Counts the tensor operations dispatched while active that compute (each one a kernel
    launch on a GPU); metadata-only views and splits are left out.

        with ComputeOpCounter() as ops:
            step()
        ops.count
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket not in (torch.ops.aten.split, torch.ops.aten.split_with_sizes):
            self.count += 1
        return func(*args, **(kwargs or {}))
