"""DTO-KD inside the Hugging Face Trainer: a 32-wide MLP distilled from a 256-wide one on
scikit-learn's digits; ``compute_loss`` returns the balanced loss and ``accelerate`` does the
backward (mixed precision, accumulation, DDP as configured in ``TrainingArguments``).

    pip install 'dtokd[transformers]' scikit-learn
    python examples/hf_trainer_digits.py --epochs 20
"""

from __future__ import annotations

import tempfile

import torch
import transformers
from digits import MLP, arguments, digits, report, trained_teacher

from dtokd.integrations.transformers import DistillationTrainer


class Digits(torch.utils.data.Dataset):
    """Items as the Trainer wants them: the model's keyword inputs and ``labels``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    (x, y), test = digits()
    teacher = trained_teacher(x, y, args.teacher_epochs)
    torch.manual_seed(1)
    student = MLP(32)
    with tempfile.TemporaryDirectory() as out:
        settings = transformers.TrainingArguments(
            output_dir=out,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=64,
            learning_rate=3e-3,
            lr_scheduler_type="constant",
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=50,
            disable_tqdm=True,
        )
        trainer = DistillationTrainer(
            model=student,
            teacher=teacher,
            method="dto",
            engine="representation",
            args=settings,
            train_dataset=Digits(x, y),
        )
        trainer.train()
    weights = trainer.balancer.last_info.weights
    report("the HF Trainer", teacher, student, test, weights)


if __name__ == "__main__":
    main()
