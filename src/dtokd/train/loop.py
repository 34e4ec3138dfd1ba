"""The training loop: one readable function, :func:`train`, for a model alone or distilled.

Each epoch: shuffled batches (order and augmentation fixed by seed and epoch), forward under
autocast if asked, named losses from the task, ``balancer.backward`` (the only place
where losses become gradients), optional gradient clipping, optimizer step, then evaluation on
the validation and test splits, a metrics line, and an atomic checkpoint. ``resume=True``
continues from the checkpoint so that the result equals an uninterrupted run.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from tqdm import tqdm

from dtokd.balancing import Balancer, make_balancer
from dtokd.data import DataBundle, build_data, place_data, sources, to_device, train_loader
from dtokd.interrupts import hold_folder
from dtokd.models import create_model, load_weights
from dtokd.models.causal_lm import names_a_local_folder
from dtokd.models.foreign import Renormalize, WithInput, check_normalize, remap_keys
from dtokd.models.norms import frozen_batchnorm_statistics
from dtokd.models.registry import apply_weights, read_weights
from dtokd.tasks import ClassificationTask, Task, build_task, check_task_settings
from dtokd.train import checkpoint as ckpt
from dtokd.train import distributed
from dtokd.train.config import CHOICES, LOWER_IS_BETTER, Config, ConfigError, load_config, selection_metric, to_dict
from dtokd.train.optim import lr_factor, make_optimizer, make_scheduler
from dtokd.train.records import MetricLog, metadata, write_yaml
from dtokd.train.run_folder import config_for_resume, prepare_fresh, record_extension, remove_partial_run
from dtokd.train.state import TrainingState
from dtokd.train.teacher_cache import CachedTeacher, cache_key

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train(
    config: Config | None,
    folder: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    extend_epochs: int | None = None,
    progress: bool = True,
    verbose: bool = True,
    config_file: Path | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Train (or distil) as configured, keeping everything in ``folder``; returns the summary.

    A fresh run needs a missing or empty ``folder`` (``force``: one holding only a previous
    run's files, which are replaced); if it fails or is interrupted before its first
    checkpoint, the files it wrote are removed. ``resume=True`` continues the run saved in
    ``folder`` from its checkpoint to the same result as an uninterrupted run; ``config`` (None:
    the saved one) must equal the saved configuration, except for ``epochs`` raised by
    ``extend_epochs`` (see :mod:`dtokd.train.run_folder`). ``progress``: progress bars (drawn
    on a terminal only); ``verbose``: a line per epoch. ``config_file``: the user's config
    file, which the run must never replace. ``max_steps``: stop each epoch after that many
    steps (a dry run).
    """
    folder = Path(folder)
    saved_epochs = None
    if resume:
        saved_epochs = load_config(folder / "config.yaml").epochs if (folder / "config.yaml").is_file() else None
        config = config_for_resume(folder, config, extend_epochs=extend_epochs)
    elif extend_epochs is not None:
        raise ConfigError("--extend-epochs lengthens a saved run: use it with --resume")
    elif config is None:
        raise ConfigError("a fresh run needs a configuration")
    if not resume:  # refuse an occupied folder before the (possibly long) build
        prepare_fresh(folder, force=force, config_file=config_file, remove=False)
    created = not folder.exists()
    main_process = int(os.environ.get("RANK", "0")) == 0
    lock = hold_folder(folder) if main_process else None  # one process writes a run folder at a time
    parts, finished = None, False
    try:
        parts = _build(config, verbose)
        if not resume:
            prepare_fresh(folder, force=force, config_file=config_file, remove=parts.ranks.main)
        folder.mkdir(parents=True, exist_ok=True)
        summary = _run(
            config,
            folder,
            parts,
            resume=resume,
            saved_epochs=saved_epochs,
            extend_epochs=extend_epochs,
            progress=progress and sys.stderr.isatty(),
            verbose=verbose,
            max_steps=max_steps,
        )
        finished = True
        return summary
    except BaseException:
        if not resume and main_process and not (folder / "checkpoint.pt").exists():
            remove_partial_run(folder, created)  # nothing half-written stays behind
        raise
    finally:
        if parts is not None:
            parts.ranks.close(finished)
        if lock is not None:
            lock.close()


