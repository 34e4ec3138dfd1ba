"""Offline top-k teacher outputs for causal language models: the teacher runs once over a corpus
of token blocks, and its ``k`` most likely next tokens at every position are written to disk, so
that distillation needs no teacher in memory (:func:`dtokd.losses.token_kd_loss`'s
``teacher_topk=``).

**The format** (``FORMAT``), one folder:

- ``manifest.json``, written last (a folder without it is an unfinished write): ``format``,
  ``teacher_name`` (what the writer called the teacher: the pipeline's ``teacher.name``),
  ``teacher_hash`` (:func:`teacher_checksum`: :func:`dtokd.models.weight_file.checksum` of the
  teacher's state dict), ``tokenizer`` (the caller's identity string, e.g. the tokenizer file's
  SHA-256), ``corpus_digest`` (:func:`corpus_digest`: SHA-256 of the blocks' input ids, in
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
listed token, the int32 input id; ``k * 8 + 4`` in float32), plus about 2 KB of container per
shard: 196 bytes at ``k = 32``, against ``2 V`` for a half-precision row of full logits (256 KB
at a vocabulary of 128K).

**The tail** needs nothing stored: the mass outside the top-k, ``1 - sum(exp(log_probs))``, is
derived by ``token_kd_loss``, which clamps it at the smallest positive float when the rounding
of the stored log-probabilities (at most half a unit in the last place upwards each) makes their
mass reach or pass 1, so it is never negative or NaN. With ``k`` = the vocabulary there is no
tail and the listed probabilities are renormalised.

**The contract.** :func:`write_teacher_outputs` refuses a non-empty folder unless
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
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtokd.data.block_hash import block_hashes
from dtokd.data.text import TokenBlocks
from dtokd.models.norms import eval_mode
from dtokd.models.weight_file import checksum

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


# ----------------------------------------------------------------------------------------- identities


def teacher_checksum(teacher: nn.Module) -> str:
    """The teacher's identity in a manifest: the SHA-256 of its state dict (tensors' bytes, dtypes,
    shapes, in order; :func:`dtokd.models.weight_file.checksum`). A teacher in another dtype is
    another teacher: its outputs differ."""
    return checksum(teacher.state_dict())


def corpus_digest(blocks: Any, batch_size: int = 1024) -> str:
    """SHA-256 of the blocks' input ids (as int64, in order, after their count and length):
    the same for a :class:`~dtokd.data.text.TokenBlocks` and the tensor of its inputs."""
    digest = _CorpusDigest(len(blocks), _block_length(blocks))
    for start in range(0, len(blocks), batch_size):
        digest.update(_input_ids(blocks, range(start, min(start + batch_size, len(blocks)))))
    return digest.hexdigest()


class _CorpusDigest:
    def __init__(self, count: int, length: int) -> None:
        self._hash = hashlib.sha256(f"{FORMAT}:corpus:{count}x{length}".encode())

    def update(self, ids: Tensor) -> None:
        self._hash.update(ids.to(torch.int64).contiguous().numpy().tobytes())

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _input_ids(blocks: Any, indices: Sequence[int]) -> Tensor:
    """The input ids ``(len(indices), L)`` (int64, on the CPU) of the given blocks: rows of a
    tensor; ``block[:-1]`` of :class:`TokenBlocks`; else each item's ids (a tensor, the first of
    a tuple, or a mapping's ``input_ids``)."""
    if isinstance(blocks, TokenBlocks):
        return blocks.blocks[list(indices), :-1].to("cpu", torch.int64)
    if isinstance(blocks, Tensor):
        return blocks[list(indices)].to("cpu", torch.int64)
    rows = []
    for index in indices:
        item = blocks[index]
        if isinstance(item, (tuple, list)):
            item = item[0]
        elif isinstance(item, Mapping):
            item = item["input_ids"]
        rows.append(torch.as_tensor(item, dtype=torch.int64))
    return torch.stack(rows).cpu()


def _block_length(blocks: Any) -> int:
    if len(blocks) == 0:
        raise ValueError("the corpus has no blocks")
    ids = _input_ids(blocks, [0])
    if ids.dim() != 2:
        raise ValueError(f"a block's input ids must be one sequence of token ids, got shape {tuple(ids.shape[1:])}")
    return int(ids.shape[1])


