"""Offline top-k teacher outputs for causal language models: the teacher runs once over a corpus
of token blocks, and its ``k`` most likely next tokens at every position are written to disk
(:mod:`dtokd.data.teacher_outputs_writer`), so that distillation needs no teacher in memory
(:func:`dtokd.losses.token_kd_loss`'s ``teacher_topk=``). This module holds the format and the
reader.

**The format** (``FORMAT``), one folder:

- ``manifest.json``, written last (a folder without it is an unfinished write): ``format``,
  ``teacher_name`` (what the writer called the teacher: the pipeline's ``teacher.name``),
  ``teacher_hash`` (:func:`~dtokd.data.teacher_outputs_writer.teacher_checksum`:
  :func:`dtokd.models.weight_file.checksum` of the teacher's state dict), ``tokenizer`` (the
  caller's identity string, e.g. the tokenizer file's SHA-256), ``corpus_digest``
  (:func:`~dtokd.data.teacher_outputs_writer.corpus_digest`: SHA-256 of the blocks' input ids, in
  order), ``block_length`` (``L``: positions per block, the teacher's input length),
  ``num_blocks``, ``vocab_size``, ``k``, ``temperature``, ``dtype`` (of the log-probabilities:
  ``float16``, the default, ``bfloat16`` or ``float32``) and ``shards``: for each, its ``file``,
  the blocks it holds (``start`` to ``stop``, exclusive, consecutive from 0), its ``bytes`` and
  its ``sha256``; ``index``: the same for ``blocks.pt``.
- ``blocks.pt``: ``{"hashes": (N,) int64}``, each block's content hash
  (:func:`dtokd.data.block_hash.block_hashes` of its input ids), in block order: what a reader
  needs to find blocks by content without opening a shard.
- ``shard-00000.pt``, ...: a ``torch.save`` of ``{"log_probs": (n, L, k) dtype, "indices":
  (n, L, k) int32, "input_ids": (n, L) int32}`` for its ``n`` blocks, read back with
  ``weights_only=True`` (tensors only: nothing in a file runs) and memory-mapped. Position ``i``
  of block ``b`` holds the teacher's ``log_softmax(z / T)`` at that position's logits ``z`` (the
  prediction of token ``i + 1``), its ``k`` largest, in decreasing order, rounded to ``dtype``,
  and their token ids; ``input_ids`` are the block's inputs, so that a reader can find a block
  by its content (:class:`~dtokd.data.offline_teacher.OfflineTeacher`).

**Bytes per token**: ``k * (2 + 4) + 4`` (half-precision log-probability and int32 index per
listed token, the int32 input id; ``k * 8 + 4`` in float32), plus 8 bytes per block in the index
and about 2 KB of container per shard: 196 bytes at ``k = 32``, against ``2 V`` for a
half-precision row of full logits (256 KB at a vocabulary of 128K).

**The tail** needs nothing stored: the mass outside the top-k, ``1 - sum(exp(log_probs))``, is
derived by ``token_kd_loss``, which clamps it at the smallest positive float when the rounding
of the stored log-probabilities (at most half a unit in the last place upwards each) makes their
mass reach or pass 1, so it is never negative or NaN. With ``k`` = the vocabulary there is no
tail and the listed probabilities are renormalised.

**The contract.** :func:`~dtokd.data.teacher_outputs_writer.write_teacher_outputs` refuses a non-empty folder unless
``overwrite=True`` (results are never overwritten unasked). :class:`TeacherOutputs` refuses a
manifest that does not match what the run expects (one line naming the field and both values),
and verifies each shard's SHA-256 when it first opens it (a truncated or corrupt shard is refused,
named); ``topk(blocks)`` returns ``(log_probs (..., L, k), indices (..., L, k) int64)`` aligned
with those blocks' positions, ``input_ids(blocks)`` their inputs. For
:class:`~dtokd.data.text.TokenBlocks` a block's input is ``block[:-1]``:
``token_kd_loss(student(x).logits, labels=y, teacher_topk=outputs.topk(i))`` for the batch
``x, y`` of block indices ``i``; for a Hugging Face batch whose labels are its input ids, shift
both as the model's loss does (``[:, :-1]``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

FORMAT = "dtokd-teacher-topk-v3"
"""v2 added each block's ``input_ids`` to its shard, v3 the block index and the teacher's name
(older folders are refused by name: write them again)."""
INDEX = "blocks.pt"
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_SHARD_BYTES = 16 * 2**20
CHECKED_FIELDS = (
    "teacher_name",
    "teacher_hash",
    "tokenizer",
    "corpus_digest",
    "block_length",
    "vocab_size",
    "k",
    "temperature",
    "dtype",
)
"""The manifest fields a reader can be told to expect."""


@dataclass(frozen=True)
class Shard:
    file: str
    start: int
    stop: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    format: str
    teacher_name: str
    teacher_hash: str
    tokenizer: str
    corpus_digest: str
    block_length: int
    num_blocks: int
    vocab_size: int
    k: int
    temperature: float
    dtype: str
    shards: tuple[Shard, ...]
    index: Shard

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, path: Path) -> "Manifest":
        """The manifest in ``text`` (read from ``path``, named in errors), its structure checked."""
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT:
                raise _FormatError(raw.get("format"))
            shards = tuple(Shard(**shard) for shard in raw.pop("shards"))
            manifest = cls(**{**raw, "shards": shards, "index": Shard(**raw["index"])})
        except _FormatError as error:
            raise ValueError(
                f"{path}: field 'format' is {error.args[0]!r}, this dtokd reads {FORMAT!r} (write the outputs again)"
            ) from None
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"{path} is not a teacher-outputs manifest ({type(error).__name__}: {error})") from None
        if manifest.dtype not in DTYPES:
            raise ValueError(f"{path}: field 'dtype' is {manifest.dtype!r}, not one of {sorted(DTYPES)}")
        expected_start = 0
        for shard in manifest.shards:
            if shard.start != expected_start or shard.stop <= shard.start or Path(shard.file).name != shard.file:
                raise ValueError(f"{path}: shard {shard.file!r} (blocks {shard.start}-{shard.stop}) is out of order")
            expected_start = shard.stop
        if expected_start != manifest.num_blocks:
            raise ValueError(f"{path}: the shards hold {expected_start} blocks, 'num_blocks' is {manifest.num_blocks}")
        index = manifest.index
        if index.file != INDEX or (index.start, index.stop) != (0, manifest.num_blocks):
            raise ValueError(f"{path}: field 'index' is not {INDEX} over blocks 0-{manifest.num_blocks}")
        return manifest


class _FormatError(Exception):
    """A manifest of another format (its ``format`` field)."""


def dtype_name(dtype: torch.dtype | str) -> str:
    """The name in :data:`DTYPES` of ``dtype`` (a name or a torch dtype), or a ValueError."""
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ValueError(f"dtype={dtype!r} is not allowed for teacher outputs; use one of {sorted(DTYPES)}")


# ---------------------------------------------------------------------------------------------- reader


class TeacherOutputs:
    """The teacher outputs in ``folder``, checked against what the run expects: each keyword
    given (``teacher_name``, ``teacher_hash``, ``tokenizer``, ``corpus_digest``, ``block_length``, ``vocab_size``,
    ``k``, ``temperature``, ``dtype``) must equal the manifest's field, or the folder is refused
    naming the field and both values. Shards are opened (their SHA-256 verified, then
    memory-mapped) when first read; :meth:`verify` opens them all."""

    def __init__(self, folder: str | Path, **expected: Any) -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: no teacher outputs there, or their write did not finish")
        self.manifest = Manifest.from_json(path.read_text(), path)
        self.expect(**expected)
        self._starts = torch.tensor([shard.start for shard in self.manifest.shards], dtype=torch.int64)
        self._open: dict[int, dict[str, Tensor]] = {}

    def expect(self, **expected: Any) -> None:
        """Each keyword's value equals the manifest's field, or a ValueError naming it (see the class)."""
        _check_expected(self.manifest, expected, self.folder / MANIFEST)

    def __len__(self) -> int:
        return self.manifest.num_blocks

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (to a data-loader worker) without its open shards: the worker opens them again."""
        return {**self.__dict__, "_open": {}}

    def topk(self, blocks: int | Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """``(log_probs, indices)`` of the given blocks: ``(..., L, k)`` in the stored dtype and
        int64, on the CPU, for ``blocks`` of shape ``(...)``."""
        log_probs, indices = self._gather(blocks, "log_probs", "indices")
        return log_probs, indices.long()

    def input_ids(self, blocks: int | Sequence[int] | Tensor) -> Tensor:
        """The input ids ``(..., L)`` (int32, on the CPU) of the given blocks."""
        return self._gather(blocks, "input_ids")[0]

    def _gather(self, blocks: int | Sequence[int] | Tensor, *keys: str) -> list[Tensor]:
        """Each of the shards' tensors ``keys`` at the given blocks, shaped ``(*blocks.shape, ...)``."""
        index = torch.as_tensor(blocks, dtype=torch.int64)
        flat = index.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= len(self)):
            raise IndexError(f"block indices must lie in [0, {len(self)}): {self.folder} holds {len(self)} blocks")
        layout = block_layout(self.manifest)
        gathered = [torch.empty((flat.numel(), *layout[key][1]), dtype=layout[key][0]) for key in keys]
        shard_of = torch.bucketize(flat, self._starts, right=True) - 1
        for number in shard_of.unique().tolist():
            rows = (shard_of == number).nonzero().squeeze(1)
            tensors = self._shard(number)
            local = flat[rows] - self.manifest.shards[number].start
            for out, key in zip(gathered, keys):
                out[rows] = tensors[key][local]
        return [out.reshape(*index.shape, *out.shape[1:]) for out in gathered]

    def block_hashes(self) -> Tensor:
        """Each block's content hash ``(N,)`` int64, in block order (the index file, its SHA-256
        verified; no shard is opened)."""
        return _open_file(self.folder, self.manifest.index, {"hashes": (torch.int64, (len(self),))})["hashes"]

    def verify(self) -> None:
        """Open (and so verify) the index and every shard."""
        self.block_hashes()
        for number in range(len(self.manifest.shards)):
            self._shard(number)

    def _shard(self, number: int) -> dict[str, Tensor]:
        if number not in self._open:
            self._open[number] = _open_shard(self.folder, self.manifest, self.manifest.shards[number])
        return self._open[number]


