"""One Hugging Face Trainer distillation run, for tests/test_transformers_trainer.py to launch
under ``torchrun``: ``trainer_run.py OUT METHOD PER_DEVICE_BATCH STEPS``. Each process writes
its model's and balancer's state to ``OUT/rank<R>.pt``."""

import sys

import torch
from test_transformers_trainer import InOrder, Pairs, arguments, models


def main(out: str, method: str, batch: int, steps: int) -> None:
    student, teacher = models()
    options = {"update": "next-step"} if method == "dto-amortized" else {}
    trainer = InOrder(
        model=student,
        teacher=teacher,
        method=method,
        engine="representation",
        balancer_options=options,
        args=arguments(out, steps, per_device_train_batch_size=batch),
        train_dataset=Pairs(),
    )
    trainer.train()
    torch.save(
        {"model": trainer.model.state_dict(), "balancer": trainer.balancer.state_dict()},
        f"{out}/rank{trainer.args.process_index}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
