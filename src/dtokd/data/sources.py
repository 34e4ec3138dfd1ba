"""Where the data come from: Fashion-MNIST, image folders (or a .tar.gz of one), CIFAR in its
python format, scikit-learn's digits, and a synthetic set for tests. Each loader returns uint8
image tensors and labels; :mod:`dtokd.data.bundle` splits and wraps them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dtokd.interrupts import exclusive

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class RawSplits:
    """uint8 images (N, C, H, W) and int64 labels for the train and test splits."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...]


def cache_dir() -> Path:
    return Path(os.environ.get("DTOKD_CACHE", Path.home() / ".cache" / "dtokd"))


# ------------------------------------------------------------------------ Fashion-MNIST


def _fashion_places(base: Path) -> list[Path]:
    """The folders of ``base`` that may hold the files: itself, ``fashion-mnist/`` and torchvision's
    ``FashionMNIST/raw/``."""
    return [base, base / "fashion-mnist", base / "FashionMNIST" / "raw"]


def fashion_mnist_candidates(root: str | Path | None) -> list[Path]:
    """Where to look, in order. A given root is the only place looked in (see
    :func:`_fashion_places`): a root without the files is refused, never passed over for another
    copy. Without one: $DTOKD_DATA, Debian's install location, then the download cache."""
    if root:
        return _fashion_places(Path(root))
    places = _fashion_places(Path(os.environ["DTOKD_DATA"])) if os.environ.get("DTOKD_DATA") else []
    return places + [DEBIAN_FASHION_MNIST, cache_dir() / "FashionMNIST" / "raw"]


def load_fashion_mnist(root: str | Path | None = None, download: bool = True) -> RawSplits:
    """Fashion-MNIST from the original ``*-ubyte.gz`` files (see :func:`fashion_mnist_candidates`);
    if none has them and no root was given, torchvision's download into the cache where the
    network allows."""
    places = fashion_mnist_candidates(root)
    files = [f for pair in FASHION_FILES.values() for f in pair]
    for place in places:
        if all((place / f).is_file() for f in files):
            return _read_fashion(place)
    if root:
        raise FileNotFoundError(
            f"data.root={str(root)!r} holds no Fashion-MNIST: the files {', '.join(files)} are in none of "
            + ", ".join(str(p) for p in places)
            + "; put them there, or leave data.root unset to search $DTOKD_DATA, "
            f"{DEBIAN_FASHION_MNIST} and the download cache"
        )
    if download:
        try:
            import torchvision

            torchvision.datasets.FashionMNIST(str(cache_dir()), train=True, download=True)
            return _read_fashion(cache_dir() / "FashionMNIST" / "raw")
        except Exception as error:  # noqa: BLE001 - any network/IO failure ends in the message below
            reason = f"download failed: {error}"
    else:
        reason = "download disabled"
    raise FileNotFoundError(
        "Fashion-MNIST not found. Looked for the four *-ubyte.gz files in: "
        + ", ".join(str(p) for p in places)
        + f" ({reason}). Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
        "put the files in a folder and pass --data-root / data.root=..., or set DTOKD_DATA."
    )


def _read_fashion(folder: Path) -> RawSplits:
    def idx(path: Path) -> np.ndarray:
        with gzip.open(path, "rb") as f:
            data = f.read()
        dims = data[3]
        shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)

    arrays = {split: (idx(folder / a), idx(folder / b)) for split, (a, b) in FASHION_FILES.items()}
    (tri, trl), (tei, tel) = arrays["train"], arrays["test"]
    return RawSplits(
        torch.from_numpy(tri.copy()).unsqueeze(1),
        torch.from_numpy(trl.astype(np.int64)),
        torch.from_numpy(tei.copy()).unsqueeze(1),
        torch.from_numpy(tel.astype(np.int64)),
        FASHION_CLASSES,
    )