# ---------------------------------------------------------------------------------------------- writer


def _check_write_settings(k: int, temperature: float, tokenizer: str, teacher_name: str) -> None:
    """``k`` a positive integer, ``temperature`` a positive number, ``tokenizer`` and
    ``teacher_name`` non-empty strings."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a positive number")
    if not isinstance(tokenizer, str) or not tokenizer:
        raise ValueError("tokenizer must be a non-empty string identifying the tokenizer (e.g. its file's SHA-256)")
    if not isinstance(teacher_name, str) or not teacher_name:
        raise ValueError("teacher_name must be a non-empty string naming the teacher (e.g. its model name)")


def write_teacher_outputs(
    teacher: nn.Module,
    blocks: Any,
    folder: str | Path,
    *,
    k: int,
    tokenizer: str,
    teacher_name: str,
    temperature: float = 1.0,
    dtype: torch.dtype | str = torch.float16,
    batch_size: int = 8,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    teacher_hash: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Run ``teacher`` once over ``blocks`` and write its top-``k`` log-probabilities at
    ``temperature`` into ``folder`` (the module notes give the format).

    ``teacher``: a Hugging Face causal LM or any module mapping input ids ``(B, L)`` to logits
    ``(B, L, V)`` (or an output with ``logits``), run in eval mode under ``torch.no_grad()`` on
    its parameters' device, ``batch_size`` blocks at a time. ``blocks``: a
    :class:`~dtokd.data.text.TokenBlocks`, an integer tensor ``(N, L)`` or an indexable of
    blocks (see :func:`corpus_digest`), all of one length. ``tokenizer``: the tokenizer's
    identity, and ``teacher_name``, what the teacher is called (a model name, a folder), recorded
    for readers to check. ``teacher_hash``: its :func:`teacher_checksum` if already known
    (computed otherwise). ``shard_bytes``: about how large a shard is.
    """
    dtype_name = _dtype_name(dtype)
    _check_write_settings(k, temperature, tokenizer, teacher_name)
    folder = Path(folder)
    _prepare_folder(folder, overwrite)
    length = _block_length(blocks)
    per_token = k * (DTYPES[dtype_name].itemsize + 4) + 4
    per_shard = max(1, shard_bytes // (length * per_token))
    digest = _CorpusDigest(len(blocks), length)
    shards, hashes, vocab_size = [], [], 0
    with eval_mode(teacher), torch.no_grad():
        for number, start in enumerate(range(0, len(blocks), per_shard)):
            stop = min(start + per_shard, len(blocks))
            tensors, vocab_size = _shard_outputs(
                teacher, blocks, range(start, stop), k, float(temperature), DTYPES[dtype_name], batch_size, digest
            )
            shards.append(_save_file(folder, f"shard-{number:05d}.pt", start, stop, tensors))
            hashes.append(block_hashes(tensors["input_ids"]))
    manifest = Manifest(
        format=FORMAT,
        teacher_name=teacher_name,
        teacher_hash=teacher_hash or teacher_checksum(teacher),
        tokenizer=tokenizer,
        corpus_digest=digest.hexdigest(),
        block_length=length,
        num_blocks=len(blocks),
        vocab_size=vocab_size,
        k=k,
        temperature=float(temperature),
        dtype=dtype_name,
        shards=tuple(shards),
        index=_save_file(folder, INDEX, 0, len(blocks), {"hashes": torch.cat(hashes)}),
    )
    temporary = folder / f"{MANIFEST}.tmp"
    temporary.write_text(manifest.to_json())
    temporary.replace(folder / MANIFEST)
    return manifest


def _shard_outputs(
    teacher: nn.Module,
    blocks: Any,
    block_range: range,
    k: int,
    temperature: float,
    dtype: torch.dtype,
    batch_size: int,
    digest: _CorpusDigest,
) -> tuple[dict[str, Tensor], int]:
    """The shard's tensors (``SHARD_TENSORS``) of the blocks in ``block_range``, ``batch_size``
    at a time, and the vocabulary."""
    parameter = next(teacher.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    values, indices, inputs, vocab_size = [], [], [], 0
    for start in range(block_range.start, block_range.stop, batch_size):
        ids = _input_ids(blocks, range(start, min(start + batch_size, block_range.stop)))
        digest.update(ids)
        logits = _logits(teacher(ids.to(device)))
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(f"the teacher returned logits {tuple(logits.shape)} for input ids {tuple(ids.shape)}")
        vocab_size = int(logits.shape[-1])
        if k > vocab_size:
            raise ValueError(f"k={k} exceeds the teacher's vocabulary ({vocab_size})")
        top = top_log_probs(logits, k, temperature)
        values.append(top.values.to("cpu", dtype))
        indices.append(top.indices.to("cpu", torch.int32))
        inputs.append(ids.to(torch.int32))
    return {"log_probs": torch.cat(values), "indices": torch.cat(indices), "input_ids": torch.cat(inputs)}, vocab_size


def top_log_probs(logits: Tensor, k: int, temperature: float) -> Any:
    """``(values, indices)`` of the ``k`` largest of ``log_softmax(logits / T)``, in decreasing
    order, computed in float32 (float64 for float64 logits)."""
    compute = torch.promote_types(logits.dtype, torch.float32)
    return F.log_softmax(logits.to(compute) / temperature, dim=-1).topk(k, dim=-1)


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = output["logits"] if isinstance(output, Mapping) else getattr(output, "logits", None)
    if not isinstance(logits, Tensor):
        raise ValueError(f"the teacher's output {type(output).__name__} has no 'logits'")
    return logits


def _save_file(folder: Path, name: str, start: int, stop: int, tensors: Mapping[str, Tensor]) -> Shard:
    """``tensors`` saved as ``folder / name`` (blocks ``start`` to ``stop``), with its size and SHA-256."""
    buffer = io.BytesIO()
    torch.save({key: tensor.contiguous() for key, tensor in tensors.items()}, buffer)
    content = buffer.getvalue()
    (folder / name).write_bytes(content)
    return Shard(name, start, stop, len(content), hashlib.sha256(content).hexdigest())


def _prepare_folder(folder: Path, overwrite: bool) -> None:
    """An empty (or new) folder; with ``overwrite``, an earlier write's manifest (first: the
    folder is then an unfinished write, never a finished one), index and shards are removed,
    nothing else."""
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file, not a folder for teacher outputs")
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{folder} is not empty: teacher outputs are never written over unasked "
                "(give another folder, or overwrite=True)"
            )
        (folder / MANIFEST).unlink(missing_ok=True)
        (folder / INDEX).unlink(missing_ok=True)
        for shard in folder.glob("shard-*.pt"):
            shard.unlink()
    folder.mkdir(parents=True, exist_ok=True)


def _dtype_name(dtype: torch.dtype | str) -> str:
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ValueError(f"dtype={dtype!r} is not allowed for teacher outputs; use one of {sorted(DTYPES)}")


# ---------------------------------------------------------------------------------------------- reader


class TeacherOutputs:
    """The teacher outputs in ``folder``, checked against what the run expects: each keyword
    given (``teacher_hash``, ``tokenizer``, ``corpus_digest``, ``block_length``, ``vocab_size``,
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
        first = self._shard(0)
        gathered = [first[key].new_empty((flat.numel(), *first[key].shape[1:])) for key in keys]
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
            value = _dtype_name(value)
        if field == "temperature":
            value = float(value)
        actual = getattr(manifest, field)
        if actual != value:
            raise ValueError(
                f"teacher outputs {path.parent} do not match this run: field {field!r} is {actual!r} "
                f"there, the run expects {value!r}"
            )


def _open_shard(folder: Path, manifest: Manifest, shard: Shard) -> dict[str, Tensor]:
    """The shard's tensors, memory-mapped, after its SHA-256 and shapes are verified."""
    blocks, length, k = shard.stop - shard.start, manifest.block_length, manifest.k
    return _open_file(
        folder,
        shard,
        {
            "log_probs": (DTYPES[manifest.dtype], (blocks, length, k)),
            "indices": (torch.int32, (blocks, length, k)),
            "input_ids": (torch.int32, (blocks, length)),
        },
    )


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
