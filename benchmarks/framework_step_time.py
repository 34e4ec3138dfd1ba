"""Step time of dtokd's balanced loss inside Lightning and the Hugging Face Trainer, against the
same framework's fixed-weight KD loss (``0.9 KD + 0.1 CE`` written by hand, as users do).

ResNet-56 -> ResNet-20 (CIFAR shapes) on one fixed random batch, SGD, CPU. Each row is a short
fit of ``--steps`` optimizer steps in its framework; a callback times every step (batch start
to batch end: forward, the balancer, the framework's backward, the optimizer step). Rows run
interleaved, round after round, in one process, each round starting one row later (no row
always follows the same one); a row's figure is the median over its steps
after the first ``--warmup`` of each fit, and its ratio is to its own framework's hand-written
row of the same run.

    python benchmarks/framework_step_time.py                       # both frameworks, 3 rounds
    python benchmarks/framework_step_time.py --rounds 1 --steps 3  # a short smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from dtokd.integrations.common import default_losses
from dtokd.models.cifar_resnet import cifar_resnet
from dtokd.train.records import git_commit, machine

RESULTS = Path(__file__).parent / "results"
ROWS = {  # row name -> (framework, method, engine, balancer options); method None: the hand-written loss
    "Lightning: hand-written 0.9 KD + 0.1 CE": ("lightning", None, None, {}),
    "Lightning: DTO representation": ("lightning", "dto", "representation", {}),
    "Lightning: DTO amortized, next-step": ("lightning", "dto-amortized", "exact", {"update": "next-step"}),
    "Lightning: DTO exact": ("lightning", "dto", "exact", {}),
    "HF Trainer: hand-written 0.9 KD + 0.1 CE": ("transformers", None, None, {}),
    "HF Trainer: DTO representation": ("transformers", "dto", "representation", {}),
    "HF Trainer: DTO amortized, next-step": ("transformers", "dto-amortized", "exact", {"update": "next-step"}),
    "HF Trainer: DTO exact": ("transformers", "dto", "exact", {}),
}


def fixed_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    losses = default_losses()(student_logits, teacher_logits, y)
    return 0.9 * losses["distill"] + 0.1 * losses["task"]


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


class Batches(torch.utils.data.Dataset):
    """The same batch ``steps`` times (one item = one whole batch; timing does not depend on data)."""

    def __init__(self, batch: int, steps: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y, self.steps = (
            torch.randn(batch, 3, 32, 32, generator=g),
            torch.randint(0, 10, (batch,), generator=g),
            steps,
        )

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x, "labels": self.y}


def unbatch(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return items[0]


def lightning_fit(method: str | None, engine: str | None, options: dict, batch: int, steps: int) -> list[float]:
    import lightning

    from dtokd.integrations.lightning import DistillationModule

    torch.manual_seed(0)
    student, teacher = cifar_resnet(20), cifar_resnet(56).eval()
    if method is None:

        class HandWritten(lightning.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.student = student

            def training_step(self, item, index):
                with torch.no_grad():
                    t = teacher(item["x"])
                return fixed_kd(self.student(item["x"]), t, item["labels"])

            def configure_optimizers(self):
                return sgd(self.student.parameters())

        module = HandWritten()
    else:

        class Unpack(DistillationModule):
            def training_step(self, item, index):
                return super().training_step((item["x"], item["labels"]), index)

        module = Unpack(student, teacher, method=method, engine=engine, balancer_options=options, optimizer=sgd)
    times: list[float] = []

    class Clock(lightning.Callback):
        def on_train_batch_start(self, *args) -> None:
            self.began = time.perf_counter()

        def on_train_batch_end(self, *args) -> None:
            times.append(time.perf_counter() - self.began)

    loader = torch.utils.data.DataLoader(Batches(batch, steps), batch_size=1, collate_fn=unbatch)
    with tempfile.TemporaryDirectory() as root:
        trainer = lightning.Trainer(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            callbacks=[Clock()],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
        )
        trainer.fit(module, train_dataloaders=loader)
    return times


def transformers_fit(method: str | None, engine: str | None, options: dict, batch: int, steps: int) -> list[float]:
    import transformers

    from dtokd.integrations.transformers import DistillationTrainer

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self, depth: int) -> None:
            super().__init__()
            self.net = cifar_resnet(depth)

        def forward(self, x):
            return self.net(x)

    student, teacher = Net(20), Net(56).eval()
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs) -> None:
            self.began = time.perf_counter()

        def on_step_end(self, *args, **kwargs) -> None:
            times.append(time.perf_counter() - self.began)

    class HandWritten(transformers.Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                t = teacher(inputs["x"])
            return fixed_kd(model(inputs["x"]), t, inputs["labels"])

    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=1,
            learning_rate=0.01,
            optim="sgd",
            lr_scheduler_type="constant",
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=10**6,
            dataloader_num_workers=0,
            label_names=["labels"],
        )
        common = dict(
            model=student, args=args, train_dataset=Batches(batch, steps), data_collator=unbatch, callbacks=[Clock()]
        )
        if method is None:
            trainer = HandWritten(**common)
        else:
            trainer = DistillationTrainer(
                teacher=teacher, method=method, engine=engine, balancer_options=options, **common
            )
        trainer.train()
    return times


FITS: dict[str, Callable[..., list[float]]] = {"lightning": lightning_fit, "transformers": transformers_fit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per fit")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each fit left out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "framework_step_time_cpu")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    commit = git_commit()  # the code that runs, read before it runs
    timed: dict[str, list[float]] = {name: [] for name in ROWS}
    names = list(ROWS)
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:  # each round starts one row later
            framework, method, engine, options = ROWS[name]
            times = FITS[framework](method, engine, options, args.batch, args.steps)
            timed[name] += times[args.warmup :]
            print(
                f"[round {round_ + 1}/{args.rounds}] {name}: "
                f"median {statistics.median(times[args.warmup :]):.3f} s/step",
                flush=True,
            )
    medians = {name: statistics.median(v) for name, v in timed.items()}
    baseline = {ROWS[name][0]: medians[name] for name in ROWS if ROWS[name][1] is None}
    record = {
        "command": "python " + " ".join(sys.argv),
        "commit": commit,
        "machine": machine(),
        "torch": torch.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "rows": {
            name: {
                "median_s": medians[name],
                "steps_timed": len(timed[name]),
                "ratio_to_hand_written": medians[name] / baseline[ROWS[name][0]],
            }
            for name in ROWS
        },
    }
    lines = [
        "# Step time of the balanced loss inside Lightning and the HF Trainer",
        "",
        f"- command: `{record['command']}`",
        f"- commit `{record['commit'][:10]}`; {record['machine']}; torch {torch.__version__}",
        f"- {record['date']}; CPU; ResNet-56 -> ResNet-20, batch {args.batch}, SGD; "
        "median seconds per optimizer step over "
        f"{args.rounds} interleaved, rotated round(s) x {args.steps - args.warmup} timed steps",
        "",
        "| row | s / step (median) | time / the framework's hand-written fixed KD |",
        "|---|---|---|",
        *[
            f"| {name} | {row['median_s']:.3f} | {row['ratio_to_hand_written']:.3f} |"
            for name, row in record["rows"].items()
        ],
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
