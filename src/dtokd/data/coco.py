"""Detection data in COCO format: images plus an ``instances_*.json`` annotation file.

A sample is ``(image, target)``: the image as a float tensor ``(3, H, W)`` in [0, 1] at its
own size, and ``target = {"boxes": (N, 4) float32 [x1, y1, x2, y2] in pixels, "labels": (N,)
int64 in 1..K, "image_id": int}``. Resizing (shorter side to ``min_size``, longer side at most
``max_size``, aspect kept), normalisation and padding into one batch tensor are done by the
detector itself (torchvision's ``GeneralizedRCNNTransform``), so a batch is a *list* of images
of different sizes and a list of targets. Category ids of the file map to the contiguous
labels 1..K in id order (0 is the background of torchvision's detectors), or with
``labels="category-id"`` the label is the id itself (K = the largest id: COCO's 90, the
convention of torchvision's released COCO detectors with their 91 outputs); the evaluation
maps them back. Crowd annotations (``iscrowd: 1``) and boxes under one pixel wide or high are left
out of the training targets (the official evaluation still uses them, as it should).

Augmentation: a horizontal flip of image and boxes with probability 1/2. The flips of an
epoch are drawn for the whole split from (seed, epoch), so a batch does not depend on the
number of processes or loader workers, and a resumed run sees the same batches.

Batches under ``torchrun`` come like those of streamed image folders: each rank loads only its
share of every global batch (:class:`~dtokd.data.streaming.GlobalBatchSampler`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from dtokd.data.names import LABEL_MODES
from dtokd.data.streaming import GlobalBatchSampler

Target = dict[str, Any]


def load_coco(annotation_file: Path) -> Any:
    """The annotation file as a ``pycocotools.coco.COCO`` index (its messages silenced)."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise ValueError("detection data need pycocotools: pip install 'dtokd[detection]'") from None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(annotation_file))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError) as error:
        raise ValueError(
            f"{annotation_file} is not a COCO annotation file ({type(error).__name__}: {str(error)[:200]})"
        ) from None


def check_annotations(coco: Any, annotation_file: Path, image_dir: Path) -> None:
    """Refuse, before training, what would fail or silently change a run later, naming the
    file, the image or annotation, and the problem: an image entry without ``id``,
    ``file_name``, ``width`` or ``height`` or whose file is missing; an annotation without a
    ``bbox`` of four finite numbers with non-negative width and height, without an ``area``
    (the official evaluation needs it), with a ``category_id`` the file does not define, or with
    a box wholly outside its image (never a detectable object: a wrong coordinate convention
    or image size, most often)."""
    where = f"{annotation_file}"
    for image_id, info in coco.imgs.items():
        missing = [k for k in ("file_name", "width", "height") if k not in info]
        if missing:
            raise ValueError(f"{where}: image {image_id} has no {', '.join(map(repr, missing))}")
        if not (image_dir / info["file_name"]).is_file():
            raise ValueError(f"{where}: image {image_id}'s file {str(image_dir / info['file_name'])!r} does not exist")
    for ann in coco.dataset.get("annotations", []):
        name = f"{where}: annotation {ann.get('id', '(no id)')} (image {ann.get('image_id')})"
        box = ann.get("bbox")
        if (
            not isinstance(box, (list, tuple))
            or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        ):
            raise ValueError(f"{name} has bbox={box!r}; COCO boxes are [x, y, width, height], four finite numbers")
        x, y, w, h = box
        if w < 0 or h < 0:
            raise ValueError(f"{name} has a negative width or height in bbox={box!r} ([x, y, width, height])")
        if "area" not in ann:
            raise ValueError(f"{name} has no 'area' (the COCO evaluation needs it; for a box it is width x height)")
        if ann.get("category_id") not in coco.cats:
            raise ValueError(
                f"{name} has category_id={ann.get('category_id')!r}, which the file's categories "
                f"do not define (ids {sorted(coco.cats)})"
            )
        info = coco.imgs.get(ann.get("image_id"))
        if info is None:
            raise ValueError(f"{name} belongs to an image the file does not list")
        if x >= info["width"] or y >= info["height"] or x + w <= 0 or y + h <= 0:
            raise ValueError(
                f"{name} has bbox={box!r}, wholly outside its {info['width']}x{info['height']} image "
                "(COCO boxes are [x, y, width, height] in pixels)"
            )


