"""A run's parts built from its config, every setting checked on the way: the data, the student,
the teacher, the task, the optimizer and schedule, the balancer, the GradScaler and the EMA."""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dtokd.balancing import Balancer, make_balancer
from dtokd.balancing.balancers import options_for_one_objective
from dtokd.balancing.engines import ONE_BACKWARD_PASS
from dtokd.data import DataBundle, build_data, place_data
from dtokd.models import create_model, load_weights
from dtokd.models.foreign import check_normalize
from dtokd.tasks import Task, build_task, check_task_settings, task_kind
from dtokd.train import checkpoint as ckpt
from dtokd.train import distributed
from dtokd.train.config import CHOICES, Config
from dtokd.train.optim import make_optimizer, make_scheduler
from dtokd.train.parts import AMP_DTYPES, Parts
from dtokd.train.sharding import shard_models
from dtokd.train.teacher import cache_teacher_outputs, load_teacher

COMPILE_MODES = CHOICES["compile"]


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


def build_parts(config: Config, verbose: bool) -> Parts:
    """Data, models, balancer and optimizer from ``config``; every setting is checked here, the
    task's before any data is read (a corpus, a tokenizer trained). ``verbose``: a line naming
    the device and where the training images are held."""
    if config.amp not in AMP_DTYPES:
        raise ValueError(f"amp={config.amp!r} is not allowed; use one of {list(AMP_DTYPES)}")
    ranks, device = distributed.setup(config.device, config.batch_size)
    try:
        return _parts(config, verbose, ranks, device)
    except BaseException as error:  # a group this build joined is torn down (see Ranks.close)
        traceback.clear_frames(error.__traceback__)
        ranks.close(finished=False)
        raise


def _parts(config: Config, verbose: bool, ranks: distributed.Ranks, device: torch.device) -> Parts:
    """:func:`build_parts` once the process group is joined."""
    if config.parallel == "fsdp" and ranks.world < 2:
        raise ValueError(
            "parallel=fsdp shards the models across torchrun's processes, and this run has one: start it "
            "with torchrun --nproc_per_node N (N >= 2) -m dtokd.cli ..., or a new run with parallel=ddp (a run "
            "cannot change parallel on resume)"
        )
    _check_compile(config, device)
    ckpt.seed_everything(config.seed)
    check_task_settings(
        config.task,
        config.data.name,
        [("student.name", config.student.name), ("teacher.name", config.teacher.name)],
        config.losses,
        config.balancer.representation,
        config.teacher.normalize is not None,
    )
    data = data_of(config)
    if data.detection and config.data.mixup:
        raise ValueError("data.mixup mixes classification labels; it is not available for detection")
    student, teacher, teacher_input, task = _models(config, data, device)
    if config.parallel == "fsdp":
        shard_models(task, student, teacher, config.amp)
    data = place_data(data, device, config.data.placement)
    teacher_cache = (
        cache_teacher_outputs(config, task, teacher, device, ranks) if config.teacher.cache_outputs else None
    )
    if ranks.main and verbose:
        print(_placement_line(config, device, data), flush=True)
    params = list(task.parameters())
    forward = nn.parallel.DistributedDataParallel(task) if ranks.world > 1 and config.parallel == "ddp" else task
    no_weight_decay = getattr(student, "no_weight_decay", None)  # timm's: parameters kept out of weight decay
    no_decay = [f"student.{n}" for n in no_weight_decay()] if callable(no_weight_decay) else []
    optimizer = make_optimizer(task.named_parameters(), config.optim, config.batch_size, no_decay)
    scheduler = make_scheduler(optimizer, config.optim, config.epochs)
    balancer = make_run_balancer(config, task, params)
    return Parts(
        ranks=ranks,
        device=device,
        data=data,
        student=student,
        teacher=teacher,
        teacher_input=teacher_input,
        task=task,
        forward=forward,
        optimizer=optimizer,
        scheduler=scheduler,
        balancer=balancer,
        scaler=torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"),
        identity=_identity(config, data, task),
        ema=_ema(config, student),
        teacher_cache=teacher_cache,
    )


