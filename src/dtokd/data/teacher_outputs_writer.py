"""Writing offline teacher outputs (:mod:`dtokd.data.teacher_outputs` gives the format and the
reader): the teacher run once over a corpus of token blocks, its top-``k`` log-probabilities at
every position written in shards with the block index and the manifest, and the identities a
manifest records (the teacher's weights, the corpus)."""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtokd.data.block_hash import block_hashes
from dtokd.data.teacher_outputs import (
    DEFAULT_SHARD_BYTES,
    DTYPES,
    FORMAT,
    INDEX,
    MANIFEST,
    Manifest,
    Shard,
    dtype_name,
)
from dtokd.data.text import TokenBlocks
from dtokd.models.norms import eval_mode
from dtokd.models.weight_file import checksum

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
    progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """Run ``teacher`` once over ``blocks`` and write its top-``k`` log-probabilities at
    ``temperature`` into ``folder`` (the module notes give the format).

    ``teacher``: a Hugging Face causal LM or any module mapping input ids ``(B, L)`` to logits
    ``(B, L, V)`` (or an output with ``logits``), run in eval mode under ``torch.no_grad()`` on
    its parameters' device, ``batch_size`` blocks at a time. ``blocks``: a
    :class:`~dtokd.data.text.TokenBlocks`, an integer tensor ``(N, L)`` or an indexable of
    blocks (see :func:`corpus_digest`), all of one length. ``tokenizer``: the tokenizer's
    identity, and ``teacher_name`` (a model name, a folder), recorded for readers to check.
    ``teacher_hash``: its :func:`teacher_checksum` if known. ``shard_bytes``: a shard's size, about.
    ``progress``: called with (blocks written, blocks) after each shard."""
    stored = DTYPES[dtype_name(dtype)]
    _check_write_settings(k, temperature, tokenizer, teacher_name)
    folder = Path(folder)
    _prepare_folder(folder, overwrite)
    length = _block_length(blocks)
    per_token = k * (stored.itemsize + 4) + 4
    per_shard = max(1, shard_bytes // (length * per_token))
    digest = _CorpusDigest(len(blocks), length)
    with eval_mode(teacher), torch.no_grad():
        shards, hashes, vocab_size = _write_shards(
            teacher, blocks, folder, per_shard, (k, float(temperature), stored, batch_size), digest, progress
        )
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
        dtype=dtype_name(stored),
        shards=tuple(shards),
        index=_save_file(folder, INDEX, 0, len(blocks), {"hashes": torch.cat(hashes)}),
    )
    (folder / f"{MANIFEST}.tmp").write_text(manifest.to_json())
    (folder / f"{MANIFEST}.tmp").replace(folder / MANIFEST)
    return manifest


def _write_shards(
    teacher: nn.Module,
    blocks: Any,
    folder: Path,
    per_shard: int,
    settings: tuple[int, float, torch.dtype, int],
    digest: _CorpusDigest,
    progress: Callable[[int, int], None] | None,
) -> tuple[list[Shard], list[Tensor], int]:
    """Every shard's file (``per_shard`` blocks each) with its record, its blocks' content
    hashes, and the vocabulary; ``settings``: k, the temperature, the stored dtype, the batch size."""
    shards, hashes, vocab_size = [], [], 0
    for number, start in enumerate(range(0, len(blocks), per_shard)):
        stop = min(start + per_shard, len(blocks))
        tensors, vocab_size = _shard_outputs(teacher, blocks, range(start, stop), *settings, digest)
        shards.append(_save_file(folder, f"shard-{number:05d}.pt", start, stop, tensors))
        hashes.append(block_hashes(tensors["input_ids"]))
        if progress is not None:
            progress(stop, len(blocks))
    return shards, hashes, vocab_size


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
