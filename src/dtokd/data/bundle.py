"""Data sets by name, split into train / validation (carved from train, seeded) / test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from dtokd.data import sources, streaming
from dtokd.data.coco import CocoDetectionSet
from dtokd.data.names import DATASETS, PLACEMENTS
from dtokd.data.streaming import StreamingImageFolder
from dtokd.data.tensor_dataset import Augmentation, InMemoryBatches, TensorImageDataset
from dtokd.data.text import TokenBlocks, load_text

DETECTION_DATASETS = ("coco", "synthetic-coco")
READ_NO_FILES = {
    "digits": "scikit-learn's bundled 8x8 digits",
    "synthetic": "generated",
    "synthetic-rgb": "generated",
    "synthetic-coco": "generated from data.synthetic",
}
"""The data sets that read no data.root, and where their data come from instead."""
DEFAULT_AUGMENTATION = {
    "fashion-mnist": Augmentation(pad=2, flip=True),
    "image-folder": Augmentation(pad=4, flip=True),
    "cifar10": Augmentation(pad=4, flip=True),
    "cifar100": Augmentation(pad=4, flip=True),
    "digits": Augmentation(pad=1, flip=False),
    "synthetic": Augmentation(),
    "synthetic-rgb": Augmentation(pad=2, flip=True),
}


Split = TensorImageDataset | StreamingImageFolder | CocoDetectionSet | TokenBlocks


class Batches(Protocol):
    """An epoch's training batches: how many, and the batches in order."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...


@dataclass(frozen=True)
class DataBundle:
    """The splits of one data set: in memory (:class:`TensorImageDataset`) or streamed from
    files (:class:`~dtokd.data.streaming.StreamingImageFolder`)."""

    name: str
    train: Split
    val: Split | None
    test: Split
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def detection(self) -> bool:
        """Images with boxes (:class:`~dtokd.data.coco.CocoDetectionSet`), not labels."""
        return getattr(self.train, "detection", False)

    @property
    def in_channels(self) -> int:
        return self.train.in_channels

    @property
    def image_size(self) -> int:
        return self.train.image_size

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The per-channel ``(mean, std)`` every split is normalised with (image classification sets)."""
        train = self.train
        if not isinstance(train, (TensorImageDataset, StreamingImageFolder)):
            raise TypeError(f"data set {self.name!r} is not an image classification set: it has no normalisation")
        return tuple(train.mean.flatten().tolist()), tuple(train.std.flatten().tolist())

    @property
    def nbytes(self) -> int:
        return sum(split.nbytes for split in (self.train, self.val, self.test) if split is not None)

    def to(self, device: torch.device) -> "DataBundle":
        """The same splits with their images on ``device``."""
        val = self.val.to(device) if self.val is not None else None
        return DataBundle(self.name, self.train.to(device), val, self.test.to(device), self.classes)


def place_data(data: DataBundle, device: torch.device, placement: str) -> DataBundle:
    """Put the in-memory images where training reads them (see ``DataConfig.placement``):
    ``device`` moves them to ``device`` once; ``host`` leaves them on the CPU; ``auto`` moves
    them when they take at most a quarter of the accelerator's memory."""
    if placement not in PLACEMENTS:
        raise ValueError(f"data.placement={placement!r} is not allowed; use one of {list(PLACEMENTS)}")
    if device.type == "cpu" or placement == "host":
        return data
    if data.train.streams:
        if placement == "device":
            raise ValueError(
                f"data.placement='device' is not possible for {data.name!r}: it is streamed from files; "
                "use 'auto' or 'host'"
            )
        return data
    if placement == "auto" and data.nbytes > torch.cuda.get_device_properties(device).total_memory // 4:
        return data
    return data.to(device)


