"""A data root that holds something other than what the config names is refused, naming
``data.root``, its value and what is allowed; it is never passed over for another source or
trained on as something else. The in-memory (``image-folder``) and streamed
(``image-folder-stream``) loaders apply one set of layout rules."""

from __future__ import annotations

import gzip
import pickle
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dtokd.data import build_data, sources

LOADERS = ("image-folder", "image-folder-stream")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))


def write_split(root: Path, split: str, counts: dict[str, int]) -> None:
    """``root/split/<class>/<k>.png``: ``counts[class]`` 8x8 images per class."""
    from PIL import Image

    for name, count in counts.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for k in range(count):
            Image.new("RGB", (8, 8), (30 * k % 255, 90, 200)).save(root / split / name / f"{k}.png")


def write_folder(root: Path, counts: dict[str, int] | None = None, test: str = "val") -> Path:
    write_split(root, "train", counts or {"a": 2, "b": 2})
    write_split(root, test, counts or {"a": 2, "b": 2})
    return root


def load(name: str, root: Path):
    return build_data(name, str(root), val_fraction=0.0, image_size=8, workers=0, augment=False)


def refused(name: str, root: Path, entry: str, problem: str) -> None:
    """``name`` on ``root`` refuses with ``data.root='ROOT': ENTRY PROBLEM``."""
    expected = f"data.root={str(root)!r}: {entry} {problem}"
    with pytest.raises(ValueError) as error:
        load(name, root)
    assert expected in str(error.value), (name, str(error.value))
    assert str(pickle.loads(pickle.dumps(error.value))) == str(error.value)  # told whole from a worker process


# ------------------------------------------------------------------------ 25. Fashion-MNIST


def write_fashion(folder: Path) -> Path:
    def idx(path: Path, array: np.ndarray) -> None:
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    folder.mkdir(parents=True, exist_ok=True)
    for (images, labels), n in zip(sources.FASHION_FILES.values(), (6, 3)):
        idx(folder / images, np.full((n, 28, 28), n))
        idx(folder / labels, np.arange(n) % 10)
    return folder


@pytest.fixture
def fashion_elsewhere(tmp_path, monkeypatch):
    """Fashion-MNIST in $DTOKD_DATA and at Debian's location: where a root used to fall back to."""
    monkeypatch.setenv("DTOKD_DATA", str(write_fashion(tmp_path / "env")))
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", write_fashion(tmp_path / "debian"))


@pytest.mark.parametrize("kind", ["empty folder", "file"])
def test_a_fashion_mnist_root_without_its_files_is_refused_not_passed_over(tmp_path, fashion_elsewhere, kind):
    root = tmp_path / "given"
    if kind == "file":
        root.write_text("not a data set")
    else:
        root.mkdir()
    message = re.escape(f"data.root={str(root)!r}") + ".*train-images-idx3-ubyte.gz"
    with pytest.raises(FileNotFoundError, match=message):
        build_data("fashion-mnist", str(root))
    with pytest.raises(FileNotFoundError, match=message):
        sources.load_fashion_mnist(root, download=True)  # a given root is not replaced by a download either


def test_a_fashion_mnist_root_is_searched_and_without_one_the_default_order_holds(tmp_path, monkeypatch):
    nested = write_fashion(tmp_path / "given" / "fashion-mnist")
    assert sources.load_fashion_mnist(tmp_path / "given", download=False).train_images.shape == (6, 1, 28, 28)
    assert sources.fashion_mnist_candidates(tmp_path / "given") == [
        tmp_path / "given",
        nested,
        tmp_path / "given" / "FashionMNIST" / "raw",
    ]
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", write_fashion(tmp_path / "debian"))
    monkeypatch.setenv("DTOKD_DATA", str(tmp_path / "nowhere"))
    assert build_data("fashion-mnist", None).train.images.shape[0] == 5  # $DTOKD_DATA lacks it: Debian's copy
    monkeypatch.setenv("DTOKD_DATA", str(tmp_path / "given"))
    places = sources.fashion_mnist_candidates(None)
    assert places[1] == nested and places.index(sources.DEBIAN_FASHION_MNIST) == 3


# ------------------------------------------------------------------------ 26. sets without files


@pytest.mark.parametrize("name", ["digits", "synthetic", "synthetic-rgb", "synthetic-coco"])
def test_a_root_for_a_data_set_that_reads_no_files_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match=re.escape(f"data.root is not used by {name!r}") + ".*leave it unset"):
        build_data(name, str(tmp_path))


def test_a_data_set_that_reads_no_files_still_loads_without_a_root():
    assert build_data("synthetic", None).num_classes == 4


