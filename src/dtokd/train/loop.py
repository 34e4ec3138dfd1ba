"""The training loop: one readable function, :func:`train`, for a model alone or distilled.

Each epoch: shuffled batches (order and augmentation fixed by seed and epoch), forward under
autocast if asked, named losses from the task, ``balancer.backward`` (the only place
where losses become gradients), optional gradient clipping, optimizer step, then evaluation on
the validation and test splits, a metrics line, and an atomic checkpoint. ``resume=True``
continues from the checkpoint so that the result equals an uninterrupted run.

This module holds the run in its folder; the parts it runs are built in :mod:`.build` (into
a :class:`~dtokd.train.parts.Parts`), an epoch runs in :mod:`.epoch`, evaluations in
:mod:`.evaluation`, the teacher is loaded and measured in :mod:`.teacher`, and the figures
are summed up in :mod:`.summary`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch  # noqa: F401  (tests read loop.torch)

from dtokd.interrupts import hold_folder, release_folder
from dtokd.train import checkpoint as ckpt
from dtokd.train.build import build_parts, data_of, make_run_balancer
from dtokd.train.config import Config, ConfigError, load_config, selection_metric, to_dict
from dtokd.train.epoch import train_epoch
from dtokd.train.evaluation import evaluate, evaluates, final_test
from dtokd.train.floor_watch import label_losses, warn_on_floor, warned_before
from dtokd.train.optim import lr_factor
from dtokd.train.parts import Parts
from dtokd.train.records import MetricLog, metadata, write_yaml
from dtokd.train.run_folder import config_for_resume, prepare_fresh, record_extension, remove_partial_run
from dtokd.train.sharding import FullOptimizerState, FullState
from dtokd.train.state import TrainingState
from dtokd.train.summary import epoch_line, is_best, summarize
from dtokd.train.teacher import teacher_metrics

__all__ = ["data_of", "summarize", "train"]

# The epoch and its evaluation are called through these names, so that a test can replace them
# here (tests/helpers.py interrupts a run at an epoch); the others are read from this module by
# tests.
_train_epoch = train_epoch
_evaluate = evaluate
_make_balancer = make_run_balancer
_is_best = is_best


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
    steps (a dry run)."""
    folder = Path(folder)
    config, saved_epochs = _config_of_run(config, folder, resume=resume, extend_epochs=extend_epochs)
    main_process = int(os.environ.get("RANK", "0")) == 0
    # the main process alone checks and writes the folder (another rank could see its first files)
    if not resume and main_process:  # refuse an occupied folder before the (possibly long) build
        prepare_fresh(folder, force=force, config_file=config_file, remove=False)
    created = not folder.exists()
    lock = hold_folder(folder) if main_process else None  # one process writes a run folder at a time
    parts, finished = None, False
    try:
        parts = build_parts(config, verbose)
        if not resume and parts.ranks.main:
            prepare_fresh(folder, force=force, config_file=config_file)
        parts.ranks.barrier()  # no rank reads the folder (teacher.json) before the main process cleared it
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
    except BaseException as error:
        _after_failure(error, folder, created, remove_partial=not resume and main_process)
        raise
    finally:
        if parts is not None:  # the models (a DDP reducer holds the group) go before the group
            ranks, parts = parts.ranks, None
            ranks.close(finished)
        if lock is not None:
            release_folder(lock)


def _after_failure(error: BaseException, folder: Path, created: bool, *, remove_partial: bool) -> None:
    """A run that failed or was interrupted: with ``remove_partial``, the files of a fresh run
    that has no checkpoint yet are removed (nothing half-written stays behind); the error's
    frames are cleared of their locals, which hold the models, which hold the process group, so
    that :meth:`~dtokd.train.distributed.Ranks.close` tears it down while the interpreter lives."""
    if remove_partial and not (folder / "checkpoint.pt").exists():
        remove_partial_run(folder, created)
    traceback.clear_frames(error.__traceback__)


def _config_of_run(
    config: Config | None, folder: Path, *, resume: bool, extend_epochs: int | None
) -> tuple[Config, int | None]:
    """The configuration the run in ``folder`` runs with (a resumed run: the saved one, checked
    against ``config`` and lengthened to ``extend_epochs``) and the saved run's epochs (None
    for a fresh run, or a saved run without its ``config.yaml``)."""
    if resume:
        saved_epochs = load_config(folder / "config.yaml").epochs if (folder / "config.yaml").is_file() else None
        return config_for_resume(folder, config, extend_epochs=extend_epochs), saved_epochs
    if extend_epochs is not None:
        raise ConfigError("--extend-epochs lengthens a saved run: use it with --resume")
    if config is None:
        raise ConfigError("a fresh run needs a configuration")
    return config, None


