"""Defects in a user's COCO-format data: each is refused before training in one line naming the
file, the image or annotation, and the problem; a test split without objects runs to the end."""

import json
import shutil

import pytest

pytest.importorskip("pycocotools", reason="detection needs the optional dependency pycocotools")

from dtokd.data import build_data  # noqa: E402
from dtokd.data.synthetic_coco import write_synthetic_coco  # noqa: E402
from dtokd.train import load_config, train  # noqa: E402


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_synthetic_coco(tmp_path_factory.mktemp("coco") / "set", train_images=6, val_images=3, image_size=32)


@pytest.fixture
def coco(pristine, tmp_path):
    """A fresh copy of the set; ``edit(split, change)`` rewrites one annotation file."""
    root = tmp_path / "set"
    shutil.copytree(pristine, root)

    def edit(split, change):
        path = root / "annotations" / f"instances_{split}.json"
        document = json.loads(path.read_text())
        change(document)
        path.write_text(json.dumps(document))
        return path

    return root, edit


def _load(root, **options):
    return build_data("coco", str(root), image_size=32, workers=0, **options)


def _first_annotation(document):
    return document["annotations"][0]


DEFECTS = [
    ("no bbox", lambda d: _first_annotation(d).pop("bbox"), "annotation 1 \\(image 1\\) has bbox=None"),
    ("bbox of three", lambda d: _first_annotation(d).update(bbox=[1, 2, 3]), "has bbox=\\[1, 2, 3\\]"),
    ("bbox with a word", lambda d: _first_annotation(d).update(bbox=[1, 2, "3", 4]), "four finite numbers"),
    ("bbox with nan", lambda d: _first_annotation(d).update(bbox=[1, 2, float("nan"), 4]), "four finite numbers"),
    ("negative width", lambda d: _first_annotation(d).update(bbox=[10, 10, -3, 4]), "negative width or height"),
    ("no area", lambda d: _first_annotation(d).pop("area"), "has no 'area'"),
    (
        "unknown category",
        lambda d: _first_annotation(d).update(category_id=7),
        "category_id=7, which the file's categories do not define \\(ids \\[1, 2\\]\\)",
    ),
    ("box right of the image", lambda d: _first_annotation(d).update(bbox=[500, 5, 4, 4]), "wholly outside its"),
    ("box above the image", lambda d: _first_annotation(d).update(bbox=[5, -20, 4, 4]), "wholly outside its"),
    (
        "annotation of an unlisted image",
        lambda d: _first_annotation(d).update(image_id=999),
        "belongs to an image the file does not list",
    ),
    ("image without a size", lambda d: d["images"][0].pop("width"), "image 1 has no 'width'"),
    ("missing image file", lambda d: d["images"][0].update(file_name="gone.png"), "gone.png' does not exist"),
]


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("change, message", [d[1:] for d in DEFECTS], ids=[d[0] for d in DEFECTS])
def test_a_defect_is_refused_naming_file_and_annotation(coco, split, change, message):
    root, edit = coco
    path = edit(split, change)
    with pytest.raises(ValueError, match=message) as refused:
        _load(root)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


def test_splits_with_different_categories_are_refused(coco):
    root, edit = coco
    edit("val", lambda d: d["categories"][1].update(name="triangle-ish"))
    with pytest.raises(ValueError, match="define different categories \\(id, name\\).*triangle-ish"):
        _load(root)


def test_an_empty_training_split_is_refused(coco):
    root, edit = coco
    with pytest.raises(ValueError, match="no training images left \\(6 listed, 6 carved for validation"):
        _load(root, val_fraction=0.95)
    edit("train", lambda d: d.update(images=[], annotations=[]))
    with pytest.raises(ValueError, match="instances_train.json lists no images"):
        _load(root)


def test_a_binary_annotation_file_is_named(coco):
    root, _ = coco
    path = root / "annotations" / "instances_train.json"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=f"{path} is not a COCO annotation file \\(UnicodeDecodeError"):
        _load(root)


def test_a_test_split_without_objects_runs_to_the_end_and_reports_no_test_ap(coco, tmp_path):
    """AP is undefined without ground truth: no test AP is reported, and the run finishes (it
    crashed after its checkpoint before, again on every resume)."""
    root, edit = coco
    edit("val", lambda d: d.update(annotations=[]))
    config = load_config(
        None,
        [
            "name=det",
            "task=detection",
            "epochs=1",
            "batch_size=2",
            "eval_batch_size=4",
            "log_every=1",
            "data.name=coco",
            f"data.root={root}",
            "data.image_size=32",
            "data.workers=0",
            "data.val_fraction=0.34",
            "student.name=detection:retinanet_mobilenet_v3_small_fpn",
            "student.kwargs={anchor_scale: 0.25}",
            "optim.lr=0.01",
            "losses={det: {type: detector}}",
        ],
    )
    summary = train(config, tmp_path / "run", progress=False, verbose=False, max_steps=1)
    assert summary["epochs_run"] == 1 and summary["best_val_AP"] >= 0
    assert summary["last_test_AP"] is None and summary["test_AP_at_best_val"] is None
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "val_AP" in metrics[-1] and not any(k.startswith("test_AP") for k in metrics[-1])
