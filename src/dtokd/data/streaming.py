"""Image folders too large to hold in memory (ImageNet): files decoded and augmented per batch
by ``DataLoader`` workers, batches copied from pinned memory.

Layout: ``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` (ImageNet's; ``test/`` also read),
checked by the rules of the in-memory loader (:func:`dtokd.data.sources.read_layout`).
The validation split for model selection is ``val_fraction`` of the training files (seeded);
the folder's ``val/`` is the test split, as papers report ImageNet "val" accuracy.

Transforms: with timm installed, timm's ``create_transform`` (the DeiT recipe:
``{auto_augment: rand-m9-mstd0.5-inc1-mmax9, re_prob: 0.25, interpolation: bicubic}`` as
``data.transform``; ``mmax9`` caps RandAugment's magnitude at 9 instead of 10, because at 10
the increasing posterize keeps 0 bits, which Pillow 12 and later refuse with an error: a
deviation from DeiT on about 2 % of the sampled operations), else torchvision's
random-resized crop and flip; evaluation resizes to
``image_size / crop_pct`` and centre-crops. Normalisation: the student's ``normalize``, else
ImageNet's statistics.

Batches under ``torchrun``: the same global order as one process (a permutation seeded by seed
and epoch, each index repeated ``repeats`` times as DeiT's repeated augmentation does), each
rank loading only its own share of every global batch (its samples ``rank::world``, so the
repeated copies of an image land on different ranks). The augmentation's randomness comes from
the loader's workers, seeded from (seed, epoch, rank): a run is reproducible for a fixed number
of processes and workers, but unlike the in-memory sets, not equal across them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class StreamingImageFolder(Dataset):
    """``(path, label)`` samples decoded and transformed one by one (in loader workers)."""

    def __init__(
        self,
        samples: list[tuple[Path, int]],
        transform: Callable,
        image_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        workers: int,
    ) -> None:
        self.samples, self.transform, self.image_size, self.workers = samples, transform, image_size, workers
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    in_channels = 3
    streams = True
    """Each rank of a distributed run loads only its own part of every global batch."""
    device = torch.device("cpu")
    nbytes = 0  # nothing held in memory: never moved to an accelerator

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB")), label
        except OSError as error:
            raise ValueError(f"{path} is not a readable image ({error}); remove it from the image folder") from None

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """A stacked batch (also what ``DataLoader`` collates to)."""
        items = [self[int(i)] for i in indices]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)

    def to(self, device: torch.device | str) -> "StreamingImageFolder":
        return self  # decoded per batch on the host; batches go to the device from pinned memory


def make_transforms(
    image_size: int, mean: tuple[float, ...], std: tuple[float, ...], augment: bool, options: dict[str, Any] | None
) -> tuple[Callable, Callable]:
    """(training, evaluation) transforms; ``options``: timm ``create_transform`` keywords."""
    options = dict(options or {})
    try:
        from timm.data import create_transform
    except ImportError:
        if options:
            raise ValueError(f"data.transform={options!r} needs timm: pip install 'dtokd[timm]'") from None
        from torchvision import transforms as T

        evaluation = T.Compose(
            [T.Resize(int(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor(), T.Normalize(mean, std)]
        )
        training = T.Compose(
            [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
        )
        return (training if augment else evaluation), evaluation
    try:
        training = create_transform(image_size, is_training=augment, mean=mean, std=std, **options)
    except TypeError as error:
        raise ValueError(f"data.transform={options!r}: {error}") from None
    evaluation = create_transform(
        image_size,
        is_training=False,
        mean=mean,
        std=std,
        interpolation=options.get("interpolation", "bilinear"),
        crop_pct=options.get("crop_pct"),
    )
    return training, evaluation


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of each global batch of a seeded permutation (see the module notes)."""

    def __init__(
        self, n: int, batch_size: int, generator: torch.Generator, rank: int, world: int, repeats: int
    ) -> None:
        self.n, self.batch_size, self.generator, self.rank, self.world, self.repeats = (
            n,
            batch_size,
            generator,
            rank,
            world,
            repeats,
        )

    def __len__(self) -> int:
        return self.n // self.batch_size if self.n > self.batch_size else 1

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator)
        if self.repeats > 1:
            order = order.repeat_interleave(self.repeats)[: self.n]
        for k in range(len(self)):
            batch = order[k * self.batch_size : (k + 1) * self.batch_size]
            yield batch[self.rank :: self.world].tolist()


def streaming_loader(
    dataset: StreamingImageFolder,
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    rank: int = 0,
    world: int = 1,
    repeats: int = 1,
) -> DataLoader:
    """Batches of this rank's share (``batch_size / world`` images) of every global batch,
    decoded by ``dataset.workers`` processes into pinned memory."""
    sampler = GlobalBatchSampler(
        len(dataset), batch_size, torch.Generator().manual_seed(seed * 100_003 + epoch), rank, world, repeats
    )
    workers = dataset.workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        collate_fn=_already_stacked,
        generator=torch.Generator().manual_seed(seed * 100_019 + epoch * 1_009 + rank),
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def streaming_eval_loader(dataset: StreamingImageFolder, batch_size: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=dataset.workers,
        pin_memory=torch.cuda.is_available(),
        collate_fn=_already_stacked,
    )


def _already_stacked(batch: Any) -> tuple[Tensor, Tensor]:
    """The collate function for :meth:`StreamingImageFolder.__getitems__` batches: the
    ``(images, labels)`` pair those return, passed through as it is."""
    return batch


def default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))