class CocoDetectionSet(Dataset):
    """The images ``image_ids`` of a COCO annotation index, read from ``image_dir``."""

    in_channels = 3
    detection = True
    streams = True
    """Each rank of a distributed run loads only its own part of every global batch."""
    device = torch.device("cpu")
    nbytes = 0  # read from files per batch: never moved to an accelerator

    def __init__(
        self,
        coco: Any,
        image_dir: Path,
        image_ids: list[int],
        *,
        flip: bool,
        workers: int,
        image_size: int,
        labels: str = "contiguous",
    ) -> None:
        if labels not in LABEL_MODES:
            raise ValueError(f"data.labels={labels!r} is not allowed; use one of {list(LABEL_MODES)}")
        self.coco, self.image_dir, self.image_ids = coco, Path(image_dir), list(image_ids)
        self.flip, self.workers, self.image_size = flip, workers, image_size
        present = sorted(coco.getCatIds())
        # label k (1..K) is the detection of category_ids[k - 1]
        self.category_ids = present if labels == "contiguous" else list(range(1, max(present) + 1))
        self.label_of = {c: k + 1 for k, c in enumerate(self.category_ids)}
        self.flips: Tensor | None = None  # this epoch's flip decisions (see set_epoch)

    @property
    def classes(self) -> tuple[str, ...]:
        """The class of each label 1..K (``N/A`` for ids the file does not use)."""
        return tuple(self.coco.cats[c]["name"] if c in self.coco.cats else "N/A" for c in self.category_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def set_epoch(self, seed: int, epoch: int) -> None:
        """Draw this epoch's flips for every image from (seed, epoch)."""
        if self.flip:
            generator = torch.Generator().manual_seed(seed * 100_019 + epoch)
            self.flips = torch.rand(len(self), generator=generator) < 0.5

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as opened:
                image = pil_to_tensor(opened.convert("RGB")).float().div_(255)
        except (OSError, Image.DecompressionBombError) as error:  # unreadable, truncated, or too many pixels
            raise ValueError(f"{path} is not a readable image ({error})") from None
        boxes, labels = [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            if ann.get("iscrowd", 0) or w < 1 or h < 1:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[ann["category_id"]])
        box_tensor = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        if self.flips is not None and bool(self.flips[index]):
            image = image.flip(-1)
            width = image.shape[-1]
            box_tensor = torch.stack(
                [width - box_tensor[:, 2], box_tensor[:, 1], width - box_tensor[:, 0], box_tensor[:, 3]], 1
            )
        return image, {"boxes": box_tensor, "labels": torch.tensor(labels, dtype=torch.int64), "image_id": image_id}

    def to(self, device: torch.device | str) -> "CocoDetectionSet":
        return self  # decoded per batch on the host

    def train_batches(
        self, batch_size: int, seed: int, epoch: int, *, rank: int = 0, world: int = 1, repeats: int = 1
    ) -> DataLoader:
        """This rank's share of every global batch of a seeded permutation, flips drawn for the epoch."""
        if repeats != 1:
            raise ValueError("data.repeated_augmentation is for streamed image folders (image-folder-stream)")
        self.set_epoch(seed, epoch)
        sampler = GlobalBatchSampler(
            len(self), batch_size, torch.Generator().manual_seed(seed * 100_003 + epoch), rank, world, 1
        )
        return self._loader(sampler)

    def eval_batches(self, batch_size: int) -> DataLoader:
        """The split in order, unflipped (a shallow copy without flips: an epoch's flips of
        this split, if any, stay as they are)."""
        unflipped = copy.copy(self)
        unflipped.flips = None
        order = list(range(len(self)))
        return unflipped._loader([order[k : k + batch_size] for k in range(0, len(order), batch_size)])

    def _loader(self, batches: Sampler[list[int]] | list[list[int]]) -> DataLoader:
        return DataLoader(
            self,
            batch_sampler=batches,
            num_workers=self.workers,
            collate_fn=collate,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if self.workers else None,
        )


def collate(samples: list[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """A batch of images of different sizes: (list of images, list of targets)."""
    return [image for image, _ in samples], [target for _, target in samples]


def find_splits(root: Path) -> dict[str, tuple[Path, Path]]:
    """``{"train": (annotation file, image folder), "test": (...)}`` of a COCO-layout folder:
    ``annotations/instances_<split>.json`` next to ``<split>/``, the split whose name starts
    with ``train`` for training and the one starting with ``val`` (else ``test``) for testing
    (COCO's val2017 is where papers report AP)."""
    annotations = root / "annotations"
    files = sorted(annotations.glob("instances_*.json")) if annotations.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"data.root={str(root)!r} has no annotations/instances_*.json (the COCO layout: "
            "annotations/instances_train2017.json with train2017/, instances_val2017.json with val2017/)"
        )
    found: dict[str, tuple[Path, Path]] = {}
    for prefix, role in (("train", "train"), ("val", "test"), ("test", "test")):
        for file in files:
            split = file.stem[len("instances_") :]
            if split.startswith(prefix) and role not in found:
                images = root / split
                if not images.is_dir():
                    raise FileNotFoundError(f"{file} has no image folder {images}")
                found[role] = (file, images)
    missing = [r for r in ("train", "test") if r not in found]
    if missing:
        raise FileNotFoundError(
            f"data.root={str(root)!r}: no annotation file for the {missing} split(s); found {[f.name for f in files]}"
        )
    return found