@dataclass
class _Parts:
    """Everything a run is built from, before it touches its folder."""

    ranks: distributed.Ranks
    device: torch.device
    data: DataBundle
    student: nn.Module
    teacher: nn.Module | None
    teacher_input: nn.Module | None
    task: Task
    forward: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    balancer: Balancer
    scaler: torch.amp.GradScaler
    identity: dict[str, Any]
    ema: torch.optim.swa_utils.AveragedModel | None
    teacher_cache: CachedTeacher | None


def data_of(config: Config, *, augment: bool | None = None) -> DataBundle:
    """The data set a run of ``config`` trains and evaluates on (``augment``: None keeps the
    config's ``data.augment``); what training and ``dtokd eval`` both read."""
    d = config.data
    return build_data(
        d.name,
        d.root,
        val_fraction=d.val_fraction,
        seed=config.seed,
        augment=d.augment if augment is None else augment,
        image_size=d.image_size,
        limit_train=d.limit_train,
        normalize=check_normalize(config.student.normalize, "student.normalize"),
        transform=d.transform,
        workers=d.workers,
        synthetic=d.synthetic,
        labels=d.labels,
        text=d.text,
    )


def _build(config: Config, verbose: bool) -> _Parts:
    """Data, models, balancer and optimizer from ``config``; every setting is checked here."""
    if config.amp not in AMP_DTYPES:
        raise ValueError(f"amp={config.amp!r} is not allowed; use one of {list(AMP_DTYPES)}")
    ranks, device = distributed.setup(config.device, config.batch_size)
    _check_compile(config, device)
    ckpt.seed_everything(config.seed)
    check_task_settings(
        config.task,
        config.data.name,
        [("student.name", config.student.name), ("teacher.name", config.teacher.name)],
        config.losses,
        config.balancer.representation,
        config.teacher.normalize is not None,
    )  # before data is read (a corpus, a tokenizer trained)
    data = data_of(config)
    if data.detection and config.data.mixup:
        raise ValueError("data.mixup mixes classification labels; it is not available for detection")
    student = create_model(
        config.student.name, data.num_classes, data.in_channels, data.image_size, config.student.kwargs
    )
    if config.student.weights:
        load_weights(student, config.student.weights, config.student.key_map, "student.key_map")
    teacher, teacher_input = _load_teacher(config, data)
    task = build_task(
        config.task, student, teacher, config.losses, data, teacher_input, representation=config.balancer.representation
    ).to(device)
    if teacher is not None:
        teacher.to(device)
    if config.channels_last:
        for model in (student, teacher):
            if model is not None:
                model.to(memory_format=torch.channels_last)
    data = place_data(data, device, config.data.placement)
    teacher_cache = (
        _cache_teacher_outputs(config, task, teacher, device, ranks) if config.teacher.cache_outputs else None
    )
    if ranks.main and verbose:
        where = "the device" if data.train.device.type != "cpu" else "the host"
        print(
            f"[{config.name}] device {device}{' (auto)' if config.device == 'auto' else ''}; "
            f"training images on {where}",
            flush=True,
        )
    params = list(task.parameters())
    forward = nn.parallel.DistributedDataParallel(task) if ranks.world > 1 else task
    no_weight_decay = getattr(student, "no_weight_decay", None)  # timm's: parameters kept out of weight decay
    no_decay = [f"student.{n}" for n in no_weight_decay()] if callable(no_weight_decay) else []
    optimizer = make_optimizer(task.named_parameters(), config.optim, config.batch_size, no_decay)
    scheduler = make_scheduler(optimizer, config.optim, config.epochs)
    balancer = _make_balancer(config, task, params)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    identity = {
        "student": config.student.name,
        "num_classes": data.num_classes,
        "losses": task.loss_names,
        "balancer": config.balancer.method,
        "teacher": config.teacher.name,
    }
    ema = None
    if config.optim.ema_decay is not None:  # an exponential moving average of the student, updated every step
        ema = torch.optim.swa_utils.AveragedModel(
            student, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.optim.ema_decay), use_buffers=True
        )
    return _Parts(
        ranks,
        device,
        data,
        student,
        teacher,
        teacher_input,
        task,
        forward,
        optimizer,
        scheduler,
        balancer,
        scaler,
        identity,
        ema,
        teacher_cache,
    )


