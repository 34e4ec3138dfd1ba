"""Run configuration: plain dataclasses, read from YAML, overridden with ``key.sub=value``.

Unknown keys and ill-typed values are errors that list what is allowed. ``to_dict`` gives the
resolved configuration that every run folder keeps.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dtokd.data.names import DataName, DetectionLabels, Placement
from dtokd.tasks.names import SELECTION_METRICS, TaskName
from dtokd.train import config_file
from dtokd.train.config_file import ConfigError, apply_override, from_dict

OptimName = Literal["sgd", "adamw"]
Schedule = Literal["cosine", "step", "constant"]
EvalTest = Literal["every", "end"]
Amp = Literal["none", "bf16", "fp16"]
CompileMode = Literal["none", "default", "reduce-overhead", "max-autotune"]
Parallelism = Literal["ddp", "fsdp"]


@dataclass
class DataConfig:
    """``limit_train``: train on N examples of the training split only (images, or token blocks
    for a language model: the first N in the order the run's ``seed`` shuffles them; None: all
    of it), for quick runs and CPU-sized matrices.
    ``placement``: where the in-memory images live during training: ``device`` (moved to
    the accelerator once; batches gathered and augmented there), ``host`` (batches built on
    the CPU, copied from pinned memory), ``auto`` (``device`` when they take at most a quarter
    of the accelerator's memory, else ``host``; the CPU when training on the CPU).
    ``mixup``: mixup/cutmix on each training batch through ``timm.data.Mixup`` (its keyword
    arguments, e.g. ``{mixup_alpha: 0.8, cutmix_alpha: 1.0, label_smoothing: 0.1}``: DeiT's);
    the losses then get soft targets and the teacher sees the mixed images. For
    ``image-folder-stream`` (files decoded per batch, see :mod:`dtokd.data.streaming`):
    ``transform`` (timm ``create_transform`` options), ``workers`` (loader processes; default
    up to 8), ``repeated_augmentation`` (DeiT's repeated augmentation, 3 in its recipe).
    ``synthetic``: the options of the generated ``synthetic-coco`` detection set
    (``train_images``, ``val_images``, ``classes``, ``max_objects``, ``size_jitter``, ``seed``;
    see :func:`dtokd.data.synthetic_coco.write_synthetic_coco`); its images are ``image_size``.
    ``labels`` (detection): ``contiguous`` (category ids in order -> 1..K) or ``category-id``
    (the id is the label: for torchvision's released COCO detectors, 91 outputs).
    ``text`` (``name: text``): the options of the language-model data (``block_size``,
    ``tokenizer``, ``vocab_size``, ``eos``, ``test_fraction``, ``split_seed``, ``extensions``,
    ``field``; see :mod:`dtokd.data.text`)."""

    name: DataName = "fashion-mnist"
    root: str | None = None
    val_fraction: float = 0.1
    image_size: int = 32
    augment: bool = True
    limit_train: int | None = None
    placement: Placement = "auto"
    mixup: dict[str, Any] | None = None
    transform: dict[str, Any] | None = None
    workers: int | None = None
    repeated_augmentation: int = 1
    synthetic: dict[str, Any] | None = None
    labels: DetectionLabels = "contiguous"
    text: dict[str, Any] | None = None


@dataclass
class ModelConfig:
    """``weights``: a local state dict (or dtokd checkpoint) to start from; ``key_map``: how its
    parameter names map to this model's (a preset or ``[[pattern, replacement], ...]``, see
    :mod:`dtokd.models.foreign`); ``normalize``: ``{mean: [...], std: [...]}`` the model expects
    (for the student: the data's normalisation; default: the training split's statistics);
    ``kwargs``: keyword arguments for a ``timm:`` or ``torchvision:`` model's constructor (e.g.
    ``{img_size: 32, patch_size: 4, drop_path_rate: 0.1}``)."""

    name: str = "mlp"
    weights: str | None = None
    key_map: str | list[list[str]] | None = None
    normalize: dict[str, list[float]] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    """``checkpoint``: a dtokd run's ``best.pt`` or a state dict from elsewhere (with ``key_map``);
    ``normalize``: the input statistics the teacher was trained with (default: the student's).
    ``cache_outputs``: keep the teacher's logits on the training batches on disk and reuse them
    in every run with the same teacher, data and seed (bit-identical to a fresh forward pass; see
    :mod:`dtokd.train.teacher_cache`). ``outputs``: a language-model teacher given as its offline
    top-k outputs (a folder ``dtokd teacher-outputs`` wrote): the teacher is not built, its
    ``name`` is the record's, and with ``checkpoint`` set the outputs must come from those weights
    (:func:`dtokd.train.teacher.load_offline_teacher`)."""

    name: str | None = None
    checkpoint: str | None = None
    key_map: str | list[list[str]] | None = None
    normalize: dict[str, list[float]] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    cache_outputs: bool = False
    outputs: str | None = None


@dataclass
class OptimConfig:
    name: OptimName = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: Schedule = "cosine"
    warmup_epochs: int = 0
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    grad_clip: float | None = None
    lr_batch_scale: int | None = None
    no_decay_1d: bool = False
    ema_decay: float | None = None


@dataclass
class BalancerConfig:
    """``representation``: where the representation engine takes the gradients: ``outputs``
    (the student's logits, or both heads) or a student submodule's output (e.g. ``norm``)."""

    method: str = "fixed"
    engine: str = "exact"
    gram_params: str | None = None
    representation: str = "outputs"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """When the student is evaluated. ``every``: the validation split every N epochs (and always
    after the last one); the checkpoint kept as ``best.pt`` is chosen among those epochs.
    ``test``: ``every`` (the test split whenever validation runs) or ``end`` (once, after the
    last epoch, on ``best.pt`` and on the last model: the two test figures a run reports; no
    per-epoch test curve, no best-of-test figure). ``select``: the validation metric that chooses
    ``best.pt`` and that summaries and benches report first (see :data:`SELECTION_METRICS`; null:
    the task's default, ``top1`` or ``AP``); ``ppl`` and ``loss`` choose their lowest epoch."""

    every: int = 1
    test: EvalTest = "every"
    select: str | None = None


@dataclass
class Config:
    """Everything a run needs. ``losses`` maps a loss name to its spec (``type`` + options).

    ``device``: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    ``compile``: ``none``, or a ``torch.compile`` mode for the student (``default``,
    ``reduce-overhead`` = CUDA graphs, ``max-autotune``); ``channels_last``: student, teacher
    and images in channels-last memory format (faster convolutions on tensor cores).
    ``task``: ``classification``, ``detection`` or ``causal-lm`` (see :mod:`dtokd.tasks`).
    ``parallel``: how ``torchrun`` processes share the models: ``ddp`` (each holds both whole,
    gradients all-reduced) or ``fsdp`` (FSDP2: student and teacher sharded block by block; see
    :mod:`dtokd.train.sharding`).
    """

    name: str = "run"
    task: TaskName = "classification"
    seed: int = 0
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 512
    device: str = "auto"
    amp: Amp = "none"
    compile: CompileMode = "none"
    channels_last: bool = False
    parallel: Parallelism = "ddp"
    log_every: int = 50
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    balancer: BalancerConfig = field(default_factory=BalancerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    losses: dict[str, dict[str, Any]] = field(default_factory=lambda: {"task": {"type": "ce"}})


def _choices(kind: Any, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Every ``Literal`` field of ``kind`` and its sections, by dotted key -> its allowed values."""
    found: dict[str, tuple[str, ...]] = {}
    for name, hint in typing.get_type_hints(kind).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            found.update(_choices(hint, f"{key}."))
        elif typing.get_origin(hint) is Literal:
            found[key] = typing.get_args(hint)
    return found


def selection_metric(config: Config) -> str:
    """The metric that chooses ``best.pt`` and that summaries report first: ``eval.select``, or
    the task's default (the first of :data:`SELECTION_METRICS`)."""
    return config.eval.select or SELECTION_METRICS[config.task][0]


CHOICES: dict[str, tuple[str, ...]] = _choices(Config)
"""The settings that name one of a few choices (the ``Literal`` fields), by dotted key: checked
as a config is read, before anything is built; the modules that use them read their choices
from here."""


def reference_markdown() -> str:
    """The configuration reference as Markdown: one table per section (the top level,
    ``data``, ``student``, ``teacher``, ``optim``, ``balancer``, ``eval``) with every key's
    type, default and, for the keys in :data:`CHOICES`, the allowed values, followed by the
    section's own notes. Generated from the dataclasses, so it cannot fall behind them."""
    import dataclasses

    def default_of(f: dataclasses.Field) -> Any:
        if f.default is not dataclasses.MISSING:
            return f.default
        factory = f.default_factory
        return None if factory is dataclasses.MISSING else factory()

    sections: list[tuple[str, type]] = [("", Config)]
    for f in dataclasses.fields(Config):
        factory = f.default_factory
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            sections.append((f.name, factory))
    lines = []
    for prefix, kind in sections:
        lines += [f"## `{prefix or 'top level'}`", "", "| key | type | default | allowed |", "|---|---|---|---|"]
        for f in dataclasses.fields(kind):
            if not prefix and dataclasses.is_dataclass(f.default_factory):
                continue
            key = f"{prefix}.{f.name}" if prefix else f.name
            kind_name = (
                "str"
                if key in CHOICES
                else f.type
                if isinstance(f.type, str)
                else getattr(f.type, "__name__", str(f.type))
            )
            allowed = ", ".join(f"`{c}`" for c in CHOICES.get(key, ()))
            cells = [f"`{key}`", f"`{kind_name}`", f"`{default_of(f)!r}`", allowed]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")  # a type's | is not a column
        notes = (
            " ".join((kind.__doc__ or "").split())
            if kind.__doc__ and not kind.__doc__.startswith(kind.__name__)
            else ""
        )
        lines += ["", notes, ""] if notes else [""]
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (or start from the defaults), apply ``key=value`` overrides, validate.

    A file may start from another: ``base: other.yaml`` (a path relative to the file's folder;
    bases may have bases). The file's keys are then laid over the base's: within a section
    (``data``, ``optim``, ...) key by key; a key's value (a number, a list, or a free mapping
    such as ``losses`` or ``balancer.options``) replaces the base's whole."""
    raw: dict[str, Any] = {} if path is None else read_config_file(Path(path))
    for item in overrides:
        apply_override(raw, item, SECTIONS)
    return resolve_distillation_form(validate(from_dict(Config, raw, "")))


def resolve_distillation_form(config: Config) -> Config:
    """A loss whose form option (:attr:`dtokd.tasks.specs.LossType.form_option`: a causal LM's
    token-level KD ``divergence``) is left out or ``auto`` gets the form its balancing method is
    measured best with (``forward_ce`` for ``dto-amortized``, whose coefficients go as ``1 / L``;
    ``forward_kl`` otherwise: see :func:`dtokd.balancing.balancers.distillation_form`), written
    into the config the run saves."""
    from dtokd.balancing.balancers import distillation_form
    from dtokd.tasks import task_kind

    types = task_kind(config.task).loss_types
    losses = {}
    for name, spec in config.losses.items():
        record = types.get(str(spec.get("type")))
        option = record.form_option if record is not None else None
        if option is not None and spec.get(option, "auto") == "auto":
            spec = {**spec, option: distillation_form(config.balancer.method)}
        losses[name] = spec
    return dataclasses.replace(config, losses=losses)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory))
"""The keys of ``Config`` that hold a section of keys (merged key by key over a ``base:``)."""


def validate(config: Config) -> Config:
    """Range checks that the types alone do not express; the errors name key, value and range."""
    checks = [
        ("epochs", config.epochs, 0),
        ("batch_size", config.batch_size, 1),
        ("eval_batch_size", config.eval_batch_size, 1),
        ("log_every", config.log_every, 1),
        ("data.image_size", config.data.image_size, 1),
        ("eval.every", config.eval.every, 1),
    ]
    checks.append(("data.repeated_augmentation", config.data.repeated_augmentation, 1))
    if config.data.limit_train is not None:
        checks.append(("data.limit_train", config.data.limit_train, 2))  # a training batch of one breaks batch norm
    if config.data.workers is not None:
        checks.append(("data.workers", config.data.workers, 0))
    for key, value, least in checks:
        if value < least:
            raise ConfigError(f"{key}={value} is not allowed; it must be an integer >= {least}")
    if not 0 <= config.seed < 2**32:
        raise ConfigError(f"seed={config.seed} is not allowed; it must be an integer in [0, 2**32) (numpy's range)")
    if config.optim.ema_decay is not None and not 0.0 < config.optim.ema_decay < 1.0:
        raise ConfigError(
            f"optim.ema_decay={config.optim.ema_decay} is not allowed; it must be in (0, 1), e.g. 0.99996"
        )
    if not 0.0 <= config.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={config.data.val_fraction} is not allowed; it must be in [0, 1)")
    for key, allowed in CHOICES.items():  # a Config built in code, not read: its choices too
        value = _dotted(config, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; use one of {list(allowed)}")
    _check_balancer(config.balancer)
    _check_optim(config.optim, config.epochs)
    if config.teacher.cache_outputs and config.teacher.name is None:
        raise ConfigError(
            "teacher.cache_outputs=true caches a teacher's outputs, and teacher.name is null (no teacher); "
            "set teacher.cache_outputs=false"
        )
    _check_teacher_outputs(config)
    _check_fsdp(config)
    allowed_metrics = SELECTION_METRICS[config.task]
    if config.eval.select is not None and config.eval.select not in allowed_metrics:
        raise ConfigError(
            f"eval.select={config.eval.select!r} is not allowed for task {config.task!r}; "
            f"use one of {list(allowed_metrics)} or null (the task's default, {allowed_metrics[0]!r})"
        )
    if config.eval.test == "end" and config.data.val_fraction == 0:
        raise ConfigError(
            "eval.test='end' evaluates the test split on the checkpoint chosen on the validation "
            "split, and data.val_fraction=0 leaves none; give data.val_fraction > 0 or eval.test=every"
        )
    return config


def _check_teacher_outputs(config: Config) -> None:
    """``teacher.outputs`` names a teacher's precomputed top-k outputs: the task takes them, a
    teacher is named (whose outputs they are), its logits are not also cached, and no loss reads
    the teacher's internals (its hidden states), which outputs do not hold."""
    if config.teacher.outputs is None:
        return
    from dtokd.tasks import task_kind

    kind = task_kind(config.task)
    if not kind.takes_teacher_outputs:
        raise ConfigError(
            f"teacher.outputs={config.teacher.outputs!r} gives a language model's top-k outputs; "
            f"task={config.task!r} takes none (a teacher model: teacher.name)"
        )
    if config.teacher.name is None:
        raise ConfigError(
            f"teacher.outputs={config.teacher.outputs!r} needs teacher.name: the teacher the outputs came from"
        )
    if config.teacher.cache_outputs:
        raise ConfigError("teacher.outputs and teacher.cache_outputs=true both replace the teacher: keep one")
    internals = [
        name
        for name, spec in config.losses.items()
        if (record := kind.loss_types.get(str(spec.get("type")))) is not None and record.teacher_features
    ]
    if internals:
        raise ConfigError(
            f"teacher.outputs gives the teacher's top-k outputs, and losses {internals} need its hidden states: "
            "give the teacher itself"
        )


def _check_fsdp(config: Config) -> None:
    """``parallel=fsdp`` with none of the settings it does not support yet, each named."""
    if config.parallel != "fsdp":
        return
    unsupported = [
        (config.amp == "fp16", "amp=fp16 (a GradScaler over sharded gradients); use amp=bf16 or none"),
        (config.compile != "none", f"compile={config.compile!r}; use compile=none"),
        (config.channels_last, "channels_last=true (for convolutions); use false"),
        (config.optim.ema_decay is not None, "optim.ema_decay (an EMA copy of a sharded student); leave it null"),
        (config.teacher.cache_outputs, "teacher.cache_outputs=true (per-rank files of a sharded teacher); use false"),
    ]
    for refused, what in unsupported:
        if refused:
            raise ConfigError(f"parallel=fsdp does not support {what}")


def _check_optim(optim: OptimConfig, epochs: int) -> None:
    """The optimizer's settings: each in its range, none that the chosen optimizer or schedule
    would ignore, a warm-up and milestones inside the run."""
    ranges: list[tuple[str, float, float, float, str]] = [  # key, value, low, high, what
        ("optim.lr", optim.lr, 0.0, math.inf, "a finite number >= 0"),
        ("optim.weight_decay", optim.weight_decay, 0.0, math.inf, "a finite number >= 0"),
        ("optim.momentum", optim.momentum, 0.0, 1.0, "a number in [0, 1)"),
        ("optim.gamma", optim.gamma, 0.0, 1.0, "a number in (0, 1]"),
    ]
    for key, number, low, high, what in ranges:
        inside = math.isfinite(number) and low <= number <= high
        inside = inside and not (key == "optim.gamma" and number == 0)
        inside = inside and not (key == "optim.momentum" and number == 1)
        if not inside:
            raise ConfigError(f"{key}={number} is not allowed; it must be {what}")
    if optim.grad_clip is not None and not (math.isfinite(optim.grad_clip) and optim.grad_clip > 0):
        raise ConfigError(
            f"optim.grad_clip={optim.grad_clip} is not allowed; it must be a finite number > 0 (the largest "
            "gradient norm), or null for no clipping"
        )
    if optim.name == "adamw" and (optim.momentum != OptimConfig.momentum or optim.nesterov):
        raise ConfigError(
            f"optim.momentum={optim.momentum} / optim.nesterov={optim.nesterov} apply to optim.name=sgd; AdamW "
            f"runs with betas ({OptimConfig.momentum}, 0.999): leave them out"
        )
    if optim.nesterov and optim.momentum == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0 (Nesterov momentum without momentum)")
    if optim.warmup_epochs < 0 or (optim.warmup_epochs and optim.warmup_epochs >= epochs):
        raise ConfigError(
            f"optim.warmup_epochs={optim.warmup_epochs} is not allowed with epochs={epochs}; it must be an "
            "integer >= 0 and below the number of epochs"
        )
    if optim.schedule != "step" and (optim.milestones or optim.gamma != OptimConfig.gamma):
        raise ConfigError(
            f"optim.milestones={optim.milestones} / optim.gamma={optim.gamma} apply to optim.schedule=step, "
            f"not {optim.schedule!r}: leave them out"
        )
    milestones = optim.milestones
    if milestones and (milestones != sorted(set(milestones)) or milestones[0] < 1 or milestones[-1] >= epochs):
        raise ConfigError(
            f"optim.milestones={milestones} is not allowed with epochs={epochs}: the epochs at which the learning "
            "rate is multiplied by optim.gamma, increasing, each in [1, epochs)"
        )


def _dotted(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _check_balancer(balancer: BalancerConfig) -> None:
    """``balancer.method`` and ``balancer.engine`` name a method and an engine that exist (their
    options are checked when the balancer is made)."""
    from dtokd.balancing import BALANCERS
    from dtokd.balancing.engines import ENGINES

    if balancer.method not in BALANCERS:
        raise ConfigError(f"balancer.method={balancer.method!r} is not allowed; use one of {list(BALANCERS)}")
    if balancer.engine not in ENGINES:
        raise ConfigError(f"balancer.engine={balancer.engine!r} is not allowed; use one of {list(ENGINES)}")


def read_config_file(path: Path) -> dict[str, Any]:
    """The raw mapping of a config file, its ``base:`` chain laid over key by key within the
    sections (:func:`dtokd.train.config_file.read_config_file`)."""
    return config_file.read_config_file(path, SECTIONS)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)
