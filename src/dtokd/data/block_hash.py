"""A token block's 64-bit content hash, ``h(x) = sum_i (x_i + 1) * P^i mod 2^64`` (``P`` an odd
61-bit constant; integer arithmetic, so the same on every device and in any summation order):
how offline teacher outputs index their blocks (:mod:`dtokd.data.teacher_outputs`) and how a
run finds a batch's blocks among them (:class:`~dtokd.data.offline_teacher.OfflineTeacher`)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

HASH_BASE = 0x1FFFFFFFFFFFFFC5
"""``P``, odd and below 2^61, so every power is non-zero modulo 2^64."""


def block_hashes(input_ids: Tensor) -> Tensor:
    """``h`` of each row of ``input_ids`` ``(N, L)`` (see the module notes), int64 with wrap-around."""
    weights = _hash_weights(input_ids.shape[-1]).to(input_ids.device)
    return ((input_ids.to(torch.int64) + 1) * weights).sum(-1)


@functools.lru_cache(maxsize=8)
def _hash_weights(length: int) -> Tensor:
    """``P^i mod 2^64`` for ``i < length``, as signed 64-bit integers."""
    powers, power = [], 1
    for _ in range(length):
        powers.append(power - (1 << 64) if power >= 1 << 63 else power)
        power = power * HASH_BASE % (1 << 64)
    return torch.tensor(powers, dtype=torch.int64)
