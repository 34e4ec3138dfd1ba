"""Detection: the synthetic COCO set, the COCO loader, box AP by the official evaluation against
hand-made cases, torchvision detectors by name, the detection task's objectives and FPN
projectors, and the trainer end to end (every grouping, the engines, resume)."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools", reason="detection needs the optional dependency pycocotools")

from dtokd.data import build_data  # noqa: E402
from dtokd.data.coco import CocoDetectionSet, load_coco  # noqa: E402
from dtokd.data.synthetic_coco import SHAPES, _draw_shape, write_synthetic_coco  # noqa: E402
from dtokd.losses.feature import FeatureProjector  # noqa: E402
from dtokd.models import create_model  # noqa: E402
from dtokd.models.detection import loss_terms, parse_name  # noqa: E402
from dtokd.tasks import DetectionTask, build_task  # noqa: E402
from dtokd.tasks.coco_eval import coco_box_ap, detections_to_coco  # noqa: E402
from dtokd.train import load_config, train  # noqa: E402

from helpers import interrupt_after  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """The generated data sets go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DTOKD_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


STUDENT = "detection:retinanet_mobilenet_v3_small_fpn"
TEACHER = "detection:retinanet_resnet18_fpn"
SMALL = {"anchor_scale": 0.25}


# ------------------------------------------------------------------ the synthetic set


@pytest.mark.parametrize("shape", SHAPES)
def test_drawn_shape_fills_exactly_its_box(shape):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (40, 30), (0, 0, 0))
    _draw_shape(ImageDraw.Draw(image), shape, 7, 5, 17, 13, (255, 255, 255))
    ys, xs = np.nonzero(np.asarray(image)[:, :, 0])
    assert (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (7, 5, 17, 13)


def test_synthetic_set_is_seeded_valid_coco_with_varied_sizes(tmp_path):
    a = write_synthetic_coco(tmp_path / "a", train_images=40, val_images=4, image_size=192, classes=3, seed=1)
    b = write_synthetic_coco(tmp_path / "b", train_images=40, val_images=4, image_size=192, classes=3, seed=1)
    doc = json.loads((a / "annotations" / "instances_train.json").read_text())
    assert doc == json.loads((b / "annotations" / "instances_train.json").read_text())
    assert (a / "train" / "000001.png").read_bytes() == (b / "train" / "000001.png").read_bytes()
    assert [c["name"] for c in doc["categories"]] == list(SHAPES[:3])
    sizes = {(i["width"], i["height"]) for i in doc["images"]}
    assert len(sizes) > 10 and all(144 <= s <= 192 for size in sizes for s in size)
    areas = [a["area"] for a in doc["annotations"]]
    assert min(areas) < 32**2 and any(32**2 <= x < 96**2 for x in areas) and max(areas) >= 96**2
    for ann in doc["annotations"]:
        image = doc["images"][ann["image_id"] - 1]
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
    with pytest.raises(ValueError, match="classes=5"):
        write_synthetic_coco(tmp_path / "c", classes=5)


# ------------------------------------------------------------------ COCO evaluation, hand-made cases


def _tiny_coco(tmp_path, boxes, category_ids=(1,), iscrowd=None):
    """An annotation file with one 100x100 image per entry of ``boxes`` ([x, y, w, h], category)."""
    images = [{"id": i + 1, "file_name": f"{i + 1}.png", "width": 100, "height": 100} for i in range(len(boxes))]
    annotations = [
        {
            "id": k + 1,
            "image_id": k + 1,
            "category_id": c,
            "bbox": list(map(float, b)),
            "area": float(b[2] * b[3]),
            "iscrowd": int(iscrowd is not None and iscrowd[k]),
        }
        for k, (b, c) in enumerate(boxes)
    ]
    categories = [{"id": c, "name": f"c{c}"} for c in category_ids]
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return load_coco(path)


def test_perfect_detections_give_ap_100(tmp_path):
    coco = _tiny_coco(tmp_path, [([10, 10, 40, 40], 1), ([5, 5, 20, 20], 1), ([0, 0, 99, 99], 1)])
    results = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9}
        for a in coco.dataset["annotations"]
    ]
    metrics = coco_box_ap(coco, results, [1, 2, 3])
    assert metrics == pytest.approx(
        {"AP": 100.0, "AP50": 100.0, "AP75": 100.0, "APs": 100.0, "APm": 100.0, "APl": 100.0}
    )


