"""Small image data sets held in memory as uint8 tensors, with batched augmentation.

Images are ``(N, C, H, W)`` uint8; a batch is converted to float, normalised with the data
set's mean and std, and (for training) augmented on the whole batch at once: random crop
with padding and horizontal flip, as is standard for 32x32 and 28x28 images. The
dataset implements ``__getitems__`` so that a ``DataLoader`` fetches a batch in one call.

:meth:`TensorImageDataset.to` moves the images to an accelerator once (CIFAR-10's 60,000
images are 184 MB as uint8), so that a batch is gathered, normalised and augmented there with
no host-side data work. The augmentation's random numbers are always drawn from the data
set's CPU generator (three small vectors a batch) and then moved, so the batches are the same
wherever the images live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset


@dataclass(frozen=True)
class Augmentation:
    """Random crop after ``pad`` pixels of padding, and horizontal flip with probability 1/2.

    Applied to normalised images, so the padding is zero in normalised space (the mean colour).
    """

    pad: int = 0
    flip: bool = False

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Augment ``images`` (on any device) with random numbers from the CPU ``generator``."""
        device = images.device
        if self.pad:
            n, _, h, w = images.shape
            padded = torch.nn.functional.pad(images, (self.pad,) * 4)
            dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator).to(device, non_blocking=True)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator).to(device, non_blocking=True)
            images = _crop(padded, dy, dx, h, w)
        if self.flip:
            flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(device, non_blocking=True)
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        return images


def _crop(padded: Tensor, dy: Tensor, dx: Tensor, h: int, w: int) -> Tensor:
    """Per-image crops ``padded[i, :, dy_i:dy_i+h, dx_i:dx_i+w]`` by advanced indexing."""
    n, device = padded.shape[0], padded.device
    rows = dy[:, None] + torch.arange(h, device=device)[None, :]  # (n, h)
    cols = dx[:, None] + torch.arange(w, device=device)[None, :]  # (n, w)
    index = torch.arange(n, device=device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class TensorImageDataset(Dataset):
    """In-memory images (uint8 N x C x H x W) and integer labels, normalised per channel."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.augmentation = augmentation
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int] | Tensor) -> tuple[Tensor, Tensor]:
        """The batch of ``indices`` (a list, or an index tensor on the images' device):
        normalised, and augmented if the data set has an augmentation."""
        index = torch.as_tensor(indices, device=self.images.device)
        images = (self.images[index].float() / 255.0 - self.mean) / self.std
        if self.augmentation is not None:
            images = self.augmentation(images, self.generator)
        return images, self.labels[index]

    streams = False
    """In memory: batches are gathered whole and each rank of a distributed run takes its part."""

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size() + self.labels.numel() * self.labels.element_size()

    def to(self, device: torch.device | str) -> "TensorImageDataset":
        """The same data set (same augmentation and generator) with its tensors on ``device``."""
        moved = TensorImageDataset.__new__(TensorImageDataset)
        moved.__dict__.update(self.__dict__)
        moved.images, moved.labels = self.images.to(device), self.labels.to(device)
        moved.mean, moved.std = self.mean.to(device), self.std.to(device)
        return moved

    def subset(self, indices: Tensor, augmentation: Augmentation | None) -> "TensorImageDataset":
        """A new dataset of the given rows (sharing nothing mutable), with its own augmentation."""
        return TensorImageDataset(
            self.images[indices],
            self.labels[indices],
            tuple(self.mean.flatten().tolist()),
            tuple(self.std.flatten().tolist()),
            augmentation,
        )


class IndexedTensors(Protocol):
    """What ``InMemoryBatches`` reads of a data set: its length, where its tensors live and a
    batch gathered by a tensor of indices (``TensorImageDataset``, the text task's ``TokenBlocks``)."""

    def __len__(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def __getitems__(self, indices: list[int] | Tensor) -> tuple[Tensor, Tensor]: ...


class InMemoryBatches:
    """Shuffled batches of an in-memory data set, gathered where its tensors live.

    The order is ``torch.randperm(len(dataset), generator=generator)`` cut into batches of
    ``batch_size`` (the last partial one dropped when ``drop_last``): exactly the batches that a
    ``DataLoader`` with a ``RandomSampler`` on the same generator yields, without its
    per-sample Python work. On an accelerator the permutation is moved there once an epoch.
    """

    def __init__(self, dataset: IndexedTensors, batch_size: int, generator: torch.Generator, drop_last: bool) -> None:
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.generator = generator

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = torch.randperm(len(self.dataset), generator=self.generator).to(self.dataset.device, non_blocking=True)
        for k in range(len(self)):
            yield self.dataset.__getitems__(order[k * self.batch_size : (k + 1) * self.batch_size])
