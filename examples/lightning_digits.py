"""DTO-KD inside Lightning: a 32-wide MLP distilled from a 256-wide one on scikit-learn's
digits, the balanced loss returned from ``training_step`` (Lightning does the backward).

    pip install 'dtokd[lightning]' scikit-learn
    python examples/lightning_digits.py --epochs 20
"""

from __future__ import annotations

import lightning
import torch
from digits import MLP, arguments, digits, report, trained_teacher

from dtokd.integrations.lightning import DistillationModule


def adam(params):  # a module-level function, not a lambda: the module stays picklable (ddp_spawn)
    return torch.optim.Adam(params, lr=3e-3)


def main() -> None:
    args = arguments(__doc__.splitlines()[0])
    (x, y), test = digits()
    teacher = trained_teacher(x, y, args.teacher_epochs)
    torch.manual_seed(1)
    module = DistillationModule(MLP(32), teacher, method="dto", engine="representation", optimizer=adam)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    trainer = lightning.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    weights = module.balancer.last_info.weights
    report("Lightning", teacher, module.student, test, weights)


if __name__ == "__main__":
    main()
