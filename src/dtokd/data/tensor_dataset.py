"""Small image data sets held in memory as uint8 tensors, with batched augmentation.

Images are ``(N, C, H, W)`` uint8; a batch is converted to float, normalised with the data
set's mean and std, and (for training) augmented on the whole batch at once: random crop
with padding and horizontal flip, as is standard for 32x32 and 28x28 images. The
dataset implements ``__getitems__`` so that a ``DataLoader`` fetches a batch in one call.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        if self.pad:
            n, _, h, w = images.shape
            padded = torch.nn.functional.pad(images, (self.pad,) * 4)
            dy = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
            dx = torch.randint(0, 2 * self.pad + 1, (n,), generator=generator)
            images = _crop(padded, dy, dx, h, w)
        if self.flip:
            flip = torch.rand(images.shape[0], generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
        return images


def _crop(padded: Tensor, dy: Tensor, dx: Tensor, h: int, w: int) -> Tensor:
    """Per-image crops ``padded[i, :, dy_i:dy_i+h, dx_i:dx_i+w]`` by advanced indexing."""
    n = padded.shape[0]
    rows = dy[:, None] + torch.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + torch.arange(w)[None, :]  # (n, w)
    index = torch.arange(n)[:, None, None]
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

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices)
        images = (self.images[index].float() / 255.0 - self.mean) / self.std
        if self.augmentation is not None:
            images = self.augmentation(images, self.generator)
        return images, self.labels[index]

    def subset(self, indices: Tensor, augmentation: Augmentation | None) -> "TensorImageDataset":
        """A new dataset of the given rows (sharing nothing mutable), with its own augmentation."""
        return TensorImageDataset(
            self.images[indices], self.labels[indices], tuple(self.mean.flatten().tolist()),
            tuple(self.std.flatten().tolist()), augmentation,
        )


def batch_collate(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """The collate function for ``__getitems__`` batches: they are already stacked."""
    return batch