def build_data(
    name: str,
    root: str | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = True,
    image_size: int = 32,
    limit_train: int | None = None,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    transform: dict | None = None,
    workers: int | None = None,
    synthetic: dict | None = None,
    labels: str = "contiguous",
    text: dict | None = None,
) -> DataBundle:
    """Load ``name`` (one of :data:`DATASETS`) and split it.

    The validation split is ``val_fraction`` of the training set, drawn with ``seed``; the
    test split is the data set's own. Normalisation uses the training split's per-channel
    mean and std, or ``normalize`` = ``(mean, std)`` where given (e.g. the statistics a
    pretrained student was trained with). ``limit_train`` keeps only the first N training
    images (after shuffling with ``seed``), for quick runs. ``image-folder-stream`` reads the
    files per batch instead (see :mod:`dtokd.data.streaming`; ``transform``: timm transform
    options, ``workers``: loader processes). Detection sets (``coco``: a COCO-layout folder,
    ``synthetic-coco``: generated from ``synthetic``'s options, see :mod:`dtokd.data.coco`)
    are read per batch too; their validation split is carved from the training images, and
    ``labels`` says how category ids become labels. ``text``: token blocks for causal language
    models from local text (``text`` holds its options; see :mod:`dtokd.data.text`), split by
    document; ``limit_train`` keeps the first N training blocks in a seeded order.
    """
    _check_settings(
        name,
        root,
        val_fraction=val_fraction,
        normalize=normalize,
        transform=transform,
        synthetic=synthetic,
        labels=labels,
        text=text,
    )
    if name == "text":
        return _text(root, text, val_fraction, seed, limit_train)
    if name in DETECTION_DATASETS:
        folder = _synthetic_coco(image_size, synthetic or {}) if name == "synthetic-coco" else _coco_root(root)
        return _detection(name, folder, val_fraction, seed, augment, image_size, limit_train, workers, labels)
    if name == "image-folder-stream":
        return _streaming(root, val_fraction, seed, augment, image_size, limit_train, normalize, transform, workers)
    return _in_memory(name, root, val_fraction, seed, augment, image_size, limit_train, normalize)


def _check_settings(
    name: str,
    root: str | None,
    *,
    val_fraction: float,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None,
    transform: dict | None,
    synthetic: dict | None,
    labels: str,
    text: dict | None,
) -> None:
    """:func:`build_data`'s arguments checked before anything is read: a known ``name``, a
    ``val_fraction`` in [0, 1), and the settings that apply to some data sets only refused
    elsewhere (the setting named, with what was given and what takes it)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {list(DATASETS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if root and name in READ_NO_FILES:
        raise ValueError(
            f"data.root is not used by {name!r} ({READ_NO_FILES[name]}), got data.root={root!r}: leave it unset (null)"
        )
    if labels != "contiguous" and name not in DETECTION_DATASETS:
        raise ValueError(f"data.labels is for detection data sets {list(DETECTION_DATASETS)}, not {name!r}")
    if synthetic and name != "synthetic-coco":
        raise ValueError(f"data.synthetic sets the generated 'synthetic-coco' data set, not {name!r}")
    if text and name != "text":
        raise ValueError(f"data.text sets the 'text' data set, not {name!r}")
    if name == "text" and (transform or normalize is not None):
        raise ValueError("data set 'text' holds token ids: data.transform and student.normalize do not apply")
    if name in DETECTION_DATASETS and (transform or normalize is not None):
        raise ValueError(
            f"data set {name!r}: detectors resize and normalise their inputs themselves; "
            "set min_size/max_size/image_mean/image_std in student.kwargs, not data.transform "
            "or student.normalize"
        )
    if transform and name not in ("text", "image-folder-stream", *DETECTION_DATASETS):
        raise ValueError(f"data.transform is for 'image-folder-stream'; {name!r} is augmented in memory (data.augment)")


def _in_memory(
    name: str,
    root: str | None,
    val_fraction: float,
    seed: int,
    augment: bool,
    image_size: int,
    limit_train: int | None,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None,
) -> DataBundle:
    """An image classification set held in memory (see :func:`build_data`): its validation split
    carved from the training images, every split normalised with ``normalize`` or the training
    split's statistics, the training split augmented (``augment``) as the data set's default."""
    raw = _load(name, root, image_size)
    n = raw.train_labels.shape[0]
    val_list, train_list = carve_validation(n, val_fraction, seed, limit_train)
    val_idx, train_idx = torch.tensor(val_list, dtype=torch.long), torch.tensor(train_list, dtype=torch.long)
    mean, std = _normalization(name, raw.train_images, train_idx, normalize)
    full = TensorImageDataset(raw.train_images, raw.train_labels, mean, std)
    train = full.subset(train_idx, DEFAULT_AUGMENTATION[name] if augment else None)
    val = full.subset(val_idx, None) if val_list else None
    test = TensorImageDataset(raw.test_images, raw.test_labels, mean, std)
    return DataBundle(name, train, val, test, raw.classes)


def _normalization(
    name: str, images: Tensor, train_idx: Tensor, normalize: tuple[tuple[float, ...], tuple[float, ...]] | None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel ``(mean, std)`` of data set ``name``: ``normalize`` where given (one value per
    channel of ``images``), else the training split's pixels' (``images[train_idx]`` in [0, 1];
    the std at least 1e-3)."""
    channels = images.shape[1]
    if normalize is not None:
        mean, std = normalize
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"normalize gives {len(mean)} means and {len(std)} stds, but data set {name!r} has "
                f"{channels} channel(s)"
            )
        return mean, std
    pixels = images[train_idx].float() / 255.0
    return tuple(pixels.mean((0, 2, 3)).tolist()), tuple(pixels.std((0, 2, 3)).clamp_min(1e-3).tolist())