# ------------------------------------------------------------------------ image folders

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class LayoutError(ValueError):
    """An image folder that breaks the layout rules (:func:`read_layout`): ``where`` is the entry
    at fault, ``problem`` what is wrong with it; the message is ``"<where> <problem>"``."""

    def __init__(self, where: Path, problem: str, message: str | None = None) -> None:
        super().__init__(message or f"{where} {problem}")
        self.where, self.problem = where, problem

    def __reduce__(self) -> tuple:
        """Pickled whole (raised in a worker process, told in the parent)."""
        return LayoutError, (self.where, self.problem, str(self))

    def under(self, root: str | Path, folder: Path) -> LayoutError:
        """The same error told by the setting that named the data: ``data.root='ROOT': <entry> <problem>``,
        the entry relative to ``folder`` (what ``root`` is, or was extracted to)."""
        inside = self.where.relative_to(folder) if self.where.is_relative_to(folder) else self.where
        setting = f"data.root={str(root)!r}"
        said = f"{setting} {self.problem}" if inside == Path(".") else f"{setting}: {inside} {self.problem}"
        return LayoutError(self.where, self.problem, said)


@dataclass(frozen=True)
class FolderLayout:
    """An image folder's classes and its ``(file, label)`` samples, train and test, in order."""

    classes: tuple[str, ...]
    train: list[tuple[Path, int]]
    test: list[tuple[Path, int]]