def _run(
    config: Config,
    folder: Path,
    p: Parts,
    *,
    resume: bool,
    saved_epochs: int | None,
    extend_epochs: int | None,
    progress: bool,
    verbose: bool,
    max_steps: int | None,
) -> dict[str, Any]:
    """The run in its folder (made here): restore (or record the set-up), teacher check, epochs, summary."""
    folder.mkdir(parents=True, exist_ok=True)
    log = MetricLog(folder, enabled=p.ranks.main)
    progress, verbose = progress and p.ranks.main, verbose and p.ranks.main
    state = training_state(config, p)
    if resume:
        _restore(config, folder, p, state, log, saved_epochs=saved_epochs, extended=extend_epochs is not None)
    elif p.ranks.main:
        _record_setup(config, folder, p)
    teacher = teacher_metrics(config, folder, p, verbose=verbose)
    start_epoch, history = state.epoch, state.history  # the rows appended to history are the ones saved
    labels = label_losses(p.task.specs, config.task)
    warned = warned_before(history, p.balancer, labels)  # a resumed run's restored epochs
    if config.compile != "none":
        p.student.compile(mode=config.compile)
    try:
        for epoch in range(start_epoch, config.epochs):
            row = _train_epoch(config, p, epoch, log, progress=progress, max_steps=max_steps)
            p.scheduler.step()
            if evaluates(config, epoch):
                row.update(
                    _evaluate(config, p, p.student, p.ema, ("val", "test") if config.eval.test == "every" else ("val",))
                )
            history.append(row)
            log.write("metrics.jsonl", row, epoch)
            _save_epoch(config, folder, p, state, epoch)
            if not warned and p.ranks.main:
                warned = warn_on_floor(row, p.balancer, config.name, epoch, labels)
            if verbose:
                print(epoch_line(config, row, epoch), flush=True)
    finally:
        log.close()
    return _finish(config, folder, p, history, teacher)


def training_state(config: Config, p: Parts) -> TrainingState:
    """What a checkpoint of this run holds; with ``parallel=fsdp``, the student, its projectors
    and the optimizer as full state dicts gathered from their shards (:mod:`dtokd.train.sharding`)."""
    if config.parallel == "fsdp":
        student, projectors, optimizer = (
            FullState(p.student),
            FullState(p.task.projectors),
            FullOptimizerState(p.task, p.optimizer),
        )
        return TrainingState(student, projectors, optimizer, p.scheduler, p.balancer, p.scaler, p.ema)
    return TrainingState(p.student, p.task.projectors, p.optimizer, p.scheduler, p.balancer, p.scaler, p.ema)


def _restore(
    config: Config,
    folder: Path,
    p: Parts,
    state: TrainingState,
    log: MetricLog,
    *,
    saved_epochs: int | None,
    extended: bool,
) -> None:
    """A resumed run's state from ``checkpoint.pt`` (which must match ``p.identity``), its logs
    cut back to the epochs it saved; ``extended`` (``--extend-epochs``): the longer schedule's
    learning rate from the resumed epoch on, and the extension recorded in the folder."""
    state.load_state_dict(ckpt.load_checked(folder / "checkpoint.pt", p.identity))
    log.truncate_after(state.epoch)
    if extended:
        for group, base in zip(p.optimizer.param_groups, p.scheduler.base_lrs):
            group["lr"] = base * lr_factor(config.optim, p.scheduler.last_epoch, config.epochs)
        if p.ranks.main:
            record_extension(folder, config, saved_epochs or state.epoch, state.epoch)


def _record_setup(config: Config, folder: Path, p: Parts) -> None:
    """A fresh run's ``config.yaml`` and ``meta.json`` (versions, seed, commit, the device, where
    the training images are held, whether the balancer's checks are deferred)."""
    write_yaml(folder / "config.yaml", to_dict(config))
    meta = {
        **metadata(config.seed),
        "device": str(p.device),
        "training_images_on": str(p.data.train.device),
        "deferred_checks": p.balancer.deferred_checks,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def _save_epoch(config: Config, folder: Path, p: Parts, state: TrainingState, epoch: int) -> None:
    """After epoch ``epoch`` (0-based, its row last in ``state.history``): ``best.pt`` when it is
    the best evaluated so far, then the checkpoint (atomically, by the main process), then
    every process waits for the others."""
    if is_best(state.history, selection_metric(config)):  # the same history on every rank
        model = state.student.state_dict()  # every rank takes part where the student is sharded
        if p.ranks.main:
            ckpt.save_atomic({"model": model, "identity": p.identity, "epoch": epoch + 1}, folder / "best.pt")
    state.epoch = epoch + 1
    checkpoint = state.state_dict()
    if p.ranks.main:
        ckpt.save_atomic({"identity": p.identity, **checkpoint}, folder / "checkpoint.pt")
    p.ranks.barrier()


def _finish(
    config: Config, folder: Path, p: Parts, history: list[dict[str, Any]], teacher: dict[str, Any] | None
) -> dict[str, Any]:
    """The run's summary (after the end-of-run test of ``eval.test=end``), with the teacher's
    metrics where there is a teacher, written to ``summary.json`` by the main process."""
    final = final_test(config, folder, p) if config.eval.test == "end" and history else None
    summary = summarize(history, config, final)
    if teacher:
        summary["teacher"] = teacher
    if p.ranks.main:
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
