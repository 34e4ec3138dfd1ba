"""The dtokd command: train, distill, eval, report, bench, teacher-outputs, demo.

    dtokd train   CONFIG [key=value ...] [--out DIR] [--force]          a model alone (a teacher, or a baseline)
    dtokd distill CONFIG [key=value ...] [--balancer M] [--out DIR] [--force]
    dtokd distill --resume --out DIR [--extend-epochs N]                 continue a run as saved (train too)
    dtokd eval    RUN_DIR [--which best|last] [--device D] [--data-root R]
    dtokd report  RUN_DIR [RUN_DIR ...] --out DIR
    dtokd bench   MATRIX.yaml [--out DIR] [--parallel N]                pairs x methods x seeds, resumable
    dtokd teacher-outputs CONFIG [key=value ...] --out DIR --k K        an LM teacher's top-k, written once
    dtokd demo    [--out DIR] [--quick]

Errors are one line and exit with status 2 (DTOKD_DEBUG=1 shows the traceback); an interrupted
run (Ctrl-C) exits with 130 and prints the command that resumes it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dtokd.interrupts import stop_on_signals
from dtokd.train.config import Config, ConfigError, DataConfig, load_config
from dtokd.train.records import git_commit


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        help="YAML config file (see configs/); with --resume, optional: the run's saved config.yaml is used",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=0.1 epochs=20")
    parser.add_argument(
        "--out",
        help="run folder (default: runs/<name>, with -<method> added when --balancer changes the config's method)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint, with its saved configuration",
    )
    parser.add_argument(
        "--extend-epochs",
        type=int,
        metavar="N",
        help="with --resume: lengthen the run to N epochs "
        "(the schedule of an N-epoch run applies from the resumed epoch on)",
    )
    parser.add_argument("--force", action="store_true", help="replace a previous run's files in --out")
    parser.add_argument("--data-root", help="where the data set lives (same as data.root=...)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (the per-epoch lines stay)")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="build everything from the config and run two "
        "steps on a small generated image folder (teacher with random weights); writes nothing",
    )


def build_parser() -> argparse.ArgumentParser:
    from dtokd.balancing import BALANCERS

    parser = argparse.ArgumentParser(
        prog="dtokd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("train", help="train a model alone (a teacher, or a student baseline)"))
    distill = sub.add_parser("distill", help="distil a teacher into a student with a balancer")
    _common(distill)
    distill.add_argument(
        "--balancer",
        choices=BALANCERS,
        metavar="METHOD",
        help=f"balancing method (same as balancer.method=...): {', '.join(BALANCERS)}",
    )
    evaluate = sub.add_parser("eval", help="evaluate a run's model on its test split, with the run's data settings")
    evaluate.add_argument("run", help="run folder")
    evaluate.add_argument("--which", choices=("best", "last"), default="best")
    evaluate.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    evaluate.add_argument("--data-root", help="where the data set lives now, if it moved (data.root)")
    evaluate.add_argument("--quiet", action="store_true", help="print only the result")
    report = sub.add_parser("report", help="plots and a markdown table from run folders")
    report.add_argument("runs", nargs="+")
    report.add_argument("--out", required=True)
    _bench_arguments(sub.add_parser("bench", help="run (or finish) an accuracy matrix and aggregate it"))
    _teacher_outputs_arguments(
        sub.add_parser(
            "teacher-outputs",
            help="run a language-model teacher once over a run's training blocks and write its top-k outputs "
            "(for teacher.outputs=DIR)",
        )
    )
    summary = sub.add_parser(
        "summary", help="the recommended rule against KD and the student alone in every setting, from the records"
    )
    summary.add_argument("file", help="summary YAML (see benchmarks/summary.yaml)")
    summary.add_argument("--figure", help="write the figure (PNG) here")
    summary.add_argument("--write", nargs="+", default=[], metavar="PAGE", help="pages to put the table into")
    demo = sub.add_parser("demo", help="Fashion-MNIST: teacher, then a student alone / fixed KD / DTO-KD")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a tiny version for smoke tests")
    demo.add_argument("--data-root", help="where Fashion-MNIST lives")
    return parser


def _bench_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("matrix", help="matrix YAML (see configs/bench_fmnist.yaml)")
    bench.add_argument("--out", help="output folder (default: runs/<file stem>, with bench_ before it if it lacks one)")
    bench.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables and plots")
    bench.add_argument(
        "--dry-run",
        action="store_true",
        help="check every cell, say what a run would do (teachers, offline outputs, each cell's state); run nothing",
    )
    bench.add_argument("--progress", action="store_true", help="progress bars for every run")
    bench.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="run N cells at once, one process each, on the same device (default 1)",
    )
    bench.add_argument("--pairs", nargs="+", metavar="PAIR", help="run only these pairs' cells")
    bench.add_argument("--methods", nargs="+", metavar="METHOD", help="run only these methods' cells")
    bench.add_argument("--seeds", nargs="+", type=int, metavar="SEED", help="run only these seeds' cells")
    bench.add_argument(
        "--stop-grace",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM/SIGHUP, how long to wait for the cells to stop before killing "
        "them (default 60; checkpoints are atomic either way)",
    )
    bench.add_argument(
        "--cell",
        nargs=3,
        metavar=("PAIR", "METHOD", "SEED"),
        help="run only this cell (a cell that distils needs its teacher trained); used by --parallel",
    )


def _teacher_outputs_arguments(outputs: argparse.ArgumentParser) -> None:
    outputs.add_argument("config", help="the run's YAML config (its data, teacher and token-kd temperature)")
    outputs.add_argument("overrides", nargs="*", help="key=value overrides, as for dtokd distill")
    outputs.add_argument("--out", required=True, help="folder to write (refused if it holds anything)")
    outputs.add_argument("--k", type=int, required=True, help="tokens kept per position (the vocabulary: all)")
    outputs.add_argument("--dtype", default="float16", help="of the log-probabilities: float16, bfloat16, float32")
    outputs.add_argument("--batch-size", type=int, help="blocks per teacher forward (default: eval_batch_size)")
    outputs.add_argument("--overwrite", action="store_true", help="replace earlier outputs in --out")


def _run_training(args: argparse.Namespace, distill: bool) -> int:
    from dtokd.train import train

    overrides = list(args.overrides)
    if args.config is not None and "=" in args.config and not Path(args.config).exists():
        overrides.insert(0, args.config)  # `dtokd distill --resume --out DIR key=value`: no config file given
        args.config = None
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if distill and args.balancer:
        overrides.append(f"balancer.method={args.balancer}")
    if args.config is None:
        if not args.resume:
            raise ConfigError(f"dtokd {args.command} needs a CONFIG file (or --resume --out RUN_DIR)")
        if not args.out:
            raise ConfigError("--resume without a CONFIG needs --out RUN_DIR: the run whose saved config is used")
        config = load_config(Path(args.out) / "config.yaml", overrides) if overrides else None
    else:
        config = load_config(args.config, overrides)
    if config is not None:
        if distill and not config.teacher.name:
            raise ConfigError("dtokd distill needs a teacher: set teacher.name (and teacher.checkpoint)")
        if not distill and config.teacher.name:
            raise ConfigError("dtokd train trains a model alone; this config names a teacher: use dtokd distill")
    if args.dry_run:
        return _dry_run(config, args.command)
    folder = Path(args.out) if args.out else _default_folder(args, config)
    try:
        summary = train(
            config,
            folder,
            resume=args.resume,
            force=args.force,
            extend_epochs=args.extend_epochs,
            progress=not args.quiet,
            config_file=Path(args.config) if args.config else None,
        )
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            if (folder / "checkpoint.pt").is_file():
                resume = _resume_command(args.command, folder)
                print(f"\ninterrupted; the last checkpoint is kept. Resume with:\n  {resume}", file=sys.stderr)
            else:
                print("\ninterrupted before the first checkpoint; nothing was kept", file=sys.stderr)
        return 130
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(summary, indent=2))
        print(f"run folder: {folder}")
    return 0


def _dry_run(config, command: str) -> int:
    """Every part of ``config`` built (models, losses, balancer, optimizer, transforms, loaders)
    and two training steps plus an evaluation run on generated data: CIFAR's python format for
    ``cifar10``/``cifar100`` configs (all their classes), a 2-class ``synthetic-coco`` set for
    detection configs, generated text (the config's local tokenizer, else a small one trained on
    it; blocks of at most 16 tokens) for causal-lm configs, else a 4-class image folder at the
    config's image size. The teacher (and a student start, and a detector's backbone) get random
    weights of the same architecture; a causal LM named by a local folder is loaded from it.
    Nothing is written outside a temporary folder."""
    import tempfile

    from dtokd.train import train

    if config is None:
        raise ConfigError("--dry-run needs a CONFIG")
    cache = os.environ.get("DTOKD_CACHE")
    with tempfile.TemporaryDirectory(prefix="dtokd-dry-run-") as scratch_name:
        scratch = Path(scratch_name)
        os.environ["DTOKD_CACHE"] = str(scratch / "cache")  # the decoded-image cache too stays inside
        data, classes = _dry_run_data(config, scratch)
        dry = _dry_run_config(config, data, classes, scratch)
        try:
            summary = train(dry, scratch / "run", progress=False, verbose=False, max_steps=2)
        finally:
            if cache is None:
                os.environ.pop("DTOKD_CACHE", None)
            else:
                os.environ["DTOKD_CACHE"] = cache
        steps = (scratch / "run" / "steps.jsonl").read_text().splitlines()
    losses = {k: round(v, 4) for k, v in json.loads(steps[-1]).items() if k.startswith("loss/")}
    print(
        f"dtokd {command} --dry-run: {config.name}: student {config.student.name}, teacher {config.teacher.name}, "
        f"balancer {config.balancer.method}/{config.balancer.engine}; 2 steps ran, last losses {losses}; "
        f"evaluation ran (test {summary['metric']} {summary['last_test_' + summary['metric']]:.1f} on random data)"
    )
    return 0


def _dry_run_data(config: Config, scratch: Path) -> tuple[DataConfig, int]:
    """The data settings of a dry run of ``config``, on data its task kind generates in
    ``scratch`` (:attr:`dtokd.tasks.TaskKind.dry_run_data`), and the number of classes the
    models are built for."""
    import dataclasses

    from dtokd.tasks import task_kind

    changes, classes = task_kind(config.task).dry_run_data(config.data, scratch)
    return dataclasses.replace(config.data, **changes), classes


def _dry_run_config(config: Config, data: DataConfig, classes: int, scratch: Path) -> Config:
    """``config`` for a dry run on ``data`` (``classes`` classes): no weight files read (a
    teacher, but one named by a local causal-LM folder, gets random weights written to
    ``scratch``; one given as offline outputs is that live teacher), batches of 4, one epoch,
    every step logged, in one process (``parallel=fsdp`` built whole)."""
    import dataclasses

    import torch

    from dtokd.models import create_model
    from dtokd.models.causal_lm import names_a_local_folder

    teacher = dataclasses.replace(config.teacher, kwargs=_without_weight_files(config.teacher.kwargs), outputs=None)
    if teacher.name and not names_a_local_folder(teacher.name):  # a local LM folder brings its own weights
        weights = scratch / "teacher.pt"
        torch.save(create_model(teacher.name, classes, 3, config.data.image_size, teacher.kwargs).state_dict(), weights)
        teacher = dataclasses.replace(teacher, checkpoint=str(weights), key_map=None)
    student = dataclasses.replace(
        config.student, weights=None, key_map=None, kwargs=_without_weight_files(config.student.kwargs)
    )
    return dataclasses.replace(
        config,
        data=data,
        teacher=teacher,
        student=student,
        batch_size=4,
        eval_batch_size=4,
        epochs=1,
        log_every=1,
        parallel="ddp",  # one process: a sharded config is built whole
    )


def _without_weight_files(kwargs: dict) -> dict:
    """Model kwargs without the ones that name weight files (a detector's ``backbone_weights``):
    a dry run starts from random weights."""
    return {k: v for k, v in kwargs.items() if k != "backbone_weights"}


def _resume_command(command: str, folder: Path) -> str:
    """The command that resumes the run in ``folder``: under torchrun (``WORLD_SIZE`` > 1) through
    torchrun on as many processes per node (a run with ``parallel=fsdp`` cannot resume on one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        per_node = os.environ.get("LOCAL_WORLD_SIZE", str(world))
        return f"torchrun --nproc_per_node {per_node} -m dtokd.cli {command} --resume --out {folder}"
    return f"dtokd {command} --resume --out {folder}"


def _default_folder(args: argparse.Namespace, config) -> Path:
    """``runs/<name>``, with ``-<method>`` added when ``--balancer`` changed the file's method."""
    name = config.name
    if getattr(args, "balancer", None):
        in_file = load_config(args.config).balancer.method
        if in_file != args.balancer:
            name = f"{name}-{args.balancer}"
    return Path("runs") / name


def _evaluate(args: argparse.Namespace) -> int:
    from dtokd.models import create_model
    from dtokd.tasks import task_kind
    from dtokd.train.build import data_of
    from dtokd.train.checkpoint import load_checked
    from dtokd.train.distributed import resolve_device

    folder = Path(args.run)
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # no data-reading progress bars
    config = load_config(folder / "config.yaml", [f"data.root={args.data_root}"] if args.data_root else [])
    device = resolve_device(args.device)
    data = data_of(config, augment=False)
    model = create_model(
        config.student.name, data.num_classes, data.in_channels, data.image_size, config.student.kwargs
    ).to(device)
    path = folder / ("best.pt" if args.which == "best" else "checkpoint.pt")
    state = load_checked(path, {"student": config.student.name, "num_classes": data.num_classes})
    model.load_state_dict(state["model"] if "model" in state else state["student"])
    result = task_kind(config.task).evaluate(model, config.losses, data.test, config.eval_batch_size, device)
    print(json.dumps({"run": str(folder), "checkpoint": path.name, "epoch": state["epoch"], **result}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = None
    with stop_on_signals():  # from here on SIGINT, SIGTERM and SIGHUP stop the command cleanly
        try:
            parser = build_parser()
            args, extra = parser.parse_known_args(argv)
            if args.command in ("train", "distill", "teacher-outputs") and all(
                "=" in e and not e.startswith("-") for e in extra
            ):
                args.overrides += extra  # key=value overrides may also follow the options
            elif extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            git_commit()  # the commit this command records: the code it starts with (see records.git_commit)
            return _dispatch(args)
        except (ConfigError, ValueError, OSError) as error:  # bad input, missing or unwritable files
            if os.environ.get("DTOKD_DEBUG") == "1":
                raise
            print(f"dtokd {args.command if args else ''}: error: {_one_line(error)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as interrupt:  # before a command's own handling (imports, set-up)
            print(f"\ninterrupted ({interrupt}) while starting; nothing was written", file=sys.stderr)
            return 130


def _one_line(error: BaseException) -> str:
    """The error's message on one line: its first line, and the last line of a message that
    wraps another's (a data loader worker's error ends with the original one)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _bench(args: argparse.Namespace) -> int:
    stem = Path(args.matrix).stem
    out = Path(args.out or Path("runs") / (stem if stem.startswith("bench_") else f"bench_{stem}"))
    try:
        from dtokd.bench import CellsFailed, aggregate, load_matrix, run_cell, run_matrix, select_cells

        matrix = load_matrix(args.matrix)
        if args.dry_run and (args.cell or args.aggregate_only):
            given = "--cell" if args.cell else "--aggregate-only"
            raise ValueError(f"--dry-run and {given}: give one (the dry run plans the matrix's cells)")
        if args.cell:
            pair, method, seed = args.cell
            if not seed.lstrip("-").isdigit():
                raise ValueError(f"--cell SEED must be an integer, got {seed!r}")
            run_cell(matrix, out, pair, method, int(seed), progress=args.progress)
            return 0
        cells = select_cells(matrix, pairs=args.pairs, methods=args.methods, seeds=args.seeds)
        if args.dry_run:
            from dtokd.bench.plan import plan

            print("\n".join(plan(matrix, out, cells)))
            return 0
        try:
            path = (
                aggregate(matrix, out)
                if args.aggregate_only
                else run_matrix(
                    matrix,
                    out,
                    progress=args.progress,
                    parallel=args.parallel,
                    matrix_path=Path(args.matrix),
                    cells=cells,
                    stop_grace=args.stop_grace,
                )
            )
        except CellsFailed as error:
            print(f"dtokd bench: {error}", file=sys.stderr)
            return 1
    except KeyboardInterrupt as interrupt:
        if args.cell:  # a cell of a parallel bench: the bench says how to finish
            print(f"\ninterrupted ({interrupt}); the cell keeps its last checkpoint", file=sys.stderr)
        else:
            selection = "".join(
                f" --{name} {' '.join(map(str, values))}"
                for name, values in (("pairs", args.pairs), ("methods", args.methods), ("seeds", args.seeds))
                if values
            )
            print(
                f"\ninterrupted ({interrupt}); every cell keeps its last checkpoint. Finish the matrix with:\n"
                f"  dtokd bench {args.matrix} --out {out} --parallel {args.parallel}{selection}",
                file=sys.stderr,
            )
        return 130
    print(f"results: {path}")
    return 0


def _teacher_outputs(args: argparse.Namespace) -> int:
    from dtokd.train.offline_outputs import write_run_teacher_outputs

    config = load_config(args.config, args.overrides)

    def progress(done: int, total: int) -> None:
        print(f"teacher outputs: {done}/{total} blocks written", file=sys.stderr, flush=True)

    manifest = write_run_teacher_outputs(
        config,
        Path(args.out),
        k=args.k,
        dtype=args.dtype,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        progress=progress,
    )
    tokens = manifest.num_blocks * manifest.block_length
    size = sum(shard.bytes for shard in manifest.shards)
    print(
        f"teacher outputs: {args.out}: {manifest.num_blocks} blocks x {manifest.block_length} tokens, k={manifest.k}, "
        f"T={manifest.temperature}, {manifest.dtype}; {size / 2**20:.1f} MiB ({size / tokens:.0f} bytes per token); "
        f"use teacher.outputs={args.out}"
    )
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("train", "distill"):
        return _run_training(args, args.command == "distill")
    if args.command == "eval":
        return _evaluate(args)
    if args.command == "report":
        from dtokd.report import report

        print(f"report: {report(args.runs, args.out)}")
        return 0
    if args.command == "bench":
        return _bench(args)
    if args.command == "teacher-outputs":
        return _teacher_outputs(args)
    if args.command == "summary":
        from dtokd.bench.summary import write_summary

        print(write_summary(args.file, args.figure, args.write), end="")
        return 0
    from dtokd.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, data_root=args.data_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