def test_shifted_box_scores_the_thresholds_its_iou_passes(tmp_path):
    """A 40x40 box predicted 8 px to the right: IoU 32/48 = 0.667, which passes the thresholds
    0.50, 0.55, 0.60, 0.65 of the ten: AP 40, AP50 100, AP75 0; no small or large objects."""
    coco = _tiny_coco(tmp_path, [([10, 10, 40, 40], 1)])
    results = [{"image_id": 1, "category_id": 1, "bbox": [18.0, 10.0, 40.0, 40.0], "score": 0.9}]
    assert coco_box_ap(coco, results, [1]) == pytest.approx({"AP": 40.0, "AP50": 100.0, "AP75": 0.0, "APm": 40.0})


def test_no_detections_score_zero_where_defined(tmp_path):
    coco = _tiny_coco(tmp_path, [([10, 10, 40, 40], 1), ([5, 5, 10, 10], 1)])
    assert coco_box_ap(coco, [], [1, 2]) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "APs": 0.0, "APm": 0.0}


def test_detections_map_labels_back_to_the_files_category_ids():
    rows = detections_to_coco(5, torch.tensor([[1.0, 2.0, 11.0, 22.0]]), torch.tensor([0.5]), torch.tensor([2]), [3, 7])
    assert rows == [{"image_id": 5, "category_id": 7, "bbox": [1.0, 2.0, 10.0, 20.0], "score": 0.5}]


# ------------------------------------------------------------------ the loader


def test_loader_maps_categories_drops_crowds_and_flips_boxes_with_pixels(tmp_path):
    from PIL import Image

    coco = _tiny_coco(tmp_path, [([10, 20, 30, 40], 7), ([50, 5, 10, 10], 3)], category_ids=(3, 7), iscrowd=[0, 1])
    for i in (1, 2):
        pixels = np.zeros((100, 100, 3), np.uint8)
        pixels[20:60, 10:40] = 255  # the first image's object
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    dataset = CocoDetectionSet(coco, tmp_path, [1, 2], flip=True, workers=0, image_size=100)
    image, target = dataset[0]
    assert target["labels"].tolist() == [2] and target["boxes"].tolist() == [[10.0, 20.0, 40.0, 60.0]]
    assert dataset[1][1]["boxes"].shape == (0, 4)  # the crowd box is not a training target
    dataset.flips = torch.tensor([True, False])
    flipped, target = dataset[0]
    assert torch.equal(flipped, image.flip(-1))
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0])
    assert (x1, y1, x2, y2) == (60, 20, 90, 60)
    assert flipped[0, y1:y2, x1:x2].min() == 1 and flipped[0].sum() == flipped[0, y1:y2, x1:x2].sum()


def test_epoch_batches_depend_only_on_seed_and_epoch():
    data = build_data(
        "synthetic-coco", image_size=48, val_fraction=0.25, workers=0, synthetic={"train_images": 12, "val_images": 3}
    )
    assert data.detection and len(data.train) == 9 and len(data.val) == 3 and len(data.test) == 3

    def ids(rank, world, epoch=0):
        return [
            [t["image_id"] for t in targets]
            for _, targets in data.train.train_batches(4, 0, epoch, rank=rank, world=world)
        ]

    def pixels(epoch):
        return [torch.cat([i.flatten() for i in images]) for images, _ in data.train.train_batches(4, 0, epoch)]

    whole = ids(0, 1)
    halves = [ids(0, 2), ids(1, 2)]
    assert [sorted(a + b) for a, b in zip(*halves)] == [sorted(b) for b in whole]
    assert all(torch.equal(a, b) for a, b in zip(pixels(0), pixels(0)))
    assert ids(0, 1, epoch=1) != whole
    with pytest.raises(ValueError, match="data.synthetic: unknown option"):
        build_data("synthetic-coco", synthetic={"images": 3})
    with pytest.raises(ValueError, match="not data.transform"):
        build_data("synthetic-coco", transform={"re_prob": 0.1})


# ------------------------------------------------------------------ detectors and the task