def _run(
    config: Config,
    folder: Path,
    p: _Parts,
    *,
    resume: bool,
    saved_epochs: int | None,
    extend_epochs: int | None,
    progress: bool,
    verbose: bool,
    max_steps: int | None,
) -> dict[str, Any]:
    """The run in its folder: restore (or record the set-up), teacher check, epochs, summary."""
    checkpoint_path = folder / "checkpoint.pt"
    log = MetricLog(folder, enabled=p.ranks.main)
    progress, verbose = progress and p.ranks.main, verbose and p.ranks.main
    state = TrainingState(p.student, p.task.projectors, p.optimizer, p.scheduler, p.balancer, p.scaler, p.ema)
    if resume:
        state.load_state_dict(ckpt.load_checked(checkpoint_path, p.identity))
        log.truncate_after(state.epoch)
        if extend_epochs is not None:  # the longer schedule's learning rate from the resumed epoch on
            for group, base in zip(p.optimizer.param_groups, p.scheduler.base_lrs):
                group["lr"] = base * lr_factor(config.optim, p.scheduler.last_epoch, config.epochs)
            if p.ranks.main:
                record_extension(folder, config, saved_epochs or state.epoch, state.epoch)
    elif p.ranks.main:
        write_yaml(folder / "config.yaml", to_dict(config))
        meta = {
            **metadata(config.seed),
            "device": str(p.device),
            "training_images_on": str(p.data.train.device),
            "deferred_checks": p.balancer.deferred_checks,
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    teacher_metrics = _teacher_accuracy(
        config, folder, p.task, p.teacher, p.teacher_input, p.data, p.device, p.ranks.main, verbose
    )
    start_epoch, history = state.epoch, state.history  # the rows appended to history are the ones saved
    if config.compile != "none":
        p.student.compile(mode=config.compile)
    try:
        for epoch in range(start_epoch, config.epochs):
            row = _train_epoch(
                config,
                p.forward,
                p.task,
                p.balancer,
                p.optimizer,
                p.scaler,
                p.data,
                epoch,
                p.device,
                log,
                progress,
                p.ranks,
                max_steps,
                p.ema,
                p.teacher_cache,
            )
            p.scheduler.step()
            if _evaluates(config, epoch):
                row.update(
                    _evaluate(config, p, p.student, p.ema, ("val", "test") if config.eval.test == "every" else ("val",))
                )
            history.append(row)
            log.write("metrics.jsonl", row, epoch)
            if p.ranks.main and _is_best(history, selection_metric(config)):
                ckpt.save_atomic(
                    {"model": p.student.state_dict(), "identity": p.identity, "epoch": epoch + 1}, folder / "best.pt"
                )
            if p.ranks.main:
                state.epoch = epoch + 1
                ckpt.save_atomic({"identity": p.identity, **state.state_dict()}, checkpoint_path)
            p.ranks.barrier()
            if verbose:
                m = selection_metric(config)
                scores = "".join(
                    f" {split} {m} {row[f'{split}_{m}']:.2f}"
                    + (f" ppl {row[f'{split}_ppl']:.2f}" if f"{split}_ppl" in row and m != "ppl" else "")
                    for split in ("val", "test")
                    if f"{split}_{m}" in row
                )
                print(
                    f"[{config.name}] epoch {epoch + 1}/{config.epochs}: loss {row['train_loss']:.4f}{scores} "
                    f"({row['epoch_seconds']:.1f}s)",
                    flush=True,
                )
    finally:
        log.close()
    final = _test_at_end(config, folder, p) if config.eval.test == "end" and history else None
    summary = summarize(history, config, final)
    if teacher_metrics:
        summary["teacher"] = teacher_metrics
    if p.ranks.main:
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _losses_after(
    forward: Any, task: Task, x: Any, y: Any, epochs_done: float, device: torch.device, amp_dtype: Any
) -> dict[str, torch.Tensor]:
    """The step's losses re-evaluated on its batch after the optimizer step (the teacher's
    outputs reused, batch-norm statistics untouched, under the step's autocast), for
    ``balancer.after_step``, which calls it under ``torch.no_grad()`` when it needs them."""
    with (
        frozen_batchnorm_statistics(task.student),
        torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None),
    ):
        _, after = forward(x, y, epochs_done, reuse_teacher=True)
    return after


