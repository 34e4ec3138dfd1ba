"""A synthetic detection data set in COCO format, generated from a seed (no download).

Each image is a textured background (smooth random colour field plus stripes) with 1 to
``max_objects`` filled shapes of random colour; the shape is the class (``rectangle``,
``ellipse``, ``triangle``, ``cross``; ``classes`` of them, 2 to 4). An object's size (the
geometric mean of its sides) is drawn log-uniformly from ``min_object`` (4) pixels to 80 % of
the image's shorter side, its aspect ratio log-uniformly from 1:2 to 2:1, so COCO's small
(< 32² px) and medium area ranges are present, and the large one (>= 96² px) for images of
about 160 px and more; objects overlap little (IoU < 0.3 with each earlier box). Image sizes
vary (each side from ``1 - size_jitter``, default 75 %, to 100 % of ``image_size``), so
batches have images of different shapes, as COCO's do.

Layout written (COCO 2017's, with split names ``train`` and ``val``)::

    ROOT/train/000000.png ...        ROOT/annotations/instances_train.json
    ROOT/val/000000.png ...          ROOT/annotations/instances_val.json

Boxes are the exact bounding boxes of the drawn shapes ``[x, y, width, height]``, areas their
box areas; category ids are 1..K.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = ("rectangle", "ellipse", "triangle", "cross")


def write_synthetic_coco(
    root: str | Path,
    *,
    train_images: int = 256,
    val_images: int = 64,
    image_size: int = 64,
    classes: int = 2,
    max_objects: int = 4,
    min_object: int = 4,
    size_jitter: float = 0.25,
    seed: int = 0,
) -> Path:
    """Write the data set under ``root`` (created; must not hold one already) and return it."""
    from PIL import Image

    if not 2 <= classes <= len(SHAPES):
        raise ValueError(f"classes={classes} is not allowed; use 2 to {len(SHAPES)} (the shapes {list(SHAPES)})")
    if image_size < 24:
        raise ValueError(f"image_size={image_size} is too small; use at least 24 pixels")
    if not 0 <= size_jitter < 1:
        raise ValueError(f"size_jitter={size_jitter} is not allowed; use a fraction in [0, 1)")
    if not 4 <= min_object <= 0.5 * (1 - size_jitter) * image_size:
        raise ValueError(f"min_object={min_object} is not allowed; use 4 to half the smallest image side")
    if max_objects < 1 or train_images < 1 or val_images < 1:
        raise ValueError(
            f"max_objects, train_images and val_images must be >= 1, got {max_objects}, {train_images}, {val_images}"
        )
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    categories = [{"id": k + 1, "name": SHAPES[k]} for k in range(classes)]
    for split, count in (("train", train_images), ("val", val_images)):
        (root / split).mkdir(exist_ok=True)
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for image_id in range(1, count + 1):
            pixels, boxes, labels = _draw_image(rng, image_size, classes, max_objects, min_object, size_jitter)
            name = f"{image_id:06d}.png"
            Image.fromarray(pixels).save(root / split / name)
            height, width = pixels.shape[:2]
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
            for box, label in zip(boxes, labels):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": label,
                        "bbox": [float(v) for v in box],
                        "area": float(box[2] * box[3]),
                        "iscrowd": 0,
                    }
                )
        document = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(document))
    return root


def _draw_image(
    rng: np.random.Generator, size: int, classes: int, max_objects: int, min_object: int, size_jitter: float
) -> tuple[np.ndarray, list[list[int]], list[int]]:
    from PIL import Image, ImageDraw

    height, width = (int(rng.integers(int(round((1 - size_jitter) * size)), size + 1)) for _ in range(2))
    image = Image.fromarray(_background(rng, height, width))
    draw = ImageDraw.Draw(image)
    boxes: list[list[int]] = []
    labels: list[int] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):
            side = math.exp(rng.uniform(math.log(min_object), math.log(0.8 * min(height, width))))
            aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
            w, h = int(round(side * math.sqrt(aspect))), int(round(side / math.sqrt(aspect)))
            w, h = max(min_object // 2, min(w, width - 1)), max(min_object // 2, min(h, height - 1))
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            if all(_iou([x, y, w, h], b) < 0.3 for b in boxes):
                break
        else:
            continue
        label = int(rng.integers(0, classes))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        _draw_shape(draw, SHAPES[label], x, y, w, h, colour)
        boxes.append([x, y, w, h])
        labels.append(label + 1)
    return np.asarray(image), boxes, labels


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth colour field (bilinear upsampling of a 4x4 grid) plus faint stripes."""
    grid = rng.uniform(60, 200, (4, 4, 3))
    ys, xs = np.linspace(0, 3, height), np.linspace(0, 3, width)
    y0, x0 = np.minimum(ys.astype(int), 2), np.minimum(xs.astype(int), 2)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    field = (
        (1 - fy) * (1 - fx) * grid[y0][:, x0]
        + (1 - fy) * fx * grid[y0][:, x0 + 1]
        + fy * (1 - fx) * grid[y0 + 1][:, x0]
        + fy * fx * grid[y0 + 1][:, x0 + 1]
    )
    angle, period = rng.uniform(0, math.pi), rng.uniform(4, 12)
    stripes = 20 * np.sin(
        2 * math.pi * (np.cos(angle) * np.arange(width)[None, :] + np.sin(angle) * np.arange(height)[:, None]) / period
    )
    noise = rng.normal(0, 6, (height, width, 3))
    return np.clip(field + stripes[:, :, None] + noise, 0, 255).astype(np.uint8)


def _draw_shape(draw, shape: str, x: int, y: int, w: int, h: int, colour: tuple[int, ...]) -> None:
    """Fill ``shape`` so that its bounding box is exactly ``[x, y, w, h]`` (pixels x..x+w-1)."""
    right, bottom = x + w - 1, y + h - 1
    if shape == "rectangle":
        draw.rectangle([x, y, right, bottom], fill=colour)
    elif shape == "ellipse":
        draw.ellipse([x, y, right, bottom], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, bottom), (right, bottom), ((x + right) / 2, y)], fill=colour)
    else:  # a cross: two bars a third of the box thick
        tw, th = max(1, w // 3), max(1, h // 3)
        draw.rectangle([x, y + th, right, y + th + max(th, 1) - 1], fill=colour)
        draw.rectangle([x + tw, y, x + tw + max(tw, 1) - 1, bottom], fill=colour)


def _iou(a: list[int], b: list[int]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)
