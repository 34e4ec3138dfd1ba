"""A small generated image folder in the ImageNet layout, for dry runs, tests and loader
benchmarks: each class a colour, each image that colour with noise, saved as JPEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_fake_image_folder(
    root: Path,
    *,
    classes: int = 4,
    per_class: int | dict[str, int] = 4,
    image_size: int = 32,
    splits: tuple[str, ...] = ("train", "val"),
    seed: int = 0,
) -> Path:
    """Write ``root/<split>/class<k>/<i>.jpg`` and return ``root``; ``per_class`` may differ by split."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(classes, 3))
    for split in splits:
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class[split] if isinstance(per_class, dict) else per_class):
                noise = rng.normal(0, 40, size=(image_size, image_size, 3))
                pixels = np.clip(colours[k] + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def write_fake_cifar(root: Path, num_classes: int, *, per_class: int = 1, seed: int = 0) -> Path:
    """Write generated data in CIFAR-10's (``cifar-10-batches-py``) or CIFAR-100's
    (``cifar-100-python``) python format under ``root`` (``per_class`` images per class and
    split, 32x32) and return ``root``."""
    import pickle

    rng = np.random.default_rng(seed)
    folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = b"labels" if num_classes == 10 else b"fine_labels"

    def batch() -> dict:
        labels = [k for k in range(num_classes) for _ in range(per_class)]
        data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
        return {b"data": data, label_key: labels}

    names = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if num_classes == 10 else (["train"], ["test"])
    for name in names[0] + names[1]:
        with open(folder / name, "wb") as f:
            pickle.dump(batch(), f)
    meta_name, key = ("batches.meta", b"label_names") if num_classes == 10 else ("meta", b"fine_label_names")
    with open(folder / meta_name, "wb") as f:
        pickle.dump({key: [f"class{k}".encode() for k in range(num_classes)]}, f)
    return root


def write_fake_text(root: Path, *, documents: int = 12, words: int = 300, seed: int = 0) -> Path:
    """Write ``root/doc<k>.txt``: seeded sequences of a small word list (Python keywords), for
    dry runs and tests of the language-model path; returns ``root``."""
    import keyword

    rng = np.random.default_rng(seed)
    vocabulary = keyword.kwlist
    root.mkdir(parents=True, exist_ok=True)
    for k in range(documents):
        chosen = rng.choice(len(vocabulary), size=words)
        (root / f"doc{k}.txt").write_text(" ".join(vocabulary[i] for i in chosen) + "\n")
    return root
