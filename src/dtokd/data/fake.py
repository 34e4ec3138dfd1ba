"""A small generated image folder in the ImageNet layout, for dry runs, tests and loader
benchmarks: each class a colour, each image that colour with noise, saved as JPEG."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_fake_image_folder(root: Path, *, classes: int = 4, per_class: int | dict[str, int] = 4,
                            image_size: int = 32, splits: tuple[str, ...] = ("train", "val"), seed: int = 0) -> Path:
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
