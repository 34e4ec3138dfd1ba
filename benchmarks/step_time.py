"""Step time and peak memory of every balancing engine against plain fixed-weight KD.

One training step = teacher forward (no grad) + student forward + backward + optimizer step, on
a fixed random batch (timing does not depend on the data). Two workloads: ``cifar-resnet``
(ResNet-56 -> ResNet-20 on 32x32 images, SGD, KD at T 4 with 0.9 / 0.1) and ``lm-stdlib`` (the
language-model evidence's pair, ``configs/lm/stdlib_distill.yaml``: a 4x256 Llama teacher -> a
2x128 student, vocabulary 2,048, blocks of 128 tokens, AdamW, the token-level forward KL and the
next-token cross-entropy of :func:`dtokd.integrations.common.causal_lm_losses`, fixed 0.5 /
0.5). Methods run interleaved, round after round, in one process; the figure per method is the
median step time after warm-up, and the ratio to plain KD is taken from the same run. ``--timing
per-step`` (default) waits for the device before and after every step; ``--timing back-to-back``
times ``--steps`` consecutive steps with one wait at the end (a training loop, where the host
queues the next step while the device runs this one: a step that waits for the device mid-way
loses that overlap). Peak memory is measured per method in a fresh subprocess as the growth of
the peak resident set over the set-up (CPU) or ``torch.cuda.max_memory_allocated`` (GPU).

    python benchmarks/step_time.py                                  # ResNet-56 -> ResNet-20, batch 128, CPU
    python benchmarks/step_time.py --rounds 1 --steps 2 --no-memory  # a short smoke run
    python benchmarks/step_time.py --device cuda --batch 256 --amp bf16 \
        --images ../shared/data/cifar10-jpeg.tar.gz --methods core   # the GPU comparison (scale-out issue)
    python benchmarks/step_time.py --workload lm-stdlib --methods core   # the causal-LM pair, batch 32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from dtokd import make_balancer
from dtokd.models.cifar_resnet import cifar_resnet
from dtokd.train.records import git_commit, machine

RESULTS = Path(__file__).parent / "results"
LM_CONFIG = Path(__file__).parent.parent / "configs" / "lm" / "stdlib_distill.yaml"


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, 1),
            F.softmax(teacher_logits / temperature, 1),
            reduction="batchmean",
        )
        * temperature**2
    )


class Workload:
    """A teacher, a student, its optimizer and a fixed batch ``x``; :meth:`losses` runs the
    teacher (no grad) and the student on ``x`` and returns the two distillation losses."""

    device: str
    amp: torch.dtype | None
    teacher: torch.nn.Module
    student: torch.nn.Module
    x: torch.Tensor
    _teacher_logits: torch.Tensor

    def loss_terms(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def losses(
        self, student: torch.nn.Module | None = None, reuse_teacher: bool = False
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``{"distill", "task"}`` and the student's logits; ``reuse_teacher``: the teacher's
        logits of the previous call (the same batch), as the pipeline's same-batch update does."""
        device_type = torch.device(self.device).type
        with torch.autocast(device_type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
            if not reuse_teacher:
                with torch.no_grad():
                    self._teacher_logits = self.teacher(self.x)
            logits = (student or self.student)(self.x)
            return self.loss_terms(logits.float(), self._teacher_logits.float()), logits


class ImageSetup(Workload):
    """ResNet-56 -> ResNet-20 on a batch of 32x32 images (random, or the first of ``images``)."""

    title = "CIFAR ResNet-56 teacher -> ResNet-20 student, 32x32 inputs"
    unit = "images"
    fixed = (0.9, 0.1)
    default_batch = 128

    def __init__(self, batch: int, device: str, amp: str = "none", images: str | None = None, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.device = device
        self.amp = {"none": None, "bf16": torch.bfloat16}[amp]
        self.teacher = cifar_resnet(56).to(device).eval()
        self.student = cifar_resnet(20).to(device).train()
        self.params = list(self.student.parameters())
        self.last_block = list(self.student.stages[-1][-1].parameters()) + list(self.student.head.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=0.01, momentum=0.9)
        if images:
            from dtokd.data import build_data

            data = build_data("image-folder", images, val_fraction=0.0, augment=True)
            x, y = data.train.__getitems__(list(range(batch)))
            self.x, self.y = x.to(device), y.to(device)
        else:
            self.x = torch.randn(batch, 3, 32, 32, device=device)
            self.y = torch.randint(0, 10, (batch,), device=device)

    def loss_terms(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"distill": kd_loss(logits, teacher_logits), "task": F.cross_entropy(logits, self.y)}


class LanguageModelSetup(Workload):
    """The causal-LM pair of :data:`LM_CONFIG` (its models, vocabulary, block length, optimizer
    and distillation loss), freshly initialised, on a batch of random token ids (the labels are
    the inputs, as for a Hugging Face causal LM)."""

    title = "causal LM, Llama 4x256 teacher -> 2x128 student (configs/lm/stdlib_distill.yaml), 128 tokens"
    unit = "sequences"
    fixed = (0.5, 0.5)
    default_batch = 32

    def __init__(self, batch: int, device: str, amp: str = "none", images: str | None = None, seed: int = 0) -> None:
        from dtokd.integrations.common import causal_lm_losses
        from dtokd.models import create_model
        from dtokd.train import load_config

        if images:
            raise SystemExit("--images is for the cifar-resnet workload")
        config = load_config(LM_CONFIG)
        vocab, block = config.data.text["vocab_size"], config.data.text["block_size"]
        torch.manual_seed(seed)
        self.device = device
        self.amp = {"none": None, "bf16": torch.bfloat16}[amp]
        self.teacher = create_model(config.teacher.name, vocab, kwargs=config.teacher.kwargs).to(device).eval()
        self.student = create_model(config.student.name, vocab, kwargs=config.student.kwargs).to(device).train()
        self.params = list(self.student.parameters())
        layers = self.student.model.model
        self.last_block = list(layers.layers[-1].parameters()) + list(layers.norm.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=config.optim.lr, weight_decay=config.optim.weight_decay)
        distill = config.losses["distill"]
        self.loss_fn = causal_lm_losses(distill["divergence"], distill["temperature"])
        self.x = torch.randint(0, vocab, (batch, block), device=device)

    def loss_terms(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.loss_fn(logits, teacher_logits, self.x)


WORKLOADS = {"cifar-resnet": ImageSetup, "lm-stdlib": LanguageModelSetup}


def make_setup(args: argparse.Namespace) -> Workload:
    return WORKLOADS[args.workload](args.batch, args.device, args.amp, args.images)


def plain_name(fixed: tuple[float, float]) -> str:
    """The baseline row: plain KD at a workload's fixed weights (distill, task)."""
    return f"plain KD (fixed {fixed[0]}/{fixed[1]})"


CORE = (
    "two-backward floor",
    "DTO exact",
    "DTO representation (logits)",
    "DTO amortized, next-step",
    "DTO amortized, same-batch",
    "DTO amortized, same-batch, teacher reused",
    "anchored exact (task)",
    "cross-batch exact (task)",
    "DTO amortized gated, same-batch",
)
"""The core rows, after the baseline (:func:`plain_name`)."""
DEFERRED = (
    "fixed via balancer, deferred checks",
    "DTO representation, deferred checks",
    "DTO amortized, next-step, deferred checks",
)


def make_steps(s: Workload) -> dict[str, Callable[[], None]]:
    """Every method's full training step, by name."""
    a, b = s.fixed

    def plain_kd() -> None:
        s.optimizer.zero_grad(set_to_none=True)
        losses, _ = s.losses()
        (a * losses["distill"] + b * losses["task"]).backward()
        s.optimizer.step()

    def two_backward_floor() -> None:
        s.optimizer.zero_grad(set_to_none=True)
        losses, _ = s.losses()
        total = a * losses["distill"] + b * losses["task"]
        total.backward(retain_graph=True)
        total.backward()
        s.optimizer.step()

    def balanced(method: str, reuse_teacher: bool = False, **options) -> Callable[[], None]:
        """A step through ``make_balancer(method, **options)``; the amortized rule's same-batch
        update re-evaluates the losses after the step, running the teacher again unless
        ``reuse_teacher`` (the pipeline's way: a frozen teacher gives the same logits)."""
        balancer = make_balancer(method, s.params, **options)
        representation = options.get("engine") == "representation"

        def step() -> None:
            s.optimizer.zero_grad(set_to_none=True)
            losses, logits = s.losses()
            balancer.backward(losses, representation=logits if representation else None)
            s.optimizer.step()
            if method.startswith("dto-amortized") and options.get("update", "same-batch") == "same-batch":
                with torch.no_grad():
                    after, _ = s.losses(reuse_teacher=reuse_teacher)
                balancer.update(after)

        return step

    def torchjd_step(aggregator_name: str) -> Callable[[], None]:
        from torchjd import aggregation, autojac

        aggregator = getattr(aggregation, aggregator_name)()

        def step() -> None:
            s.optimizer.zero_grad(set_to_none=True)
            losses, _ = s.losses()
            autojac.backward([losses["distill"], losses["task"]], inputs=s.params)
            autojac.jac_to_grad(s.params, aggregator)
            s.optimizer.step()

        return step

    def torchjd_autogram_dto() -> Callable[[], None]:
        """TorchJD's autogram engine (the Gramian without the Jacobian) for the Gram of the log
        losses, our DTO rule on it, then one backward of the weighted log losses: the same
        update as "DTO exact", with TorchJD's engine in place of ours."""
        import copy

        from torchjd.autogram import Engine

        from dtokd import weights

        student = copy.deepcopy(s.student)  # its own copy: the engine's hooks see every forward pass
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        engine = Engine(student, batch_dim=None)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            losses, _ = s.losses(student)
            log_losses = torch.stack([losses["distill"], losses["task"]]).log()
            gram = engine.compute_gramian(log_losses)
            pi = weights("dto", gram.detach().to(torch.float64).cpu())
            log_losses.backward(pi.to(log_losses.device, log_losses.dtype))
            optimizer.step()

        return step

    steps: dict[str, Callable[[], None]] = {
        plain_name(s.fixed): plain_kd,
        "two-backward floor": two_backward_floor,
        "fixed via balancer": balanced("fixed", weights=[a, b]),
        "DTO exact": balanced("dto"),
        "DTO exact, batched VJP": balanced("dto", batched=True),
        "DTO subset (last block + head)": balanced("dto", engine="subset", gram_params=s.last_block),
        "DTO representation (logits)": balanced("dto", engine="representation"),
        "DTO representation, batched VJP": balanced("dto", engine="representation", batched=True),
        "DTO amortized, next-step": balanced("dto-amortized", update="next-step"),
        "DTO amortized, same-batch": balanced("dto-amortized", update="same-batch"),
        "DTO amortized, same-batch, teacher reused": balanced("dto-amortized", True, update="same-batch"),
        # per-objective gradients every 10th step and the one after: time it back to back over whole periods
        "DTO amortized gated, same-batch": balanced("dto-amortized-gated", update="same-batch"),
        "MGDA exact (ours)": balanced("mgda"),
        "UPGrad exact (ours)": balanced("upgrad"),
        "anchored exact (task)": balanced("anchored", anchor="task"),
        "cross-batch exact (task)": balanced("cross-batch", task="task"),
    }
    try:
        steps["fixed via balancer, deferred checks"] = balanced("fixed", weights=[a, b], deferred_checks=True)
        steps["DTO representation, deferred checks"] = balanced("dto", engine="representation", deferred_checks=True)
        steps["DTO amortized, next-step, deferred checks"] = balanced(
            "dto-amortized", update="next-step", deferred_checks=True
        )
    except (TypeError, ValueError):
        print("this version of dtokd has no deferred_checks: its rows are left out", file=sys.stderr)
    try:
        steps["TorchJD MGDA (autojac)"] = torchjd_step("MGDA")
        steps["TorchJD UPGrad (autojac)"] = torchjd_step("UPGrad")
        steps["DTO on TorchJD autogram's Gramian"] = torchjd_autogram_dto()
    except ImportError:
        print("torchjd is not installed: its rows are left out", file=sys.stderr)
    return steps


def interquartile_range(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    quartiles = statistics.quantiles(values, n=4)
    return quartiles[2] - quartiles[0]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def selected_steps(s: Workload, methods: str) -> dict[str, Callable[[], None]]:
    steps = make_steps(s)
    if methods == "all":
        return steps
    wanted = (
        (*CORE, *(d for d in DEFERRED if d in steps))
        if methods == "core"
        else tuple(m.strip() for m in methods.split(";"))
    )
    unknown = [m for m in wanted if m not in steps]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; available: {list(steps)} (or 'all', 'core')")
    baselines = (plain_name(s.fixed), "two-backward floor")  # every ratio is against them: always timed
    return {m: steps[m] for m in dict.fromkeys((*baselines, *wanted))}


def time_steps(args: argparse.Namespace) -> dict[str, list[float]]:
    steps = selected_steps(make_setup(args), args.methods)
    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
    sync(args.device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            if args.timing == "back-to-back":
                sync(args.device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                sync(args.device)
                times[name].append((time.perf_counter() - start) / args.steps)
                continue
            for _ in range(args.steps):
                sync(args.device)
                start = time.perf_counter()
                step()
                sync(args.device)
                times[name].append(time.perf_counter() - start)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return times


def host_syncs_per_step(step: Callable[[], None]) -> int:
    """Host synchronisations of one step, counted on the second step (one-off set-up left out)."""
    from dtokd.profiling import host_syncs  # here, so that the script also times older versions of dtokd

    step()
    return host_syncs(step)


def waits_mid_step(step: Callable[[], None]) -> bool | None:
    """Whether a step returns only after the device finished the work queued before it (None
    where this version of dtokd has no ``waits_for_device``)."""
    try:
        from dtokd.profiling import waits_for_device
    except ImportError:
        return None
    step()
    return waits_for_device(step)


def kernels_per_step(step: Callable[[], None]) -> int:
    """How many GPU kernels one step launches (the PyTorch profiler's CUDA kernel events)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def peak_memory_of(args: argparse.Namespace, method: str) -> float:
    """MB of peak memory the step adds on top of the set-up, in a fresh process."""
    command = [
        sys.executable,
        __file__,
        "--memory-of",
        method,
        "--workload",
        args.workload,
        "--batch",
        str(args.batch),
        "--device",
        args.device,
        "--amp",
        args.amp,
    ] + (["--images", args.images] if args.images else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(output.strip().splitlines()[-1])


def measure_memory(args: argparse.Namespace) -> None:
    step = make_steps(make_setup(args))[args.memory_of]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        print((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    base = peak_resident_kb()
    for _ in range(3):
        step()
    print((peak_resident_kb() - base) / 1024)


def peak_resident_kb() -> int:
    """VmHWM: this process image's peak resident set (unlike ru_maxrss, not inherited at fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no VmHWM line (not Linux?)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="cifar-resnet")
    parser.add_argument("--batch", type=int, default=None, help="default: 128 images, or 32 sequences")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timing", choices=("per-step", "back-to-back"), default="per-step")
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument(
        "--images", default=None, help="an image folder / .tar.gz to take the batch from (default: random)"
    )
    parser.add_argument("--methods", default="all", help="'all', 'core', or method names separated by ';'")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--output", default=None, help="results stem (default: benchmarks/results/step_time_<device>)")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.batch = args.batch or WORKLOADS[args.workload].default_batch
    if args.memory_of:
        measure_memory(args)
        return
    times = time_steps(args)
    workload = WORKLOADS[args.workload]
    syncs, waits, kernels = {}, {}, {}
    if args.device.startswith("cuda"):
        steps = selected_steps(make_setup(args), args.methods)
        syncs = {name: host_syncs_per_step(step) for name, step in steps.items()}
        waits = {name: waits_mid_step(step) for name, step in steps.items()}
        kernels = {name: kernels_per_step(step) for name, step in steps.items()}
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    plain = medians[plain_name(workload.fixed)]
    floor = medians["two-backward floor"]
    rows = []
    for name, median in medians.items():
        memory = None if args.no_memory else peak_memory_of(args, name)
        rows.append(
            {
                "method": name,
                "median_s": median,
                "iqr_s": interquartile_range(times[name]),
                "vs_plain_kd": median / plain,
                "vs_two_backward_floor": median / floor,
                f"{workload.unit}_per_s": args.batch / median,
                "peak_extra_mb": memory,
                "host_syncs_per_step": syncs.get(name),
                "waits_for_device": waits.get(name),
                "gpu_kernels_per_step": kernels.get(name),
                "samples": len(times[name]),
            }
        )
    command = "python " + " ".join(sys.argv)
    record = {
        "benchmark": f"step time, {workload.title}",
        "batch": args.batch,
        "device": args.device,
        "amp": args.amp,
        "images": args.images or "random",
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "timing": args.timing,
        "command": command,
        "commit": git_commit()[:10],
        "machine": f"{machine()}; torch {torch.__version__}; Python {platform.python_version()}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "rows": rows,
    }
    prefix = "step_time" if args.workload == "cifar-resnet" else "step_time_lm"
    stem = Path(args.output) if args.output else RESULTS / f"{prefix}_{args.device.split(':')[0]}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# {record['benchmark']}",
        "",
        f"- command: `{command}`",
        f"- commit: `{record['commit']}`",
        f"- machine: {record['machine']}",
        f"- date: {record['date']}; batch {args.batch}; amp {args.amp}; inputs {record['images']}; "
        f"median of {args.rounds} rounds x {args.steps} steps after "
        f"{args.warmup} warm-up steps per method, methods interleaved; timing {args.timing}",
        "",
        f"| method | median step (ms) | IQR (ms) | {workload.unit}/s | / plain KD | / two-backward floor "
        "| peak extra memory (MB) | host syncs / step | waits for the device | GPU kernels / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        memory = "-" if row["peak_extra_mb"] is None else f"{row['peak_extra_mb']:.0f}"
        lines.append(
            f"| {row['method']} | {1000 * row['median_s']:.1f} | {1000 * row['iqr_s']:.1f} "
            f"| {row[f'{workload.unit}_per_s']:.0f} | "
            f"{row['vs_plain_kd']:.3f} | {row['vs_two_backward_floor']:.3f} | {memory} | "
            f"{'-' if row['host_syncs_per_step'] is None else row['host_syncs_per_step']} | "
            f"{'-' if row['waits_for_device'] is None else ('yes' if row['waits_for_device'] else 'no')} | "
            f"{'-' if row['gpu_kernels_per_step'] is None else row['gpu_kernels_per_step']} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
