"""What reads offline teacher outputs (:mod:`dtokd.data.teacher_outputs`) into training: a dataset
with the top-k as columns (for a trainer that takes them from the batch, by block index), and a
teacher that answers a batch of input ids with their top-k (for a loop whose batches carry no
block index: the pipeline).

**Finding a block by its content.** :class:`OfflineTeacher` keys every stored block by the 64-bit
hash of its input ids (:mod:`dtokd.data.block_hash`) that the outputs' index holds, kept sorted:
starting one reads the index only, no shard. A batch row is looked up by its hash and then
compared with the stored ids (every stored block of that hash, should two collide): a row that
is not among them is refused, never answered with another block's outputs.
Identical blocks have identical teacher outputs (the teacher sees only its input), so which copy
answers does not matter. The lookup costs one transfer of the batch's ids to the host and back
with its top-k (``(B, L, k)`` half-precision log-probabilities and int64 ids) per step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dtokd.data.block_hash import block_hashes
from dtokd.data.teacher_outputs import TeacherOutputs


def vocabulary_identity(vocabulary: Sequence[str]) -> str:
    """A tokenizer's identity in a manifest, for a tokenizer given as its vocabulary (the
    pipeline's text corpora): ``vocabulary-sha256:`` and the SHA-256 of the vocabulary as a JSON
    list, in order."""
    return "vocabulary-sha256:" + hashlib.sha256(json.dumps(list(vocabulary)).encode()).hexdigest()


class OfflineTeacher(nn.Module):
    """The teacher given as its top-k outputs over a corpus: ``forward(input_ids (B, L))`` returns
    ``(log_probs (B, L, k) float32, indices (B, L, k) int64)`` on the ids' device, the
    ``teacher_topk`` of :func:`dtokd.losses.token_kd_loss` for those blocks, found by content
    (module notes). It has no parameters or buffers: moving it, freezing it or saving the state
    of what holds it does nothing."""

    def __init__(self, outputs: TeacherOutputs) -> None:
        super().__init__()
        self.outputs = outputs
        self._hashes, self._order = outputs.block_hashes().sort()

    @property
    def manifest(self) -> Any:
        return self.outputs.manifest

    def locate(self, input_ids: Tensor) -> Tensor:
        """The stored block (int64, on the CPU) holding each row of ``input_ids`` ``(B, L)``; a
        ValueError for rows that no stored block holds, naming how many and the folder."""
        blocks, found = self._find(input_ids)
        if not bool(found.all()):
            raise self._not_found(int((~found).sum()), len(found))
        return blocks

    def check_covers(self, input_ids: Tensor, chunk: int = 4096) -> None:
        """Every row of ``input_ids`` ``(N, L)`` (a run's training blocks) has a stored block of
        its hash, or a ValueError naming how many have none: a start-up check that opens no
        shard (each batch's rows are compared with the stored ids when they are looked up),
        ``chunk`` rows at a time (host memory for ``chunk`` rows, whatever ``N``)."""
        missing = 0
        for start in range(0, len(input_ids), chunk):
            hashes = block_hashes(self._checked_ids(input_ids[start : start + chunk]))
            position = torch.searchsorted(self._hashes, hashes).clamp_max(len(self._hashes) - 1)
            missing += int((self._hashes[position] != hashes).sum())
        if missing:
            raise self._not_found(missing, len(input_ids))

    def _find(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``(blocks, found)``: the candidate stored block of each row, and whether it holds it."""
        ids = self._checked_ids(input_ids)
        hashes = block_hashes(ids)
        first = torch.searchsorted(self._hashes, hashes)
        last = torch.searchsorted(self._hashes, hashes, right=True)  # stored blocks of the same hash: first..last-1
        position = first.clamp_max(len(self._hashes) - 1)
        blocks = self._order[position]
        found = (first < last) & (self.outputs.input_ids(blocks) == ids).all(-1)
        for row in (~found & (last - first > 1)).nonzero().flatten().tolist():  # a collision: the other candidates
            for candidate in self._order[first[row] + 1 : last[row]].tolist():
                if torch.equal(self.outputs.input_ids(candidate).long(), ids[row]):
                    blocks[row], found[row] = candidate, True
                    break
        return blocks, found

    def _checked_ids(self, input_ids: Tensor) -> Tensor:
        """``input_ids`` as int64 on the CPU, refused unless ``(N, block_length)``."""
        ids = input_ids.detach().to("cpu", torch.int64)
        if ids.dim() != 2 or ids.shape[1] != self.manifest.block_length:
            raise ValueError(
                f"teacher outputs {self.outputs.folder} hold blocks of {self.manifest.block_length} input ids; "
                f"got input ids of shape {tuple(ids.shape)}"
            )
        return ids

    def _not_found(self, missing: int, total: int) -> ValueError:
        return ValueError(
            f"{missing} of {total} input blocks are not among the teacher outputs in {self.outputs.folder} "
            "(written for another corpus or other data settings): write them for this run's data "
            "(dtokd teacher-outputs)"
        )

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        log_probs, indices = self.outputs.topk(self.locate(input_ids))
        device = input_ids.device
        return log_probs.to(device).float(), indices.to(device)


class WithTeacherTopk(Dataset):
    """``dataset`` (items: mappings, e.g. ``{"input_ids", "labels"}``), item ``i`` with the
    columns ``teacher_topk_log_probs`` and ``teacher_topk_indices`` (``(L, k)``) of block ``i``
    of ``outputs``: what :class:`~dtokd.integrations.transformers.DistillationTrainer` reads
    instead of running a teacher. The two must list the same blocks in the same order."""

    LOG_PROBS = "teacher_topk_log_probs"
    INDICES = "teacher_topk_indices"

    def __init__(self, dataset: Any, outputs: TeacherOutputs) -> None:
        if len(dataset) != len(outputs):
            raise ValueError(
                f"the dataset has {len(dataset)} blocks, the teacher outputs in {outputs.folder} {len(outputs)}"
            )
        self.dataset, self.outputs = dataset, outputs

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TypeError(f"WithTeacherTopk needs items that are mappings (columns), got {type(item).__name__}")
        log_probs, indices = self.outputs.topk(index)
        return {**item, self.LOG_PROBS: log_probs, self.INDICES: indices}