def _evaluates(config: Config, epoch: int) -> bool:
    """Whether epoch ``epoch`` (0-based) is evaluated: every ``eval.every`` epochs and the last."""
    return (epoch + 1) % config.eval.every == 0 or epoch + 1 == config.epochs


def _evaluate(
    config: Config, p: _Parts, model: nn.Module, ema: nn.Module | None, splits: tuple[str, ...]
) -> dict[str, float]:
    """``model`` (and the EMA model, as ``ema_<split>_...``) on each of ``splits``."""
    row: dict[str, float] = {}
    for split in splits:
        for prefix, net in ((split, model), (f"ema_{split}", cast(nn.Module, ema.module) if ema is not None else None)):
            if net is not None:
                row.update(
                    _prefixed(
                        prefix,
                        p.task.evaluate(
                            net,
                            getattr(p.data, split),
                            config.eval_batch_size,
                            p.device,
                            channels_last=config.channels_last,
                        ),
                    )
                )
    return row


def _test_at_end(config: Config, folder: Path, p: _Parts) -> dict[str, dict[str, float]]:
    """``eval.test=end``: the test split on the last model (and its EMA) and on ``best.pt`` (the
    checkpoint chosen on the validation split), as ``{"last": ..., "best": ..., "best_epoch": k}``."""
    last = _evaluate(config, p, p.student, p.ema, ("test",))
    best_state = ckpt.load_checked(folder / "best.pt", p.identity)
    chosen = copy.deepcopy(p.student)
    chosen.load_state_dict(best_state["model"])
    return {"last": last, "best": _evaluate(config, p, chosen, None, ("test",)), "best_epoch": best_state["epoch"]}


COMPILE_MODES = CHOICES["compile"]


def _check_compile(config: Config, device: torch.device) -> None:
    """``compile`` names a torch.compile mode for the student; CUDA graphs
    (``reduce-overhead``) need a CUDA device and a step with one backward pass through the
    student (``engine=representation``)."""
    if config.compile not in COMPILE_MODES:
        raise ValueError(f"compile={config.compile!r} is not allowed; use one of {list(COMPILE_MODES)}")
    if config.task == "detection" and config.compile != "none":
        raise ValueError(
            f"compile={config.compile!r} is refused for detection: torch.compile of torchvision's "
            "detectors (data-dependent proposal and box shapes) is not verified here; use compile=none"
        )
    if config.compile != "reduce-overhead":
        return
    if device.type != "cuda":
        raise ValueError(
            f"compile='reduce-overhead' captures CUDA graphs and needs a CUDA device, not {device}; "
            "use compile=default on the CPU"
        )
    if config.balancer.engine != "representation":
        raise ValueError(
            f"compile='reduce-overhead' with balancer.engine={config.balancer.engine!r} is refused: that engine runs "
            "one backward pass per objective through the same captured forward graph (retain_graph), which "
            "CUDA-graph replay is not verified to support; use balancer.engine=representation (one backward pass "
            "through the student) or compile=default"
        )


def _load_teacher(config: Config, data: DataBundle) -> tuple[nn.Module | None, Renormalize | None]:
    """The frozen teacher in eval mode and, if it was trained with other input statistics
    than the student's data (``teacher.normalize``), the map to its own normalisation."""
    if not config.teacher.name:
        return None, None
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


