"""The teacher of a run: loaded frozen from its weights, its outputs cached, and measured once
before training (the metrics a run records next to its own)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from dtokd.data import DataBundle, sources
from dtokd.data.offline_teacher import OfflineTeacher, vocabulary_identity
from dtokd.data.teacher_outputs import TeacherOutputs
from dtokd.data.teacher_outputs_writer import teacher_checksum
from dtokd.data.text import TokenBlocks
from dtokd.models import create_model
from dtokd.models.causal_lm import names_a_local_folder
from dtokd.models.foreign import Renormalize, WithInput, check_normalize, remap_keys
from dtokd.models.registry import apply_weights, read_weights
from dtokd.tasks import TASK_KINDS, ClassificationTask, Task, task_kind
from dtokd.train import checkpoint as ckpt
from dtokd.train import distributed
from dtokd.train.config import Config, selection_metric, to_dict
from dtokd.train.evaluation import prefixed
from dtokd.train.parts import Parts
from dtokd.train.sharding import full_state_dict
from dtokd.train.teacher_cache import CachedTeacher, cache_key


def load_teacher(config: Config, data: DataBundle) -> tuple[nn.Module | None, Renormalize | None]:
    """The frozen teacher in eval mode and, if it was trained with other input statistics
    than the student's data (``teacher.normalize``), the map to its own normalisation; a
    teacher given as offline outputs (``teacher.outputs``): :func:`load_offline_teacher`."""
    if not config.teacher.name:
        return None, None
    if config.teacher.outputs:
        return load_offline_teacher(config, data), None
    if not config.teacher.checkpoint and not names_a_local_folder(config.teacher.name):
        raise ValueError(
            "teacher.checkpoint is required: a teacher must be trained (dtokd train) or given as weights "
            "(or be a hf-causal-lm:<folder> whose folder holds its weights)"
        )
    state = None
    if config.teacher.checkpoint:  # else the folder's own weights
        path = Path(config.teacher.checkpoint)
        state, identity = read_weights(path)
        if identity and identity.get("num_classes") != data.num_classes:
            raise ValueError(
                f"teacher checkpoint {path} was trained for {identity.get('num_classes')} classes, "
                f"but data set {data.name!r} has {data.num_classes}"
            )
        if identity and identity.get("student") != config.teacher.name:
            raise ValueError(
                f"teacher checkpoint {path} holds a {identity.get('student')!r}, not the configured "
                f"teacher.name {config.teacher.name!r}"
            )
    teacher = create_model(
        config.teacher.name, data.num_classes, data.in_channels, data.image_size, config.teacher.kwargs
    )
    if state is not None:
        apply_weights(teacher, remap_keys(state, config.teacher.key_map, "teacher.key_map"), path, "teacher.key_map")
    teacher.eval()
    teacher.requires_grad_(False)
    own = check_normalize(config.teacher.normalize, "teacher.normalize")
    if own is not None and data.detection:
        raise ValueError(
            "teacher.normalize: a detector normalises its own input (its transform's image_mean and "
            "image_std, set in teacher.kwargs); the teacher's features are computed from the student's "
            "input mapped exactly to them"
        )
    if own is None:
        return teacher, None
    if len(own[0]) != data.in_channels:
        raise ValueError(f"teacher.normalize gives {len(own[0])} channel(s), but the data have {data.in_channels}")
    return teacher, Renormalize(data.normalization, own)


def load_offline_teacher(config: Config, data: DataBundle) -> OfflineTeacher:
    """The teacher as its top-k outputs in ``teacher.outputs``, refused (naming the field or the
    file) unless they fit the run: the teacher's name (``teacher.name``), the tokenizer (the
    corpus's vocabulary), the block length and the vocabulary size; with
    ``teacher.checkpoint``, the teacher's weights (built once on the
    CPU to be hashed, then dropped; leave the checkpoint out to skip that); every training block
    among the stored ones. The loss's temperature is the task's check."""
    if not isinstance(data.train, TokenBlocks):
        raise ValueError(f"teacher.outputs gives a language model's top-k outputs; data.name={data.name!r} is not text")
    expected: dict[str, Any] = {
        "teacher_name": config.teacher.name,
        "tokenizer": vocabulary_identity(data.classes),
        "block_length": data.image_size,
        "vocab_size": data.num_classes,
    }
    outputs = TeacherOutputs(str(config.teacher.outputs), **expected)
    if config.teacher.checkpoint:
        live, _ = load_teacher(replace(config, teacher=replace(config.teacher, outputs=None)), data)
        assert live is not None
        outputs.expect(teacher_hash=teacher_checksum(live))
        del live
    teacher = OfflineTeacher(outputs)
    teacher.check_covers(data.train.blocks[:, :-1])
    return teacher


def cache_teacher_outputs(
    config: Config, task: Task, teacher: nn.Module | None, device: torch.device, ranks: distributed.Ranks
) -> CachedTeacher:
    """``teacher.cache_outputs``: the task's teacher replaced by its cached outputs on the
    training batches (see :mod:`dtokd.train.teacher_cache`)."""
    if teacher is None:
        raise ValueError("teacher.cache_outputs=true needs a teacher (teacher.name)")
    if not task_kind(config.task).caches_teacher_outputs:
        served = [kind.name for kind in TASK_KINDS.values() if kind.caches_teacher_outputs]
        raise ValueError(f"teacher.cache_outputs=true is for {', '.join(served)}; task={config.task!r} is not cached")
    task = cast(ClassificationTask, task)  # the one kind that caches
    features = task.teacher_feature_losses
    if features:
        raise ValueError(
            f"teacher.cache_outputs=true caches the teacher's logits only, and losses {features} need "
            "its features; set teacher.cache_outputs=false"
        )
    settings = {
        "data": to_dict(config)["data"],
        "seed": config.seed,
        "batch_size": config.batch_size,
        "rank": ranks.rank,
        "world": ranks.world,
        "amp": config.amp,
        "channels_last": config.channels_last,
        "device": device.type,
        "teacher": config.teacher.name,
        "normalize": config.teacher.normalize,
        "student_normalize": config.student.normalize,
    }
    cached = CachedTeacher(teacher, sources.cache_dir() / "teacher-outputs", cache_key(teacher, settings))
    task.use_teacher(cached)
    return cached


def teacher_metrics(config: Config, folder: Path, p: Parts, *, verbose: bool) -> dict[str, Any] | None:
    """The teacher's metrics on the validation and test splits, measured before training as it
    sees its inputs in distillation, and kept in ``teacher.json`` with the SHA-256 of its weights
    (``weights``: which teacher this run learned from; a resumed run reads the file). The
    measurement is cached by content (the teacher's weights, its input mapping, the data
    settings and the seed that carves the validation split), so the cells of a matrix that share
    a teacher and data pay it once. None without a teacher; ``verbose``: a line with the figures."""
    if p.teacher is None:
        return None
    path = folder / "teacher.json"
    saved = p.ranks.from_main(json.loads(path.read_text()) if p.ranks.main and path.is_file() else None)
    if saved is not None:  # decided by the main process for all (a sharded teacher's measurement is collective)
        return saved
    if isinstance(p.teacher, OfflineTeacher):  # nothing to measure: no teacher model
        manifest = p.teacher.manifest
        offline = {
            "name": config.teacher.name,
            "checkpoint": config.teacher.checkpoint,
            "outputs": config.teacher.outputs,
        }
        offline.update(weights=manifest.teacher_hash, k=manifest.k, temperature=manifest.temperature)
        if p.ranks.main:
            path.write_text(json.dumps(offline, indent=2) + "\n")
        return offline
    weights = ckpt.checksum(full_state_dict(p.teacher))  # read once: a large teacher takes a while to hash
    model = WithInput(p.teacher, p.teacher_input) if p.teacher_input is not None else p.teacher
    cached = sources.cache_dir() / "teacher-eval" / f"{_teacher_key(config, weights, p.teacher_input)}.json"
    measured = p.ranks.from_main(json.loads(cached.read_text()) if p.ranks.main and cached.is_file() else None)
    if measured is None:
        measured = measure_teacher(config, p.task, model, p.data, p.device)
        if p.ranks.main:
            cached.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_text_atomic(cached, json.dumps(measured, indent=2) + "\n")
    result: dict[str, Any] = {
        "name": config.teacher.name,
        "checkpoint": config.teacher.checkpoint,
        "weights": weights,
        **measured,
    }
    if p.ranks.main:
        path.write_text(json.dumps(result, indent=2) + "\n")
        if verbose:
            m = selection_metric(config)
            print(
                f"[{config.name}] teacher {config.teacher.name}: val {m} {result.get(f'val_{m}', float('nan')):.2f} "
                f"test {m} {result[f'test_{m}']:.2f}",
                flush=True,
            )
    return result


def measure_teacher(
    config: Config, task: Task, model: nn.Module, data: DataBundle, device: torch.device
) -> dict[str, float]:
    """``model`` (the teacher as it sees its inputs) evaluated by ``task`` on the validation
    and test splits, as ``val_<metric>`` and ``test_<metric>``."""
    result: dict[str, float] = {}
    for split in ("val", "test"):
        result.update(
            prefixed(
                split,
                task.evaluate(
                    model, getattr(data, split), config.eval_batch_size, device, channels_last=config.channels_last
                ),
            )
        )
    return result


def _teacher_key(config: Config, weights: str, teacher_input: nn.Module | None) -> str:
    """What the teacher's measurement depends on: its weights and buffers (``weights``, their
    checksum: by content, wherever they were read from), its input mapping, the task, the data
    settings and content, and the seed."""
    root = Path(config.data.root) if config.data.root else None
    data_content = sources.content_key(root) if root is not None and root.exists() else None
    settings = {
        "task": config.task,
        "data": to_dict(config)["data"],
        "seed": config.seed,
        "teacher": config.teacher.name,
        "eval_batch_size": config.eval_batch_size,
        "channels_last": config.channels_last,
        "amp": config.amp,
        "parallel": config.parallel,
        "data_content": data_content,
        "weights": weights,
        "input": ckpt.checksum(teacher_input.state_dict()) if teacher_input is not None else None,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]