@pytest.mark.parametrize(
    "name", ["detection:fasterrcnn_mobilenet_v3_small_fpn", STUDENT, "detection:fcos_mobilenet_v3_small_fpn"]
)
def test_detector_loss_dict_has_the_known_terms(name):
    torch.manual_seed(0)
    model = create_model(name, 2, 3, 48, SMALL)
    model.train()
    images = [torch.rand(3, 48, 40), torch.rand(3, 40, 48)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 10.0, 20.0, 30.0]]), "labels": torch.tensor([2])},
    ]
    assert tuple(model(images, targets)) == loss_terms(model)
    model.eval()
    assert set(model(images)[0]) == {"boxes", "scores", "labels"}


def test_detector_names_are_checked():
    assert parse_name("detection:fcos_resnet50_fpn") == ("fcos", "resnet50")
    with pytest.raises(ValueError, match="unknown detector"):
        create_model("detection:yolo_resnet50_fpn", 2)
    with pytest.raises(ValueError, match="norm='sync'"):
        create_model("detection:fcos_resnet18_fpn", 2, kwargs={"norm": "sync"})


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return create_model(STUDENT, 2, 3, 48, SMALL), create_model(TEACHER, 2, 3, 48, SMALL).eval()


def _batch():
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 48, 44, generator=g), torch.rand(3, 40, 48, generator=g)]
    targets = [
        {"boxes": torch.tensor([[4.0, 6.0, 30.0, 28.0], [30.0, 2.0, 44.0, 12.0]]), "labels": torch.tensor([1, 2])},
        {"boxes": torch.tensor([[10.0, 10.0, 20.0, 30.0]]), "labels": torch.tensor([2])},
    ]
    return images, targets


def test_objective_groupings_partition_the_detector_loss(pair):
    student, teacher = pair
    images, targets = _batch()
    totals = {}
    for terms in ("sum", "kind", "each"):
        task = DetectionTask(student, teacher, {"det": {"type": "detector", "terms": terms}})
        _, losses = task(images, targets)
        assert list(losses) == task.loss_names
        totals[terms] = sum(losses.values())
    assert task.loss_names == ["det/classification", "det/bbox_regression"]
    assert DetectionTask(student, teacher, {"det": {"type": "detector", "terms": "kind"}}).loss_names == [
        "det/cls",
        "det/box",
    ]
    torch.testing.assert_close(totals["kind"], totals["sum"])
    two_stage = create_model("detection:fasterrcnn_mobilenet_v3_small_fpn", 2, 3, 48, SMALL)
    assert DetectionTask(two_stage, None, {"det": {"type": "detector", "terms": "kind"}}).loss_names == [
        "det/cls",
        "det/box",
        "det/obj",
    ]
    torch.testing.assert_close(totals["each"], totals["sum"])


def test_fpn_levels_pair_by_size_with_a_projector_each(pair):
    student, teacher = pair
    task = DetectionTask(student, teacher, {"det": {"type": "detector"}, "fpn": {"type": "fpn"}})
    # MobileNetV3-small's FPN levels 0 and 1 are both at stride 32 (8 px at 256), as ResNet's C5 level '2'
    assert task.pairs["fpn"] == {"0": "2", "1": "2", "p6": "p6", "p7": "p7"}
    assert task.loss_names == ["det", "fpn/0", "fpn/1", "fpn/p6", "fpn/p7"]
    for level in task.pairs["fpn"]:
        assert task.projectors[f"fpn__{level}"].proj.weight.shape == (256, 256)
    images, targets = _batch()
    levels, losses = task(images, targets)
    assert len(levels) == 4 and all(loss.requires_grad for loss in losses.values())
    summed = DetectionTask(
        student,
        teacher,
        {"det": {"type": "detector"}, "fpn": {"type": "fpn", "per_level": False, "levels": ["0", "p7"]}},
    )
    assert summed.loss_names == ["det", "fpn"]
    with pytest.raises(ValueError, match="not levels of the student"):
        DetectionTask(student, teacher, {"det": {"type": "detector"}, "fpn": {"type": "fpn", "levels": ["p9"]}})