def _check_expected(manifest: Manifest, expected: Mapping[str, Any], path: Path) -> None:
    unknown = sorted(set(expected) - set(CHECKED_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown expected field(s) {unknown}; the manifest's checked fields are {list(CHECKED_FIELDS)}"
        )
    for field, value in expected.items():
        if value is None:
            continue
        if field == "dtype":
            value = dtype_name(value)
        if field == "temperature":
            value = float(value)
        actual = getattr(manifest, field)
        if actual != value:
            raise ValueError(
                f"teacher outputs {path.parent} do not match this run: field {field!r} is {actual!r} "
                f"there, the run expects {value!r}{_MISMATCH_HINTS.get(field, '')}"
            )


_MISMATCH_HINTS = {
    "tokenizer": (
        " (the tokenizer is trained from the run's data.text settings: a different vocab_size, split_seed, "
        "tokenizer or corpus gives another vocabulary; write the outputs with the run's settings)"
    ),
}
"""What a mismatch of a field whose values are hashes usually means."""


def block_layout(manifest: Manifest) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Each shard tensor's dtype and shape per block (a shard of ``n`` blocks holds ``(n, *shape)``)."""
    length, k = manifest.block_length, manifest.k
    return {
        "log_probs": (DTYPES[manifest.dtype], (length, k)),
        "indices": (torch.int32, (length, k)),
        "input_ids": (torch.int32, (length,)),
    }


def _open_shard(folder: Path, manifest: Manifest, shard: Shard) -> dict[str, Tensor]:
    """The shard's tensors, memory-mapped, after its SHA-256 and shapes are verified."""
    blocks = shard.stop - shard.start
    layout = block_layout(manifest)
    return _open_file(folder, shard, {key: (dtype, (blocks, *shape)) for key, (dtype, shape) in layout.items()})


def _open_file(
    folder: Path, entry: Shard, expected: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
) -> dict[str, Tensor]:
    """The tensors of the manifest's file ``entry``, memory-mapped, after its size, SHA-256 and
    the ``expected`` dtypes and shapes (by key) are verified."""
    path = folder / entry.file
    if not path.is_file():
        raise FileNotFoundError(f"teacher-output file {path} is missing")
    size, sha = _file_sha256(path)
    if size != entry.bytes or sha != entry.sha256:
        raise ValueError(
            f"teacher-output file {path} is truncated or corrupt: {size} bytes, SHA-256 {sha[:16]}..., "
            f"the manifest wrote {entry.bytes} bytes, {entry.sha256[:16]}... (write the outputs again)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or set(state) != set(expected):
        raise ValueError(f"teacher-output file {path} does not hold {sorted(expected)}")
    for key, (dtype, shape) in expected.items():
        if state[key].dtype != dtype or tuple(state[key].shape) != shape:
            raise ValueError(
                f"teacher-output file {path}: {key} is {state[key].dtype} {tuple(state[key].shape)}, "
                f"the manifest says {dtype} {shape}"
            )
    return state


def _file_sha256(path: Path) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
