"""Counting what a step costs the host on a CUDA device."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch


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
