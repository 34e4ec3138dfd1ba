"""``dtokd teacher-outputs``: a run's language-model teacher run once over its training blocks,
its top-k outputs written for ``teacher.outputs`` (:mod:`dtokd.data.teacher_outputs` gives the
format, :func:`dtokd.train.teacher.load_offline_teacher` how a run reads them)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dtokd.data.offline_teacher import vocabulary_identity
from dtokd.data.teacher_outputs import Manifest
from dtokd.data.teacher_outputs_writer import write_teacher_outputs
from dtokd.tasks import task_kind
from dtokd.train import distributed
from dtokd.train.build import data_of
from dtokd.train.config import Config
from dtokd.train.teacher import load_teacher


def offline_temperature(config: Config) -> float:
    """The one temperature of the config's losses of the teacher's output distribution (its
    token-KD losses: what offline outputs are written at)."""
    types = task_kind(config.task).loss_types
    temperatures = {
        float(spec.get("temperature", types[spec["type"]].defaults["temperature"]))
        for spec in config.losses.values()
        if spec.get("type") in types and types[spec["type"]].teacher_distribution
    }
    if len(temperatures) != 1:
        raise ValueError(
            "teacher outputs are written at the temperature of the config's token-kd loss; "
            + ("it has none" if not temperatures else f"its token-kd losses use several: {sorted(temperatures)}")
        )
    return temperatures.pop()


def write_run_teacher_outputs(
    config: Config,
    folder: Path,
    *,
    k: int,
    dtype: str,
    batch_size: int | None,
    overwrite: bool,
    progress: Callable[[int, int], None] | None = None,
) -> Manifest:
    """``dtokd teacher-outputs``: the configured teacher's top-``k`` outputs over the run's
    training blocks (its data settings, seed included), at the temperature of its token-KD loss,
    written to ``folder`` for ``teacher.outputs`` (:func:`dtokd.data.teacher_outputs_writer.write_teacher_outputs`;
    ``progress`` as there)."""
    if not task_kind(config.task).takes_teacher_outputs:
        raise ValueError(f"teacher outputs are a language model's; task={config.task!r} takes none")
    if config.teacher.outputs:
        raise ValueError(f"teacher.outputs={config.teacher.outputs!r}: give the teacher itself to write its outputs")
    temperature = offline_temperature(config)
    data = data_of(config)
    teacher, _ = load_teacher(config, data)
    if teacher is None or config.teacher.name is None:
        raise ValueError("dtokd teacher-outputs needs a teacher: set teacher.name (and teacher.checkpoint)")
    teacher.to(distributed.resolve_device(config.device))
    return write_teacher_outputs(
        teacher,
        data.train,
        folder,
        k=k,
        tokenizer=vocabulary_identity(data.classes),
        teacher_name=config.teacher.name,
        temperature=temperature,
        dtype=dtype,
        batch_size=batch_size or config.eval_batch_size,
        overwrite=overwrite,
        progress=progress,
    )
