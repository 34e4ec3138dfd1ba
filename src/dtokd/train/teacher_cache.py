"""The teacher's outputs on the training batches, computed once and shared between runs.

The cells of a matrix with one seed see the same batches (order, augmentation and mixup depend
only on the seed, the epoch and the data settings; never on the method or the models), so the
teacher's logits on them are the same for every method. ``teacher.cache_outputs: true`` keeps
them on disk, one file per epoch::

    $DTOKD_CACHE/teacher-outputs/<key>/epoch<k>.pt      {"key": ..., "outputs": [logits per step]}

``key`` is a hash of what the outputs depend on: the teacher's weights and buffers (by content),
its input mapping, the data settings, the seed, the batch size, the process's shard of each batch
(rank, world size), mixed precision and memory format, and the device type and CPU thread count
(the same kernels, so that a cached output is bit-identical to a fresh forward pass: turning the
cache on or off never changes what a run computes). Outputs are stored as computed (float32 for
a float32 teacher): 4 bytes x classes per training image per epoch (CIFAR-10, 5,000 images:
0.2 MB an epoch). An epoch's file is written, atomically, only when every step of it ran; a run
that finds it reads it instead of running the teacher. Feature losses (which need the teacher's
intermediate features) and detection are not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dtokd.train import checkpoint as ckpt


def cache_key(teacher: nn.Module, settings: dict[str, Any]) -> str:
    """The key of a teacher's outputs: its weights' checksum and ``settings`` (JSON-serialisable)."""
    content = {"weights": ckpt.checksum(teacher.state_dict()), "threads": torch.get_num_threads(), **settings}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:24]


class CachedTeacher:
    """Callable in place of the teacher during training: ``begin_epoch(k)``, then one call per
    training step in order, then ``end_epoch(complete)``. Outside an epoch (evaluation) it is the
    teacher itself."""

    def __init__(self, teacher: nn.Module, folder: Path, key: str) -> None:
        self.teacher = teacher
        self.folder = folder / key
        self.key = key
        self._epoch: int | None = None
        self._stored: list[Tensor] | None = None
        self._fresh: list[Tensor] = []
        self._step = 0
        self.hits = self.misses = 0

    def _path(self, epoch: int) -> Path:
        return self.folder / f"epoch{epoch}.pt"

    def begin_epoch(self, epoch: int) -> None:
        self._epoch, self._step, self._fresh = epoch, 0, []
        path = self._path(epoch)
        self._stored = None
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if saved.get("key") != self.key:
                raise ValueError(
                    f"teacher-output cache {path} was written for another teacher or data "
                    f"(key {saved.get('key')!r}, expected {self.key!r}); remove it"
                )
            self._stored = saved["outputs"]

    def end_epoch(self, complete: bool) -> None:
        """Store the epoch's fresh outputs if every step ran (``complete``) and none was stored."""
        if complete and self._stored is None and self._fresh:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self._path(self._epoch)  # type: ignore[arg-type]
            temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            try:
                torch.save({"key": self.key, "outputs": self._fresh}, temporary)
                os.replace(temporary, path)  # concurrent writers of one epoch leave one whole copy
            finally:
                temporary.unlink(missing_ok=True)
        self._epoch, self._stored, self._fresh = None, None, []

    def __call__(self, x: Tensor) -> Tensor:
        if self._epoch is None:
            return self.teacher(x)
        step, self._step = self._step, self._step + 1
        if self._stored is not None:
            if step >= len(self._stored) or self._stored[step].shape[0] != x.shape[0]:
                raise ValueError(
                    f"teacher-output cache {self._path(self._epoch)} does not match this run's batches "
                    f"(step {step}: batch of {x.shape[0]}); remove it"
                )
            self.hits += 1
            return self._stored[step].to(x.device)
        self.misses += 1
        out = self.teacher(x)
        self._fresh.append(out.detach().cpu().clone())
        return out
