"""Every Python example in the README and the documentation runs as written. An example leaves
some names to the reader (``student``, ``teacher``, ``loader``, ``optimizer``, ``kd_loss``,
``TrainingArguments``' other settings, ...): tiny stand-ins for them are defined here, and each
example must change the student's weights (it trained). Frameworks' own settings are narrowed
only to run on the CPU, quietly, for two steps."""

import copy
import functools
import re
import types
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import tiny_llamas

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
EXAMPLES = [
    (page.relative_to(ROOT).as_posix(), k, code)
    for page in PAGES
    for k, code in enumerate(BLOCK.findall(page.read_text()))
]


class MLP(nn.Module):
    """A classifier whose forward takes ``x`` (the keyword the Hugging Face Trainer passes)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Items(torch.utils.data.Dataset):
    """Batches' rows as the Hugging Face Trainer wants them: keyword inputs and ``labels``."""

    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    return (
        F.kl_div(
            F.log_softmax(logits / temperature, 1), F.softmax(teacher_logits / temperature, 1), reduction="batchmean"
        )
        * temperature**2
    )


def classification_names(tmp_path: Path) -> dict:
    torch.manual_seed(0)
    student, teacher = MLP(16), MLP(32).eval()
    x, y = torch.randn(48, 8), torch.randint(0, 4, (48,))
    loader = [(x[k : k + 16], y[k : k + 16]) for k in range(0, 48, 16)]
    return {
        "student": student,
        "teacher": teacher,
        "loader": loader,
        "train_loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16),
        "train_set": Items([{"x": a, "labels": b} for a, b in zip(x, y)]),
        "optimizer": torch.optim.SGD(student.parameters(), lr=0.1),
        "kd_loss": kd_loss,
        "ce": F.cross_entropy,
    }


def vit_names(tmp_path: Path) -> dict:
    """docs/recipes.md: a distilled ViT (class and distillation tokens) and a CNN teacher, 16 x 16 images."""
    from dtokd.models import create_model

    torch.manual_seed(0)
    student = create_model(
        "timm:deit_tiny_distilled_patch16_224",
        4,
        3,
        16,
        {"img_size": 16, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
    )
    teacher = create_model("timm:resnet10t", 4, 3, 16).eval()
    loader = [(torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))) for _ in range(2)]
    return {
        "student": student,
        "teacher": teacher,
        "loader": loader,
        "optimizer": torch.optim.SGD(student.parameters(), lr=0.1),
    }


def framework_names(tmp_path: Path) -> dict:
    """The frameworks' entry points, narrowed to two quiet CPU steps; tiny Llamas and their blocks."""
    names: dict = {}
    try:
        import lightning

        names["lightning"] = types.SimpleNamespace(
            Trainer=functools.partial(
                lightning.Trainer,
                max_steps=2,
                accelerator="cpu",
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
        )
    except ImportError:
        pass
    try:
        import transformers

        names["TrainingArguments"] = functools.partial(
            transformers.TrainingArguments,
            max_steps=2,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            per_device_train_batch_size=8,
        )
        names["student_lm"], names["teacher_lm"] = tiny_llamas()
        ids = torch.randint(0, 40, (16, 12), generator=torch.Generator().manual_seed(1))
        names["tokenized"] = Items([{"input_ids": row, "labels": row} for row in ids])
    except ImportError:
        pass
    return names


NEEDS = {"lightning": "lightning", "DistillationTrainer": "transformers", "timm": "timm"}


@pytest.mark.parametrize("page, index, code", EXAMPLES, ids=[f"{p}[{k}]" for p, k, _ in EXAMPLES])
def test_the_example_runs_as_written(page, index, code, tmp_path, monkeypatch):
    for word, module in NEEDS.items():
        if word in code:
            pytest.importorskip(module, reason=f"the example uses {module} (an optional extra)")
    monkeypatch.chdir(tmp_path)  # an example may write a run folder
    names = {"torch": torch, "nn": nn, "log": [].append}
    names.update(vit_names(tmp_path) if "TokenDistillationTask" in code else classification_names(tmp_path))
    names.update(framework_names(tmp_path))
    before = {key: copy.deepcopy(names[key].state_dict()) for key in ("student", "student_lm") if key in code}
    exec(compile(code, f"{page}[{index}]", "exec"), names)
    assert before, f"{page}[{index}] trains no student"
    for key, state in before.items():
        after = names[key].state_dict()
        assert any(not torch.equal(state[k], after[k]) for k in state), f"{page}[{index}]: {key} did not change"
