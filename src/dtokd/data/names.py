"""The data settings' allowed values, owned by the data layer: the config (``data.name``,
``data.placement``, ``data.labels``) reads them from here."""

from typing import Literal, get_args

DataName = Literal[
    "fashion-mnist",
    "image-folder",
    "image-folder-stream",
    "cifar10",
    "cifar100",
    "digits",
    "synthetic",
    "synthetic-rgb",
    "coco",
    "synthetic-coco",
    "text",
]
Placement = Literal["auto", "device", "host"]
DetectionLabels = Literal["contiguous", "category-id"]

DATASETS: tuple[str, ...] = get_args(DataName)
PLACEMENTS: tuple[str, ...] = get_args(Placement)
LABEL_MODES: tuple[str, ...] = get_args(DetectionLabels)