def load_image_folder(path: str | Path, image_size: int) -> RawSplits:
    """An ImageNet-layout folder (``train/<class>/*`` and ``val/`` or ``test/``, see
    :func:`read_layout`), or a ``.tar.gz`` of one (extracted once into the cache). Images are
    resized to ``image_size`` squares and kept in memory as uint8, cached as a tensor file for
    reruns, keyed by the content's identity (:func:`content_key`): adding, removing or changing
    any file reads the images anew. Processes that load one root at once take turns (a lock in
    the cache): one reads, the others then find its tensor file. A folder not in the layout is
    refused, named by ``data.root`` and the entry at fault."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data.root={str(path)!r} does not exist (an image folder or a .tar.gz of one)")
    content = content_key(path)
    cached = cache_dir() / "tensors" / f"{path.name}-{content}-{image_size}px.pt"
    # processes that start together (the cells of a parallel bench) read and extract once, in turn
    with exclusive(cache_dir() / "locks" / f"{path.name}-{content}.lock"):
        if cached.is_file():
            return RawSplits(**torch.load(cached, weights_only=True))
        folder = _extracted(path, content) if path.is_file() else path
        try:
            layout = read_layout(_find_split_root(folder))
            train_images, train_labels = _read_images(layout.train, image_size, "train")
            test_images, test_labels = _read_images(layout.test, image_size, "test")
        except LayoutError as error:
            raise error.under(path, folder) from None
        splits = RawSplits(train_images, train_labels, test_images, test_labels, layout.classes)
        cached.parent.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_suffix(f".{os.getpid()}.tmp")
        torch.save(splits.__dict__, temporary)
        os.replace(temporary, cached)
        return splits


def content_key(path: str | Path) -> str:
    """A key that changes with the content of a data root: for a file (an archive), a hash of its
    bytes (a copy, or the same file re-provisioned with a new time, keeps the key; hashing costs
    far less than extracting); for a folder, the relative path, size and modification time of
    every file in it."""
    path = Path(path)
    digest = hashlib.sha1()
    if path.is_file():
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()[:16]
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _extracted(archive: Path, key: str) -> Path:
    target = cache_dir() / "extracted" / f"{archive.name}-{key}"
    done = target / ".complete"
    if not done.is_file():
        if target.exists():
            shutil.rmtree(target)  # an extraction that was interrupted
        target.mkdir(parents=True)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(target, filter="data")
        except (tarfile.TarError, EOFError, OSError) as error:
            shutil.rmtree(target, ignore_errors=True)
            raise ValueError(
                f"data.root={str(archive)!r} is not a readable .tar.gz of an image folder "
                f"({type(error).__name__}: {error}); give a folder or an intact archive"
            ) from None
        done.touch()
    return target


def _find_split_root(folder: Path) -> Path:
    """The folder that holds ``train/``: ``folder`` itself, else the one folder below it that
    does (an extracted archive usually has one top folder). Hidden folders (:func:`hidden`) are
    not searched, nor is anything below a split root found. Several split roots are refused,
    named: which one to train on would be a guess."""
    if (folder / "train").is_dir():
        return folder
    found = sorted(
        p.parent
        for p in folder.rglob("train")
        if p.is_dir() and not any(hidden(part) for part in p.relative_to(folder).parts)
    )
    outermost = [p for p in found if not any(q in p.parents for q in found)]
    if len(outermost) == 1:
        return outermost[0]
    if not outermost:
        raise LayoutError(folder, "has no train/<class>/ folder, at its top or below (layout: train/<class>/<image>)")
    names = ", ".join(str(p.relative_to(folder)) for p in outermost)
    raise LayoutError(folder, f"holds several image folders ({names}); give the one to use as data.root")


def hidden(name: str) -> bool:
    """Whether an entry is hidden, never data: a dot name (``.DS_Store``, ``.ipynb_checkpoints``,
    macOS's ``._<name>`` forks) or the ``__MACOSX`` folder macOS adds to archives."""
    return name.startswith(".") or name == "__MACOSX"


def visible(folder: Path) -> list[Path]:
    """The entries of ``folder`` but hidden ones (:func:`hidden`), sorted."""
    return sorted(p for p in folder.iterdir() if not hidden(p.name))


def read_layout(root: Path) -> FolderLayout:
    """The classes and samples of the image folder at ``root``, by the rules both image-folder
    loaders (in memory and streamed) apply: ``root/train/<class>/<image>`` and the test split
    ``root/val/`` (else ``root/test/``) in the same layout; the classes are train's folders,
    sorted; hidden entries are skipped (:func:`visible`). Refused (:class:`LayoutError`): no
    test split, no class folder, a test class that train lacks, a train class without images,
    a test split without images, and whatever :func:`_class_folders` and :func:`_samples` refuse."""
    test_name = next((n for n in ("val", "test") if (root / n).is_dir()), None)
    if test_name is None:
        raise LayoutError(root, "has a train/ folder but neither val/ nor test/")
    classes = _class_folders(root / "train")
    if not classes:
        raise LayoutError(root / "train", "has no class folders (train/<class>/<image>)")
    unknown = sorted(set(_class_folders(root / test_name)) - set(classes))
    if unknown:
        raise LayoutError(
            root / test_name,
            f"has class folders that train has not ({', '.join(unknown)}): their images could never be "
            "predicted; add them to train/ or remove them",
        )
    train, test = _samples(root / "train", classes), _samples(root / test_name, classes)
    seen = {label for _, label in train}
    empty = [name for label, name in enumerate(classes) if label not in seen]
    if empty:
        raise LayoutError(
            root / "train" / empty[0],
            "is a class folder without images: the model would get an output for a class it never sees; "
            "add images or remove the folder",
        )
    if not test:
        raise LayoutError(root / test_name, f"has no images in its class folders ({test_name}/<class>/<image>)")
    return FolderLayout(classes, train, test)


def _class_folders(split: Path) -> tuple[str, ...]:
    """The class names of a split (its visible sub-folders); a file beside them is refused."""
    loose = [p.name for p in visible(split) if not p.is_dir()]
    if loose:
        raise LayoutError(
            split,
            f"holds files outside the class folders ({', '.join(loose[:5])}); the layout is "
            f"{split.name}/<class>/<image>: move or remove them",
        )
    return tuple(p.name for p in visible(split))


def _samples(split: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    """``(file, label)`` for every visible entry of ``split/<class>/`` (a class without a folder
    here has no images in this split). Each must be a file named as an image
    (:data:`IMAGE_EXTENSIONS`, any case): a sub-folder or another file is refused, not skipped."""
    samples = []
    for label, name in enumerate(classes):
        for entry in visible(split / name) if (split / name).is_dir() else []:
            if entry.is_dir():
                raise LayoutError(
                    entry, f"is a folder inside a class folder; the layout is {split.name}/<class>/<image>"
                )
            if entry.suffix.lower() not in IMAGE_EXTENSIONS:
                raise LayoutError(
                    entry, f"is not an image ({', '.join(IMAGE_EXTENSIONS)}); remove it from the image folder"
                )
            samples.append((entry, label))
    return samples


def _read_images(samples: list[tuple[Path, int]], image_size: int, split: str) -> tuple[Tensor, Tensor]:
    """The images of ``samples`` as uint8 ``image_size`` squares, and their labels; a file that
    is no readable image is refused (:class:`LayoutError`)."""
    from PIL import Image
    from tqdm import tqdm

    images = torch.empty(len(samples), 3, image_size, image_size, dtype=torch.uint8)
    for i, (file, _) in enumerate(tqdm(samples, desc=f"reading {split}", unit="img", leave=False, disable=None)):
        try:
            with Image.open(file) as opened:
                rgb = opened.convert("RGB")
                if rgb.size != (image_size, image_size):
                    rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
                images[i] = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)
        except (OSError, Image.DecompressionBombError) as error:  # unreadable, truncated, or too many pixels
            raise LayoutError(file, f"is not a readable image ({error}); remove it from the image folder") from None
    return images, torch.tensor([label for _, label in samples], dtype=torch.int64)


# ------------------------------------------------------------------------ CIFAR (python format)


def load_cifar(root: str | Path, num_classes: int) -> RawSplits:
    """CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``) under ``root``."""
    folder = Path(root) / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-{num_classes} python files not found in {folder}")
    label_key = b"labels" if num_classes == 10 else b"fine_labels"
    names = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if num_classes == 10 else (["train"], ["test"])

    def read(files: list[str]) -> tuple[Tensor, Tensor]:
        data, labels = [], []
        for name in files:
            entry = load_array_pickle(folder / name)
            data.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels += list(entry[label_key])
        return torch.from_numpy(np.concatenate(data)), torch.tensor(labels, dtype=torch.int64)

    meta_name = "batches.meta" if num_classes == 10 else "meta"
    meta = load_array_pickle(folder / meta_name)
    classes = tuple(c.decode() for c in meta[b"label_names" if num_classes == 10 else b"fine_label_names"])
    (tri, trl), (tei, tel) = read(names[0]), read(names[1])
    return RawSplits(tri, trl, tei, tel, classes)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles containers, numbers, strings, bytes and NumPy arrays only: the CIFAR python
    files' content. Any other class a file names (what a crafted file would run) is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 pickles an array's bytes at protocol 2
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a data file (only NumPy arrays are)")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def load_array_pickle(path: Path) -> Any:
    """A pickled data file (CIFAR's python format, written by Python 2: ``encoding="bytes"``) read
    with :class:`_ArrayUnpickler`: a file that would construct anything but containers and NumPy
    arrays is refused without running it."""
    with open(path, "rb") as f:
        return _ArrayUnpickler(f, encoding="bytes").load()


# ------------------------------------------------------------------------ tests and quick checks


def load_digits() -> RawSplits:
    """scikit-learn's 8x8 digits (1,797 images), scaled to uint8, split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(labels))
    train, test = order[:cut], order[cut:]
    return RawSplits(images[train], labels[train], images[test], labels[test], tuple(str(d) for d in range(10)))


def load_synthetic(
    num_classes: int = 4, size: int = 8, channels: int = 1, n_train: int = 256, n_test: int = 64, smooth: bool = False
) -> RawSplits:
    """Class-dependent blobs: learnable in a few steps. For tests only. ``smooth``: the class
    prototypes are 2x2 colour patterns scaled up to ``size`` (learnable by convolutional nets
    with global pooling too), else per-pixel noise."""
    generator = torch.Generator().manual_seed(1234)
    if smooth:
        coarse = torch.rand(num_classes, channels, 2, 2, generator=generator)
        prototypes = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    else:
        prototypes = torch.rand(num_classes, channels, size, size, generator=generator)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.arange(n) % num_classes
        noise = 0.35 * torch.randn(n, channels, size, size, generator=generator)
        images = ((prototypes[labels] + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        return images, labels

    (tri, trl), (tei, tel) = sample(n_train), sample(n_test)
    return RawSplits(tri, trl, tei, tel, tuple(f"class{i}" for i in range(num_classes)))