def carve_validation(n: int, val_fraction: float, seed: int, limit_train: int | None) -> tuple[list[int], list[int]]:
    """The seeded split of a data set's ``n`` training items, the same for every data set kind:
    a permutation drawn with ``seed``, its first ``round(val_fraction * n)`` indices for
    validation and the rest, in that order (the first ``limit_train`` of them when given), for
    training. The validation split does not depend on ``limit_train``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(val_fraction * n))
    train = order[n_val:]
    return order[:n_val], train if limit_train is None else train[:limit_train]


def _text(
    root: str | None, options: dict | None, val_fraction: float, seed: int, limit_train: int | None
) -> DataBundle:
    splits = load_text(root, options, val_fraction)
    train = splits.train
    if limit_train is not None:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:limit_train]
        train = TokenBlocks(train.blocks[order.sort().values])
    return DataBundle("text", train, splits.val, splits.test, splits.vocabulary)


def _streaming(
    root: str | None,
    val_fraction: float,
    seed: int,
    augment: bool,
    image_size: int,
    limit_train: int | None,
    normalize: tuple | None,
    transform: dict | None,
    workers: int | None,
) -> DataBundle:
    if not root:
        raise ValueError("dataset 'image-folder-stream' needs data.root: a folder with train/<class>/ and val/<class>/")
    folder = Path(root)
    if not (folder / "train").is_dir():
        raise FileNotFoundError(
            f"data.root={root!r} has no train/ folder (ImageNet layout: train/<class>/, val/<class>/)"
        )
    try:
        layout = sources.read_layout(folder)  # the rules of the in-memory image-folder loader
    except sources.LayoutError as error:
        raise error.under(root, folder) from None
    samples = layout.train
    val_idx, train_idx = carve_validation(len(samples), val_fraction, seed, limit_train)
    mean, std = normalize or (streaming.IMAGENET_MEAN, streaming.IMAGENET_STD)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"normalize gives {len(mean)} means and {len(std)} stds, but images are read as RGB")
    training, evaluation = streaming.make_transforms(image_size, mean, std, augment, transform)
    workers = streaming.default_workers() if workers is None else workers

    def split(chosen: list[tuple[Path, int]], transform_: Any) -> StreamingImageFolder:
        return StreamingImageFolder(chosen, transform_, image_size, mean, std, workers)

    val = split([samples[i] for i in val_idx], evaluation) if val_idx else None
    test = split(layout.test, evaluation)
    train = split([samples[i] for i in train_idx], training)
    return DataBundle("image-folder-stream", train, val, test, layout.classes)


def _coco_root(root: str | None) -> Path:
    if not root:
        raise ValueError(
            "dataset 'coco' needs data.root: a folder with annotations/instances_<split>.json and <split>/"
        )
    return Path(root)


def _synthetic_coco(image_size: int, options: dict) -> Path:
    """The generated set for these options, written once into the cache (atomically: a
    concurrent writer, e.g. another torchrun rank, leaves one complete copy)."""
    import hashlib
    import inspect
    import json
    import shutil
    import tempfile

    from dtokd.data.synthetic_coco import write_synthetic_coco

    allowed = [p for p in inspect.signature(write_synthetic_coco).parameters if p not in ("root", "image_size")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"data.synthetic: unknown option(s) {unknown}; allowed: {allowed}")
    settings = {"image_size": image_size, **options}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = sources.cache_dir() / f"synthetic-coco-{key}"
    if (folder / "annotations" / "instances_val.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    write_synthetic_coco(scratch, **settings)
    try:
        scratch.rename(folder)
    except OSError:  # written meanwhile by another process
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _detection(
    name: str,
    folder: Path,
    val_fraction: float,
    seed: int,
    augment: bool,
    image_size: int,
    limit_train: int | None,
    workers: int | None,
    labels: str,
) -> DataBundle:
    from dtokd.data.coco import check_annotations, find_splits, load_coco

    splits = find_splits(folder)
    train_file, train_images = splits["train"]
    test_file, test_images = splits["test"]
    train_coco = load_coco(train_file)
    test_coco = load_coco(test_file)
    for coco, file, images in ((train_coco, train_file, train_images), (test_coco, test_file, test_images)):
        check_annotations(coco, file, images)
        if not coco.imgs:
            raise ValueError(f"{file} lists no images")
    ids = sorted(train_coco.getImgIds())
    val_idx, train_idx = carve_validation(len(ids), val_fraction, seed, limit_train)
    val_ids, train_ids = [ids[i] for i in val_idx], [ids[i] for i in train_idx]
    if not train_ids:
        raise ValueError(
            f"{train_file}: no training images left ({len(ids)} listed, {len(val_ids)} carved for validation by "
            f"data.val_fraction={val_fraction}, data.limit_train={limit_train})"
        )
    workers = streaming.default_workers() if workers is None else workers
    train_categories = {c: train_coco.cats[c]["name"] for c in train_coco.getCatIds()}
    test_categories = {c: test_coco.cats[c]["name"] for c in test_coco.getCatIds()}
    if train_categories != test_categories:
        differ = sorted(set(train_categories.items()) ^ set(test_categories.items()))
        raise ValueError(
            f"{train_file} and {test_file} define different categories (id, name): {differ[:6]}; "
            "the labels would mean different things in training and testing"
        )

    def split(coco, images, chosen, flip):
        return CocoDetectionSet(coco, images, chosen, flip=flip, workers=workers, image_size=image_size, labels=labels)

    train = split(train_coco, train_images, train_ids, augment)
    val = split(train_coco, train_images, val_ids, False) if val_ids else None
    test = split(test_coco, test_images, sorted(test_coco.getImgIds()), False)
    return DataBundle(name, train, val, test, train.classes)


def _load(name: str, root: str | None, image_size: int) -> sources.RawSplits:
    if name == "fashion-mnist":
        return sources.load_fashion_mnist(root)
    if name == "image-folder":
        if not root:
            raise ValueError("dataset 'image-folder' needs data.root: a folder (train/, val|test/) or a .tar.gz of one")
        return sources.load_image_folder(Path(root), image_size)
    if name in ("cifar10", "cifar100"):
        if not root:
            raise ValueError(f"dataset {name!r} needs data.root: the folder holding its python-format files")
        return sources.load_cifar(root, 10 if name == "cifar10" else 100)
    if name == "digits":
        return sources.load_digits()
    if name == "synthetic-rgb":
        return sources.load_synthetic(channels=3, size=16, smooth=True)
    return sources.load_synthetic()


def train_loader(
    dataset: Split, batch_size: int, seed: int, epoch: int, *, rank: int = 0, world: int = 1, repeats: int = 1
) -> Batches:
    """Shuffled batches whose order and augmentation depend only on (seed, epoch): a run
    resumed at an epoch boundary sees exactly the batches an uninterrupted run sees, and a
    data set moved to an accelerator (:meth:`TensorImageDataset.to`) gives the same batches
    there, gathered and augmented on the device. In memory: whole global batches (each rank
    takes its part); streamed (``dataset.streams``): this rank's part only, with ``repeats``
    (repeated augmentation)."""
    if isinstance(dataset, (CocoDetectionSet, TokenBlocks)):
        return dataset.train_batches(batch_size, seed, epoch, rank=rank, world=world, repeats=repeats)
    if isinstance(dataset, StreamingImageFolder):
        return streaming.streaming_loader(dataset, batch_size, seed, epoch, rank=rank, world=world, repeats=repeats)
    if repeats != 1:
        raise ValueError("data.repeated_augmentation is for streamed image folders (image-folder-stream)")
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    dataset.generator.manual_seed(seed * 100_019 + epoch)
    return InMemoryBatches(dataset, batch_size, generator, drop_last=len(dataset) > batch_size)


def eval_loader(dataset: Split, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The data set in order, in batches of ``batch_size``, gathered where its tensors live
    (or decoded by loader workers for a streamed set)."""
    if isinstance(dataset, CocoDetectionSet):
        yield from dataset.eval_batches(batch_size)
        return
    if isinstance(dataset, StreamingImageFolder):
        yield from streaming.streaming_eval_loader(dataset, batch_size)
        return
    for start in range(0, len(dataset), batch_size):
        yield dataset.__getitems__(torch.arange(start, min(start + batch_size, len(dataset)), device=dataset.device))


def to_device(tensor: Any, device: torch.device, channels_last: bool = False) -> Any:
    """A batch tensor on ``device`` (from pinned memory when it comes from the host to CUDA),
    channels-last if asked (4-D tensors only); lists and dicts (detection batches: images and
    targets) element by element, other values as they are."""
    if isinstance(tensor, (list, tuple)):
        return type(tensor)(to_device(t, device, channels_last) for t in tensor)
    if isinstance(tensor, dict):
        return {k: to_device(v, device, channels_last) for k, v in tensor.items()}
    if not isinstance(tensor, Tensor):
        return tensor
    if tensor.device != device:
        if device.type == "cuda":
            tensor = tensor.pin_memory()
        tensor = tensor.to(device, non_blocking=True)
    return tensor.contiguous(memory_format=torch.channels_last) if channels_last and tensor.dim() == 4 else tensor