def test_teacher_features_come_from_the_students_input_renormalised(pair):
    student, _ = pair
    torch.manual_seed(1)
    teacher = create_model(
        TEACHER, 2, 3, 48, {**SMALL, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}
    ).eval()
    task = DetectionTask(student, teacher, {"det": {"type": "detector"}, "fpn": {"type": "fpn", "norm": "none"}})
    images, targets = _batch()
    task(images, targets)
    padded = task._captured["input"]
    raw = padded * torch.tensor(student.transform.image_std).view(1, 3, 1, 1) + torch.tensor(
        student.transform.image_mean
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = teacher.backbone((raw - 0.5) / 0.25)
    torch.testing.assert_close(task._last_teacher["2"], expected["2"], rtol=1e-4, atol=1e-4)


def test_pearson_projection_loss_is_one_minus_correlation():
    """PKD's loss with an identity projector: (n-1)/n (1 - mean over channels of the Pearson
    correlation over batch and positions), computed in float64 with numpy."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(2, 3, 4, 5, dtype=torch.float64)
    projector = FeatureProjector(3, 3, spatial=True, teacher_norm="pearson", distance="mse", learned=False)
    assert not list(projector.parameters())
    a = s.numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    b = t.numpy().transpose(1, 0, 2, 3).reshape(3, -1)
    n = a.shape[1]
    correlation = np.mean([np.corrcoef(a[c], b[c])[0, 1] for c in range(3)])
    assert projector(s, t).item() == pytest.approx((n - 1) / n * (1 - correlation), rel=1e-5)
    with pytest.raises(ValueError, match="equal widths"):
        FeatureProjector(3, 4, spatial=True, learned=False)


def test_task_and_data_must_agree(pair):
    student, teacher = pair
    detection = build_data("synthetic-coco", image_size=48, workers=0, synthetic={"train_images": 4, "val_images": 2})
    digits = build_data("digits")
    with pytest.raises(ValueError, match="set task: detection"):
        build_task("classification", student, None, {"det": {"type": "detector"}}, detection)
    with pytest.raises(ValueError, match="needs a detection data set"):
        build_task("detection", student, None, {"det": {"type": "detector"}}, digits)
    with pytest.raises(ValueError, match="type 'detector'"):
        build_task("detection", student, teacher, {"fpn": {"type": "fpn"}}, detection)
    with pytest.raises(ValueError, match="terms='all'"):
        build_task("detection", student, None, {"det": {"type": "detector", "terms": "all"}}, detection)


# ------------------------------------------------------------------ the trainer end to end


def _config(tmp_path, *overrides):
    base = [
        "name=det",
        "task=detection",
        "epochs=1",
        "batch_size=4",
        "eval_batch_size=8",
        "log_every=1",
        "data.name=synthetic-coco",
        "data.image_size=48",
        "data.workers=0",
        "data.val_fraction=0.25",
        "data.synthetic={train_images: 12, val_images: 4}",
        f"student.name={STUDENT}",
        "student.kwargs={anchor_scale: 0.25}",
        "optim.lr=0.01",
        "losses={det: {type: detector}}",
    ]
    return load_config(None, base + list(overrides))


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detection-teacher")
    config = _config(folder, f"student.name={TEACHER}")
    summary = train(config, folder / "teacher", progress=False, verbose=False, max_steps=2)
    assert summary["metric"] == "AP" and summary["last_test_AP"] >= 0.0
    metrics = json.loads((folder / "teacher" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"val_AP", "test_AP", "test_AP50", "test_AP75"} <= set(metrics)
    return folder / "teacher" / "best.pt"


DISTILL = [
    ("dto", "exact", "terms: sum", "per_level: true", None),
    ("dto", "exact", "terms: kind", "per_level: false", None),
    ("dto", "representation", "terms: each", "per_level: true, norm: pearson", None),
    ("dto", "subset", "terms: sum", "per_level: true", "backbone.fpn"),
    ("dto-amortized", "exact", "terms: kind", "per_level: true", None),
    ("fixed", "exact", "terms: sum", "per_level: false, norm: pearson", None),
]


@pytest.mark.parametrize(
    "method, engine, terms, fpn, gram", DISTILL, ids=[f"{d[0]}-{d[1]}-{d[2][7:]}" for d in DISTILL]
)
def test_distillation_through_every_grouping_and_engine(tmp_path, teacher_weights, method, engine, terms, fpn, gram):
    options = "balancer.options={weights: [1.0, 2.0]}" if method == "fixed" else "balancer.options={}"
    config = _config(
        tmp_path,
        f"teacher.name={TEACHER}",
        f"teacher.checkpoint={teacher_weights}",
        "teacher.kwargs={anchor_scale: 0.25}",
        f"balancer.method={method}",
        f"balancer.engine={engine}",
        f"losses={{det: {{type: detector, {terms}}}, fpn: {{type: fpn, {fpn}}}}}",
        options,
        *([f"balancer.gram_params={gram}"] if gram else []),
    )
    summary = train(config, tmp_path / "run", progress=False, verbose=False, max_steps=2)
    assert summary["epochs_run"] == 1 and "last_test_AP" in summary
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    weights = [k for k in steps[-1] if k.startswith("loss_weight/")]
    assert len(steps) == 2 and all(np.isfinite(steps[-1][k]) for k in weights)
    teacher = json.loads((tmp_path / "run" / "teacher.json").read_text())
    assert "test_AP" in teacher


def test_detection_run_resumes_to_the_same_weights(tmp_path, monkeypatch, teacher_weights):
    config = _config(
        tmp_path,
        "epochs=2",
        f"teacher.name={TEACHER}",
        f"teacher.checkpoint={teacher_weights}",
        "teacher.kwargs={anchor_scale: 0.25}",
        "balancer.method=dto",
        "losses={det: {type: detector}, fpn: {type: fpn, per_level: false}}",
    )
    train(config, tmp_path / "straight", progress=False, verbose=False, max_steps=2)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train(config, tmp_path / "resumed", progress=False, verbose=False, max_steps=2)
    train(None, tmp_path / "resumed", resume=True, progress=False, verbose=False, max_steps=2)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    for key in a["student"]:
        assert torch.equal(a["student"][key], b["student"][key]), key
    for key in a["projectors"]:
        assert torch.equal(a["projectors"][key], b["projectors"][key]), key


def test_two_processes_match_one_process(tmp_path, teacher_weights):
    """``torchrun --nproc_per_node 2`` against one process on the same global batches: a
    batch-independent student (frozen normalisation) and equal image sizes (so both pad alike)."""
    from test_torchrun import finish, torchrun

    lines = [
        "name: det-ddp",
        "task: detection",
        "epochs: 1",
        "batch_size: 4",
        "eval_batch_size: 8",
        "log_every: 1",
        "data: {name: synthetic-coco, image_size: 48, workers: 0, val_fraction: 0.25,"
        " synthetic: {train_images: 12, val_images: 4, size_jitter: 0.0}}",
        f"student: {{name: '{STUDENT}', kwargs: {{anchor_scale: 0.25, norm: frozen}}}}",
        f"teacher: {{name: '{TEACHER}', checkpoint: '{teacher_weights}', kwargs: {{anchor_scale: 0.25}}}}",
        "losses: {det: {type: detector, terms: kind}, fpn: {type: fpn, per_level: false}}",
        "balancer: {method: dto, engine: exact}",
        "optim: {lr: 0.01}",
    ]
    config = tmp_path / "det.yaml"
    config.write_text("\n".join(lines))
    finish(torchrun(config, tmp_path / "two"))
    train(load_config(config), tmp_path / "one", progress=False, verbose=False)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=False)
    assert {int(v["momentum_buffer"].abs().sum() > 0) for v in one["optimizer"]["state"].values()} == {1}  # it trained
    for key in one["student"]:
        torch.testing.assert_close(two["student"][key], one["student"][key], rtol=1e-4, atol=1e-5)
    for key in one["projectors"]:
        torch.testing.assert_close(two["projectors"][key], one["projectors"][key], rtol=1e-4, atol=1e-5)


def test_category_id_labels_keep_the_files_ids(tmp_path):
    """``labels="category-id"``: torchvision's COCO convention (label = category id, gaps as N/A)."""
    coco = _tiny_coco(tmp_path, [([10, 20, 30, 40], 7), ([50, 5, 10, 10], 3)], category_ids=(3, 7))
    from PIL import Image

    for i in (1, 2):
        Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(tmp_path / f"{i}.png")
    dataset = CocoDetectionSet(coco, tmp_path, [1, 2], flip=False, workers=0, image_size=100, labels="category-id")
    assert dataset.classes == ("N/A", "N/A", "c3", "N/A", "N/A", "N/A", "c7")
    assert dataset[0][1]["labels"].tolist() == [7]
    assert (
        detections_to_coco(
            1, torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([0.5]), torch.tensor([7]), dataset.category_ids
        )[0]["category_id"]
        == 7
    )
    with pytest.raises(ValueError, match="data.labels='ids'"):
        CocoDetectionSet(coco, tmp_path, [1], flip=False, workers=0, image_size=100, labels="ids")


def test_eval_and_report_of_a_detection_run(teacher_weights, tmp_path, capsys):
    from dtokd import cli

    run = teacher_weights.parent
    assert cli.main(["eval", str(run), "--device", "cpu", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert result["AP"] == pytest.approx(logged["test_AP"]) and result["AP50"] == pytest.approx(logged["test_AP50"])
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    table = (tmp_path / "report" / "report.md").read_text()
    assert "best val AP" in table and "last test AP50" in table and "top1" not in table


def test_detection_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="compile='default' is refused for detection"):
        train(_config(tmp_path, "compile=default"), tmp_path / "run", progress=False, verbose=False)
    with pytest.raises(ValueError, match="data.mixup"):
        train(_config(tmp_path, "data.mixup={mixup_alpha: 0.8}"), tmp_path / "run2", progress=False, verbose=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_detection_distills_on_cuda(tmp_path, teacher_weights, amp):
    """The detection path on a GPU: teacher features, projectors, DTO over 5 objectives,
    evaluation; without AMP the first step's losses equal the CPU run's to float32 accuracy."""
    overrides = [
        f"teacher.name={TEACHER}",
        f"teacher.checkpoint={teacher_weights}",
        "teacher.kwargs={anchor_scale: 0.25}",
        "balancer.method=dto",
        "losses={det: {type: detector}, fpn: {type: fpn}}",
        f"amp={amp}",
    ]
    steps = {}
    for device in ("cuda", "cpu") if amp == "none" else ("cuda",):
        folder = tmp_path / device
        summary = train(
            _config(tmp_path, *overrides, f"device={device}"), folder, progress=False, verbose=False, max_steps=2
        )
        assert "last_test_AP" in summary
        steps[device] = json.loads((folder / "steps.jsonl").read_text().splitlines()[0])
        assert json.loads((folder / "meta.json").read_text())["device"].startswith(device)
    assert all(np.isfinite(v) for k, v in steps["cuda"].items() if k.startswith("loss/"))
    if amp == "none":
        for key, value in steps["cpu"].items():
            if key.startswith(("loss/", "loss_weight/")):
                assert steps["cuda"][key] == pytest.approx(value, rel=1e-3, abs=1e-4), key


@pytest.mark.parametrize("head", ["fasterrcnn", "retinanet", "fcos"])
def test_resnet50_detectors_have_torchvisions_state_dict(head):
    """``detection:<head>_resnet50_fpn`` with ``norm: frozen`` has the parameter names and shapes
    of torchvision's ``<head>_resnet50_fpn`` for COCO (91 outputs; FrozenBatchNorm keeps no
    batch counter), so torchvision's released COCO weights load into it strictly; the anchors
    are torchvision's too."""
    import torchvision

    ours = create_model(f"detection:{head}_resnet50_fpn", 90, 3, 800, {"norm": "frozen"})
    theirs = torchvision.models.get_model(f"{head}_resnet50_fpn", weights=None, weights_backbone=None, num_classes=91)
    want = {k: v.shape for k, v in theirs.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in ours.state_dict().items()} == want
    generator = (ours.rpn if head == "fasterrcnn" else ours).anchor_generator
    reference = (theirs.rpn if head == "fasterrcnn" else theirs).anchor_generator
    assert generator.sizes == reference.sizes and generator.aspect_ratios == reference.aspect_ratios
    assert (ours.transform.min_size, ours.transform.max_size) == (theirs.transform.min_size, theirs.transform.max_size)