def _teacher_accuracy(
    config: Config,
    folder: Path,
    task: Task,
    teacher: nn.Module | None,
    teacher_input: nn.Module | None,
    data: DataBundle,
    device: torch.device,
    main: bool,
    progress: bool,
) -> dict[str, Any] | None:
    """The teacher's metrics on the validation and test splits, measured before training as it
    sees its inputs in distillation, and kept in ``teacher.json`` with the SHA-256 of its weights
    (``weights``: which teacher this run learned from; a resumed run reads the file). The
    measurement is cached by content (the teacher's weights, its input mapping, the data
    settings and the seed that carves the validation split), so the cells of a matrix that share
    a teacher and data pay it once."""
    if teacher is None:
        return None
    path = folder / "teacher.json"
    if path.is_file():
        return json.loads(path.read_text())
    weights = ckpt.checksum(teacher.state_dict())  # read once: a large teacher takes a while to hash
    model = WithInput(teacher, teacher_input) if teacher_input is not None else teacher
    cached = sources.cache_dir() / "teacher-eval" / f"{_teacher_key(config, weights, teacher_input)}.json"
    if cached.is_file():
        measured = json.loads(cached.read_text())
    else:
        measured = _measure_teacher(config, task, model, data, device)
        if main:
            cached.parent.mkdir(parents=True, exist_ok=True)
            ckpt.write_text_atomic(cached, json.dumps(measured, indent=2) + "\n")
    result: dict[str, Any] = {
        "name": config.teacher.name,
        "checkpoint": config.teacher.checkpoint,
        "weights": weights,
        **measured,
    }
    if main:
        path.write_text(json.dumps(result, indent=2) + "\n")
        if progress:
            m = selection_metric(config)
            print(
                f"[{config.name}] teacher {config.teacher.name}: val {m} {result.get(f'val_{m}', float('nan')):.2f} "
                f"test {m} {result[f'test_{m}']:.2f}",
                flush=True,
            )
    return result