# ------------------------------------------------------------------------ 27. which folder is the root


def test_several_nested_image_folders_are_refused_naming_them(tmp_path):
    root = tmp_path / "multi"
    write_folder(root / "dsA")
    write_folder(root / "dsB")
    with pytest.raises(ValueError) as error:
        sources.load_image_folder(root, 8)
    message = str(error.value)
    assert message.startswith(f"data.root={str(root)!r}") and "dsA, dsB" in message, message


def test_one_nested_image_folder_is_found_and_hidden_copies_are_not_counted(tmp_path):
    root = tmp_path / "one"
    write_folder(root / "ds", {"a": 1, "b": 2})
    write_folder(root / "__MACOSX" / "ds")  # the resource forks macOS adds to an archive
    write_folder(root / ".trash" / "old")
    write_split(root / "ds", "train", {"train": 1})  # a class named train: not another split root
    raw = sources.load_image_folder(root, 8)
    assert raw.classes == ("a", "b", "train") and raw.train_labels.tolist() == [0, 1, 1, 2]


# ------------------------------------------------------------------------ 28-31. one set of layout rules


@pytest.mark.parametrize("name", LOADERS)
def test_a_class_folder_without_images_is_refused(tmp_path, name):
    root = write_folder(tmp_path / "images")
    (root / "train" / "zz").mkdir()
    (root / "train" / "zz" / ".DS_Store").write_bytes(b"\0")
    refused(name, root, "train/zz", "is a class folder without images")


@pytest.mark.parametrize("name", LOADERS)
def test_a_test_split_without_images_is_refused(tmp_path, name):
    root = write_folder(tmp_path / "images")
    for file in (root / "val").rglob("*.png"):
        file.unlink()
    refused(name, root, "val", "has no images")


def test_both_loaders_skip_hidden_entries_alike(tmp_path):
    root = write_folder(tmp_path / "images", {"a": 2, "b": 3})
    write_split(root, "train", {".ipynb_checkpoints": 2})  # a hidden folder that holds images
    (root / "train" / "a" / "._0.png").write_bytes(b"\0\5AppleDouble")
    (root / "val" / "b" / ".0-checkpoint.png").write_bytes(b"")
    memory, stream = load("image-folder", root), load("image-folder-stream", root)
    assert memory.classes == stream.classes == ("a", "b")
    assert stream.test.samples == [(root / "val" / c / f"{k}.png", y) for y, c in enumerate("ab") for k in range(2 + y)]
    assert [y for _, y in stream.test.samples] == memory.test.labels.tolist()
    assert Counter(y for _, y in stream.train.samples) == Counter(memory.train.labels.tolist()) == {0: 2, 1: 3}


@pytest.mark.parametrize("name", LOADERS)
def test_a_test_class_that_train_lacks_is_refused(tmp_path, name):
    root = write_folder(tmp_path / "images")
    write_split(root, "val", {"zz": 1})
    refused(name, root, "val", "has class folders that train has not (zz)")


LAYOUT_FAULTS = {
    "sub-folder": (lambda r: write_split(r / "train" / "a", "sub", {"x": 1}), "train/a/sub", "is a folder inside"),
    "loose file": (lambda r: (r / "train" / "readme.md").write_text("x"), "train", "holds files outside"),
    "not an image": (lambda r: (r / "train" / "a" / "notes.txt").write_text("x"), "train/a/notes.txt", "is not an"),
}


@pytest.mark.parametrize("fault", LAYOUT_FAULTS)
@pytest.mark.parametrize("name", LOADERS)
def test_both_loaders_refuse_what_is_not_the_layout(tmp_path, name, fault):
    make, entry, problem = LAYOUT_FAULTS[fault]
    root = write_folder(tmp_path / "images")
    make(root)
    refused(name, root, entry, problem)


# ------------------------------------------------------------------------ 32. archives


def test_an_archive_without_an_image_folder_is_named_by_data_root(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("hello")
    archive = tmp_path / "wrong.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "texts", arcname="texts")
    with pytest.raises(ValueError) as error:
        build_data("image-folder", str(archive), image_size=8)
    message = str(error.value)
    assert message.startswith(f"data.root={str(archive)!r} has no train/<class>/ folder"), message
    assert str(tmp_path / "cache") not in message


def test_a_fault_inside_an_archive_is_named_by_its_path_in_the_archive(tmp_path):
    root = write_folder(tmp_path / "toy")
    (root / "train" / "a" / "notes.txt").write_text("x")
    archive = tmp_path / "toy.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="toy")
    refused("image-folder", archive, "toy/train/a/notes.txt", "is not an image")
