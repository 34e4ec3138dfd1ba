"""Each task kind's data for a dry run (``dtokd train|distill --dry-run``): generated in a scratch
folder, small, at the config's shapes: ``(changes to the data settings, classes the models are
built for)``. Read through :attr:`dtokd.tasks.TaskKind.dry_run_data`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtokd.data import build_data
from dtokd.data.fake import write_fake_cifar, write_fake_image_folder, write_fake_text


def classification_dry_run_data(data: Any, scratch: Path) -> tuple[dict[str, Any], int]:
    """CIFAR's python format for ``cifar10``/``cifar100`` (all their classes), else a 4-class
    image folder at the config's image size (streamed where the config streams)."""
    if data.name in ("cifar10", "cifar100"):
        classes = 10 if data.name == "cifar10" else 100
        root = write_fake_cifar(scratch / "cifar", classes, per_class=2)
        return {"root": str(root), "val_fraction": 0.25, "limit_train": None}, classes
    classes = 4
    root = write_fake_image_folder(
        scratch / "images", classes=classes, per_class={"train": 4, "val": 1}, image_size=data.image_size
    )
    streamed = data.name == "image-folder-stream"
    return {
        "name": "image-folder-stream" if streamed else "image-folder",
        "root": str(root),
        "val_fraction": 0.25,
        "limit_train": None,
        "workers": 0 if streamed else data.workers,
    }, classes


def detection_dry_run_data(data: Any, scratch: Path) -> tuple[dict[str, Any], int]:
    """A tiny generated COCO-format set (2 classes) at the config's image size."""
    classes = 2
    return {
        "name": "synthetic-coco",
        "root": None,
        "val_fraction": 0.25,
        "limit_train": None,
        "workers": 0,
        "synthetic": {"train_images": 8, "val_images": 2, "classes": classes},
    }, classes


def causal_lm_dry_run_data(data: Any, scratch: Path) -> tuple[dict[str, Any], int]:
    """Generated text (12 documents), the config's local tokenizer or a small one trained on it,
    blocks of at most 16 tokens; the classes are the tokenizer's vocabulary."""
    root = write_fake_text(scratch / "text")
    options = {**(data.text or {})}
    if options.get("tokenizer", "train") == "train":
        options["vocab_size"] = min(options.get("vocab_size", 300), 300)
    options.update(block_size=min(options.get("block_size", 16), 16), test_fraction=0.2)
    changes = {"root": str(root), "text": options, "val_fraction": 0.2, "limit_train": None}
    return changes, build_data("text", str(root), val_fraction=0.2, seed=0, text=options).num_classes