def _measure_teacher(
    config: Config, task: Task, model: nn.Module, data: DataBundle, device: torch.device
) -> dict[str, float]:
    result: dict[str, float] = {}
    for split in ("val", "test"):
        result.update(
            _prefixed(
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
        "data_content": data_content,
        "weights": weights,
        "input": ckpt.checksum(teacher_input.state_dict()) if teacher_input is not None else None,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _make_balancer(config: Config, task: Task, params: Sequence[torch.Tensor]) -> Balancer:
    cfg = config.balancer
    gram_params = None
    if cfg.gram_params:
        gram_params = [
            p for n, p in task.student.named_parameters() if n == cfg.gram_params or n.startswith(cfg.gram_params + ".")
        ]
        if not gram_params:
            names = sorted({n.rsplit(".", 1)[0] for n, _ in task.student.named_parameters()})
            raise ValueError(
                f"balancer.gram_params={cfg.gram_params!r} matches no student parameter; modules: {names[-20:]}"
            )
    options = dict(cfg.options)
    own = sorted(set(options) & {"engine", "gram_params"})
    if own:
        raise ValueError(f"balancer.options names {own}: set them as balancer.{own[0]}, not among the method's options")
    if cfg.method == "fixed" and "weights" not in options and len(task.loss_names) == 1:
        options["weights"] = [1.0]  # a single loss: the plain backward pass
    # by default the checks are deferred wherever every step allows it: no host wait per step,
    # the checks before each checkpoint
    options.setdefault("deferred_checks", "auto")
    try:
        balancer = make_balancer(cfg.method, params, engine=cfg.engine, gram_params=gram_params, **options)
    except TypeError as error:  # an option the method does not take, or a missing one
        raise ValueError(f"balancer.options={cfg.options!r} for method {cfg.method!r}: {error}") from None
    balancer.decide_deferred_checks(len(task.loss_names))
    return balancer


def _train_epoch(
    config: Config,
    forward: nn.Module,
    task: Task,
    balancer: Balancer,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    data: DataBundle,
    epoch: int,
    device: torch.device,
    log: MetricLog,
    progress: bool,
    ranks: distributed.Ranks,
    max_steps: int | None = None,
    ema: torch.optim.swa_utils.AveragedModel | None = None,
    teacher_cache: CachedTeacher | None = None,
) -> dict[str, Any]:
    """One epoch; ``forward`` is the task or its DDP wrapper, and each rank trains on its
    shard of every global batch (``teacher_cache``: the teacher's outputs read or stored)."""
    task.student.train()
    loader = train_loader(
        data.train,
        config.batch_size,
        config.seed,
        epoch,
        rank=ranks.rank,
        world=ranks.world,
        repeats=config.data.repeated_augmentation,
    )
    local = data.train.streams  # a streamed set gives each rank its own part of the global batch
    amp_dtype = AMP_DTYPES[config.amp]
    m = len(task.loss_names)
    # sums of the steps' losses, weights and loss weights, on the training device: every step's
    # numbers are brought there, whichever path (host or device) the balancer took
    totals = torch.zeros(3 * m, dtype=torch.float64, device=device)
    count, skipped, start = 0, 0, time.perf_counter()
    mixup = _make_mixup(config.data.mixup, data.num_classes)
    if teacher_cache is not None:
        teacher_cache.begin_epoch(epoch)
    for i, (x, y) in enumerate(
        tqdm(
            loader,
            desc=f"{config.name} epoch {epoch + 1}/{config.epochs}",
            leave=False,
            disable=not progress,
            unit="batch",
        )
    ):
        if mixup is not None:  # on the global batch before each rank takes its part (a streamed set: the local one)
            x, y = mixup(to_device(x, device), to_device(y, device))
        if not local:
            shard = ranks.shard(x.shape[0])
            x, y = x[shard], y[shard]
        x, y = to_device(x, device, config.channels_last), to_device(y, device)
        step = epoch * len(loader) + i
        epochs_done = epoch + (i + 1) / len(loader)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits, losses = forward(x, y, epochs_done)
        diagnose = step % config.log_every == 0
        info = balancer.backward(losses, representation=logits, scaler=scaler, diagnose=diagnose)
        if config.optim.grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(task.parameters(), config.optim.grad_clip)
        if not scaler.is_enabled() and info.skipped:  # under a GradScaler, scaler.step handles the skip
            skipped += 1
        else:
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update_parameters(task.student)
        # what the method learns after the step (the paper's amortized rule: from the losses
        # re-evaluated on the same batch, which it asks for; nothing for most methods)
        balancer.after_step(functools.partial(_losses_after, forward, task, x, y, epochs_done, device, amp_dtype))
        totals.add_(info.per_loss_on_device.to(device, non_blocking=True))  # no host read: see StepInfo
        count += 1
        if diagnose:
            log.write("steps.jsonl", {"epoch": epoch, "step": step, **info.as_dict()}, step)
        if max_steps is not None and count >= max_steps:
            break
    if teacher_cache is not None:
        teacher_cache.end_epoch(complete=max_steps is None or count < max_steps)
    balancer.check_deferred()  # before the epoch's checkpoint
    row: dict[str, Any] = {
        "epoch": epoch,
        "lr": optimizer.param_groups[0]["lr"],
        "epoch_seconds": time.perf_counter() - start,
        "skipped_steps": skipped,
    }
    if count:
        names = balancer.names
        assert names is not None  # fixed by the epoch's first step
        means = (totals / count).tolist()
        row.update({f"loss/{n}": means[k] for k, n in enumerate(names)})
        row.update({f"loss_weight/{n}": means[2 * m + k] for k, n in enumerate(names)})
    row["train_loss"] = sum(v for k, v in row.items() if k.startswith("loss/"))
    return row


def _cache_teacher_outputs(
    config: Config, task: Task, teacher: nn.Module | None, device: torch.device, ranks: distributed.Ranks
) -> CachedTeacher:
    """``teacher.cache_outputs``: the task's teacher replaced by its cached outputs on the
    training batches (see :mod:`dtokd.train.teacher_cache`)."""
    if teacher is None:
        raise ValueError("teacher.cache_outputs=true needs a teacher (teacher.name)")
    if not isinstance(task, ClassificationTask):
        raise ValueError(f"teacher.cache_outputs=true is for classification; task={config.task!r} is not cached")
    features = [n for n, spec in task.specs.items() if spec["type"] == "feature"]
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


def _make_mixup(options: dict[str, Any] | None, num_classes: int) -> Any:
    """timm's ``Mixup`` with ``options`` (None: no mixing). Its random numbers come from numpy's
    global generator, which every run seeds and every checkpoint saves."""
    if not options:
        return None
    try:
        from timm.data import Mixup
    except ImportError:
        raise ValueError("data.mixup needs timm: pip install 'dtokd[timm]'") from None
    try:
        return Mixup(num_classes=num_classes, **options)
    except TypeError as error:
        raise ValueError(f"data.mixup={options!r}: {error}") from None


def summarize(history: list[dict[str, Any]], config: Config, final: dict[str, Any] | None = None) -> dict[str, Any]:
    """Best epoch (by the validation metric, :func:`~dtokd.train.config.selection_metric`, among
    the evaluated epochs: the highest, or the lowest for a perplexity or loss, the latest of ties
    as ``best.pt`` keeps; by the test one when there is no validation split), its test metric,
    the best and last test metric, and the mean training seconds per epoch; keys name the metric
    (``best_val_top1``, ``last_test_AP``, ``best_val_ppl``, ...); a causal LM's summary adds
    next-token top-1 and perplexity at the chosen and the last epoch, whichever chose.
    ``final``: the end-of-run
    test evaluation of ``eval.test=end`` (:func:`_test_at_end`), which gives the test figures
    (no best-of-test figure: the test split was not seen per epoch)."""
    method = config.balancer.method if config.teacher.name else "student alone"
    m = selection_metric(config)
    summary: dict[str, Any] = {
        "name": config.name,
        "method": method,
        "seed": config.seed,
        "metric": m,
        "epochs_run": len(history),
    }
    evaluated = [i for i, row in enumerate(history) if _selection_key(row, m)]
    if not evaluated:
        return summary
    key = _selection_key(history[evaluated[-1]], m)
    assert key is not None  # an evaluated row
    sign = _orientation(m)
    best = max(evaluated, key=lambda i: (sign * history[i][key], i))
    best_of = min if m in LOWER_IS_BETTER else max
    tested = final["last"] if final else history[evaluated[-1]]
    summary.update(
        {
            "best_epoch": best + 1,
            f"best_val_{m}": history[best].get(f"val_{m}"),
            f"test_{m}_at_best_val": (final["best"] if final else history[best]).get(f"test_{m}"),
            **(
                {}
                if final
                else {
                    f"best_test_{m}": best_of(
                        (history[i][f"test_{m}"] for i in evaluated if f"test_{m}" in history[i]), default=None
                    )
                }
            ),
            f"last_test_{m}": tested.get(f"test_{m}"),  # None: the metric is undefined on this test split
            **({"last_test_top5": tested["test_top5"]} if "test_top5" in tested else {}),
            **{
                key: value
                for other in (("top1", "ppl") if config.task == "causal-lm" else ())
                if other != m
                for key, value in (
                    (f"test_{other}_at_best_val", (final["best"] if final else history[best]).get(f"test_{other}")),
                    (f"last_test_{other}", tested.get(f"test_{other}")),
                )
            },
            "seconds_per_epoch": sum(r["epoch_seconds"] for r in history) / len(history),
            "test_evaluated": config.eval.test,
            "eval_every": config.eval.every,
        }
    )
    if f"ema_test_{m}" in tested:
        summary[f"ema_last_test_{m}"] = tested[f"ema_test_{m}"]
        if not final:
            summary[f"ema_best_test_{m}"] = best_of(history[i][f"ema_test_{m}"] for i in evaluated)
    if final and final["best_epoch"] != best + 1:
        raise RuntimeError(
            f"best.pt holds epoch {final['best_epoch']}, but the validation history chooses epoch {best + 1}"
        )
    return summary


def _selection_key(row: dict[str, Any], metric: str) -> str | None:
    """The key a checkpoint is chosen by in an evaluated epoch's row (None: not evaluated)."""
    return next((k for k in (f"val_{metric}", f"test_{metric}") if k in row), None)


def _is_best(history: list[dict[str, Any]], metric: str) -> bool:
    """Whether the last epoch is the best evaluated so far (ties: the later), as :func:`summarize` chooses."""
    key = _selection_key(history[-1], metric)
    if key is None:
        return False
    sign = _orientation(metric)
    return sign * history[-1][key] >= max(sign * r[key] for r in history if key in r)


def _orientation(metric: str) -> float:
    """1 for a metric whose higher value is better (accuracy, AP), -1 for a perplexity or loss."""
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{k}": v for k, v in metrics.items()}