def _models(
    config: Config, data: DataBundle, device: torch.device
) -> tuple[nn.Module, nn.Module | None, nn.Module | None, Task]:
    """The student (with ``student.weights`` where given), the frozen teacher and its input
    map (None, None without a teacher) and the task over them, placed on ``device`` (in the
    channels-last memory format where asked): ``(student, teacher, teacher_input, task)``."""
    student = create_model(
        config.student.name, data.num_classes, data.in_channels, data.image_size, config.student.kwargs
    )
    if config.student.weights:
        load_weights(student, config.student.weights, config.student.key_map, "student.key_map")
    teacher, teacher_input = load_teacher(config, data)
    task = build_task(
        config.task, student, teacher, config.losses, data, teacher_input, representation=config.balancer.representation
    ).to(device)
    if teacher is not None:
        teacher.to(device)
    if config.channels_last:
        for model in (student, teacher):
            if model is not None:
                model.to(memory_format=torch.channels_last)
    return student, teacher, teacher_input, task


def _placement_line(config: Config, device: torch.device, data: DataBundle) -> str:
    """The line a verbose run starts with: its device and where its training data are held."""
    where = "the device" if data.train.device.type != "cpu" else "the host"
    return f"[{config.name}] device {device}{' (auto)' if config.device == 'auto' else ''}; training data on {where}"


def _identity(config: Config, data: DataBundle, task: Task) -> dict[str, Any]:
    """What a checkpoint of this run records and a resumed run must match: the student, the
    number of classes, the losses, the balancer and the teacher."""
    return {
        "student": config.student.name,
        "num_classes": data.num_classes,
        "losses": task.loss_names,
        "balancer": config.balancer.method,
        "teacher": config.teacher.name,
    }


def _ema(config: Config, student: nn.Module) -> torch.optim.swa_utils.AveragedModel | None:
    """``optim.ema_decay``: an exponential moving average of the student, updated every step
    (None: not asked for)."""
    if config.optim.ema_decay is None:
        return None
    return torch.optim.swa_utils.AveragedModel(
        student, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(config.optim.ema_decay), use_buffers=True
    )


def make_run_balancer(config: Config, task: Task, params: Sequence[torch.Tensor]) -> Balancer:
    """The balancer of ``balancer`` in ``config`` over ``params`` (its Gram over the student's
    parameters named by ``balancer.gram_params`` where given), its checks deferred wherever
    every step allows it."""
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
    if len(task.loss_names) == 1:
        options = options_for_one_objective(cfg.method, options)
    # by default the checks are deferred wherever every step allows it: no host wait per step,
    # the checks before each checkpoint
    options.setdefault("deferred_checks", "auto")
    try:
        balancer = make_balancer(cfg.method, params, engine=cfg.engine, gram_params=gram_params, **options)
    except TypeError as error:  # an option the method does not take, or a missing one
        raise ValueError(f"balancer.options={cfg.options!r} for method {cfg.method!r}: {error}") from None
    balancer.decide_deferred_checks(len(task.loss_names))
    return balancer


def _check_compile(config: Config, device: torch.device) -> None:
    """``compile`` names a torch.compile mode for the student; CUDA graphs
    (``reduce-overhead``) need a CUDA device and a step with one backward pass through the
    student (``engine=representation``)."""
    if config.compile not in COMPILE_MODES:
        raise ValueError(f"compile={config.compile!r} is not allowed; use one of {list(COMPILE_MODES)}")
    refusal = task_kind(config.task).compile_refusal
    if refusal is not None and config.compile != "none":
        raise ValueError(f"compile={config.compile!r} is refused for {config.task}: {refusal}; use compile=none")
    if config.compile != "reduce-overhead":
        return
    if device.type != "cuda":
        raise ValueError(
            f"compile='reduce-overhead' captures CUDA graphs and needs a CUDA device, not {device}; "
            "use compile=default on the CPU"
        )
    if config.balancer.engine not in ONE_BACKWARD_PASS:
        raise ValueError(
            f"compile='reduce-overhead' with balancer.engine={config.balancer.engine!r} is refused: that engine runs "
            "one backward pass per objective through the same captured forward graph (retain_graph), which "
            "CUDA-graph replay is not verified to support; use balancer.engine=representation (one backward pass "
            "through the student) or compile=default"
        )
