"""Data loading, the model zoo, feature taps and distillation losses."""

import gzip
import os
import re
import shutil
import tarfile
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dtokd.data import build_data, sources, train_loader
from dtokd.data.tensor_dataset import Augmentation
from dtokd.interrupts import exclusive
from dtokd.losses import FeatureProjector, dkd_loss, kd_loss
from dtokd.losses.dkd import dkd_parts
from dtokd.models import FeatureTaps, create_model
from dtokd.models.registry import ZOO
from dtokd.tasks import ClassificationTask

# ------------------------------------------------------------------ data


def test_validation_split_is_seeded_and_disjoint():
    a, b, c = (build_data("synthetic", val_fraction=0.25, seed=s) for s in (1, 1, 2))
    assert len(a.val) == 64 and len(a.train) == 192 and len(a.test) == 64
    assert torch.equal(a.val.images, b.val.images)
    assert not torch.equal(a.val.images, c.val.images)
    train_rows = {tuple(r.flatten().tolist()) for r in a.train.images}
    assert not any(tuple(r.flatten().tolist()) in train_rows for r in a.val.images[:10])


def test_normalisation_uses_training_statistics():
    data = build_data("synthetic", augment=False)
    images, _ = data.train.__getitems__(list(range(len(data.train))))
    assert images.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert images.std().item() == pytest.approx(1.0, abs=1e-2)


def test_crop_matches_a_naive_reference():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    generator = torch.Generator().manual_seed(0)
    out = Augmentation(pad=1)(images, generator)
    generator = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 3, (2,), generator=generator)
    dx = torch.randint(0, 3, (2,), generator=generator)
    padded = F.pad(images, (1, 1, 1, 1))
    for i in range(2):
        assert torch.equal(out[i], padded[i, :, dy[i] : dy[i] + 4, dx[i] : dx[i] + 4])


def test_batches_depend_only_on_seed_and_epoch():
    data = build_data("synthetic")
    first = [y for _, y in train_loader(data.train, 32, seed=3, epoch=1)]
    build_data("synthetic")  # unrelated work in between
    again = [y for _, y in train_loader(data.train, 32, seed=3, epoch=1)]
    other = [y for _, y in train_loader(data.train, 32, seed=3, epoch=2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_and_search_order(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    train_images, test_images = rng.integers(0, 255, (20, 28, 28)), rng.integers(0, 255, (5, 28, 28))
    for (img_name, lab_name), images in zip(sources.FASHION_FILES.values(), (train_images, test_images)):
        _write_idx(tmp_path / img_name, images)
        _write_idx(tmp_path / lab_name, np.arange(len(images)) % 10)
    monkeypatch.setenv("DTOKD_DATA", str(tmp_path))
    raw = sources.load_fashion_mnist(None, download=False)
    assert raw.train_images.shape == (20, 1, 28, 28)
    assert torch.equal(raw.train_images[3, 0], torch.from_numpy(train_images[3].astype(np.uint8)))
    assert raw.test_labels.tolist() == [0, 1, 2, 3, 4]


def test_missing_fashion_mnist_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("DTOKD_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="nowhere.*apt-get install dataset-fashion-mnist"):
        sources.load_fashion_mnist(None, download=False)


def _toy_archive(tmp_path):
    from PIL import Image

    root = tmp_path / "toy"
    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255)}
    for split, n in (("train", 3), ("test", 2)):
        for name, colour in colours.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), colour).save(root / split / name / f"{i}.png")
    archive = tmp_path / "toy.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="toy")
    return root, archive


def test_image_folder_from_tar_gz(tmp_path, monkeypatch):
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))
    _, archive = _toy_archive(tmp_path)
    raw = sources.load_image_folder(archive, image_size=8)
    assert raw.classes == ("cat", "dog")
    assert raw.train_images.shape == (6, 3, 8, 8) and raw.test_labels.tolist() == [0, 0, 1, 1]
    assert raw.train_images[0, :, 0, 0].tolist() == [255, 0, 0]
    cached = sources.load_image_folder(archive, image_size=8)  # second read comes from the tensor cache
    assert torch.equal(cached.train_images, raw.train_images)


def test_a_data_root_is_keyed_by_its_content(tmp_path):
    root, archive = _toy_archive(tmp_path)
    key = sources.content_key(archive)
    copy = tmp_path / "copy.tar.gz"
    shutil.copy(archive, copy)
    os.utime(copy, ns=(1, 1))  # a copy re-provisioned with another time: the same bytes, the same key
    assert sources.content_key(copy) == key
    with open(copy, "ab") as f:
        f.write(b"\0")
    assert sources.content_key(copy) != key
    folder_key = sources.content_key(root)
    (root / "train" / "cat" / "0.png").unlink()
    assert sources.content_key(root) != folder_key


def test_processes_that_load_one_archive_at_once_take_turns(tmp_path, monkeypatch):
    """The cells of a parallel bench start together: the second waits while the first extracts
    (they raced before: one removed the folder the other was extracting into)."""
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))
    _, archive = _toy_archive(tmp_path)
    loaded = []
    with exclusive(
        tmp_path / "cache" / "locks" / f"toy.tar.gz-{sources.content_key(archive)}.lock"
    ):  # another process is extracting
        reader = threading.Thread(target=lambda: loaded.append(sources.load_image_folder(archive, image_size=8)))
        reader.start()
        reader.join(timeout=1.0)
        assert reader.is_alive() and not loaded and not (tmp_path / "cache" / "extracted").exists()
    reader.join()
    assert loaded[0].train_images.shape == (6, 3, 8, 8)


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="unknown dataset 'mnist3'"):
        build_data("mnist3")


# ------------------------------------------------------------------ models


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_classify(name):
    small = name.startswith(("cnn", "mlp"))
    channels, size = (1, 28) if small else (3, 32)
    model = create_model(name, 7, channels, size).eval()
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
    assert logits.shape == (2, 7)
    torch.testing.assert_close(model.head(features), logits)


def test_torchvision_model_by_name_and_unknown_names():
    model = create_model("torchvision:resnet18", 5).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match="unknown model 'resnet21'"):
        create_model("resnet21", 10)
    with pytest.raises(ValueError, match="unknown torchvision classification model"):
        create_model("torchvision:nothing", 10)


def test_feature_taps():
    model = create_model("resnet20", 10).eval()
    taps = FeatureTaps(model, ["stages.1", "features"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        expected = model.forward_features(x)
    assert taps.features["stages.1"].shape == (2, 32, 16, 16)
    torch.testing.assert_close(taps.features["features"], expected)
    taps.close()
    with pytest.raises(ValueError, match="no submodule 'stages.9'"):
        FeatureTaps(model, ["stages.9"])


# ------------------------------------------------------------------ losses


def test_kd_loss_against_explicit_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    T = 3.0
    p_t, p_s = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    expected = (p_t * (p_t.log() - p_s.log())).sum(1).mean() * T * T
    torch.testing.assert_close(kd_loss(s, t, T), expected)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-12)


def test_kd_loss_cross_entropy_form_against_explicit_formula():
    """``forward_ce``: ``T^2 H(q, p)`` by hand in float64; it is the KL plus ``T^2`` times the
    teacher's mean entropy, with the KL's gradient, and a student equal to its teacher gets
    exactly that entropy term (the floor)."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(7, 6, generator=g, dtype=torch.float64)
    s = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    for T in (1.0, 2.5):
        q, log_p = torch.softmax(t / T, 1), torch.log_softmax(s / T, 1)
        entropy = -(q * q.log()).sum(1).mean() * T * T
        ce = kd_loss(s, t, T, divergence="forward_ce")
        torch.testing.assert_close(ce, -(q * log_p).sum(1).mean() * T * T)
        kl = kd_loss(s, t, T)
        torch.testing.assert_close(ce, kl + entropy)
        (grad_ce,) = torch.autograd.grad(ce, s)
        (grad_kl,) = torch.autograd.grad(kl, s)
        torch.testing.assert_close(grad_ce, grad_kl, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(kd_loss(t, t, T, divergence="forward_ce"), entropy)
    with pytest.raises(ValueError, match=re.escape("divergence='reverse_kl' is not allowed; use one of")):
        kd_loss(s, t, 2.0, divergence="reverse_kl")
    with pytest.raises(ValueError, match=re.escape("temperature=0.0 is not allowed; it must be a positive")):
        kd_loss(s, t, 0.0)


def test_classification_kd_spec_takes_the_cross_entropy_form():
    student, teacher = create_model("mlp_small", 4, 1, 8), create_model("cnn_small", 4, 1, 8).eval()
    sample = torch.randn(2, 1, 8, 8)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 4, (5,))
    specs = {"distill": {"type": "kd", "temperature": 2.0, "divergence": "forward_ce"}, "task": {"type": "ce"}}
    losses = ClassificationTask(student, teacher, specs, sample)(x, y)[1]
    with torch.no_grad():
        expected = kd_loss(student(x), teacher(x), 2.0, divergence="forward_ce")
    torch.testing.assert_close(losses["distill"].detach(), expected)
    default = ClassificationTask(student, teacher, {"distill": {"type": "kd", "temperature": 2.0}}, sample)(x, y)[1]
    assert losses["distill"].item() > default["distill"].item()  # the forward KL, by default: no entropy
    message = re.escape("losses.distill.divergence='jsd' is not allowed; use one of ['forward_kl', 'forward_ce']")
    with pytest.raises(ValueError, match=message):
        ClassificationTask(student, teacher, {"distill": {"type": "kd", "divergence": "jsd"}}, sample)


def test_framework_default_losses_pass_the_divergence_on():
    """The Lightning and Trainer integrations' default classifier losses (picklable) use the
    divergence and temperature they are given."""
    import pickle

    from dtokd.integrations.common import default_losses

    g = torch.Generator().manual_seed(4)
    s, t, y = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g), torch.randint(0, 4, (5,), generator=g)
    losses = pickle.loads(pickle.dumps(default_losses(2.0, "forward_ce")))(s, t, y)
    torch.testing.assert_close(losses["distill"], kd_loss(s, t, 2.0, divergence="forward_ce"))
    torch.testing.assert_close(losses["task"], F.cross_entropy(s, y))
    torch.testing.assert_close(default_losses()(s, t, y)["distill"], kd_loss(s, t, 4.0))


def test_dkd_decomposes_kd_per_sample():
    """DKD paper, Eq. (1)-(3): KD = TCKD + (1 - p_t^T) NCKD for each sample."""
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        s, t = torch.randn(1, 6, generator=g, dtype=torch.float64), torch.randn(1, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 6, (1,), generator=g)
        tckd, nckd = dkd_parts(s, t, y, temperature=2.0)
        p_target = torch.softmax(t / 2.0, 1)[0, y]
        torch.testing.assert_close(kd_loss(s, t, 2.0), tckd + (1 - p_target[0]) * nckd)
        torch.testing.assert_close(dkd_loss(s, t, y, alpha=1.0, beta=8.0, temperature=2.0), tckd + 8 * nckd)


def test_feature_projector_orthogonal_and_loss():
    projector = FeatureProjector(4, 6, spatial=False, orthogonal_weight=True, teacher_norm="none", distance="mse")
    w = projector.proj.weight  # (6, 4): orthonormal columns
    torch.testing.assert_close(w.T @ w, torch.eye(4), atol=1e-5, rtol=0)
    s, t = torch.randn(3, 4), torch.randn(3, 6)
    torch.testing.assert_close(projector(s, t), ((s @ w.T - t) ** 2).mean())
    ln = FeatureProjector(4, 6, spatial=True, teacher_norm="layernorm")
    t_map = torch.randn(2, 6, 3, 3) * 5 + 2
    normalised = ln.normalise(t_map)
    torch.testing.assert_close(normalised.mean(1), torch.zeros(2, 3, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(4, 6), (6, 4), (5, 5)])
@pytest.mark.parametrize("spatial", [False, True])
def test_orthogonal_projector_stays_orthogonal_under_weight_decay(shape, spatial):
    """The regression: torch's default (Householder) map for non-square weights multiplies by
    the integer part of the parameter's diagonal, so one AdamW or SGD step with weight decay
    turned the projector into 0. For maps, the projector is the same matrix at every position
    (a 1x1 convolution), not a per-entry constraint."""
    torch.manual_seed(0)
    projector = FeatureProjector(*shape, spatial=spatial, teacher_norm="none", distance="mse")
    for optimizer in (
        torch.optim.AdamW(projector.parameters(), lr=0.1, weight_decay=0.05),
        torch.optim.SGD(projector.parameters(), lr=0.1, weight_decay=5e-4),
    ):
        for _ in range(3):
            s = torch.randn(3, shape[0], 2, 2) if spatial else torch.randn(3, shape[0])
            t = torch.randn(3, shape[1], 2, 2) if spatial else torch.randn(3, shape[1])
            optimizer.zero_grad()
            projector(s, t).backward()
            optimizer.step()
    w = projector.proj.weight.detach()  # (teacher, student)
    small = min(shape)
    gram = w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T
    torch.testing.assert_close(gram, torch.eye(small), atol=1e-5, rtol=0)
    if spatial:
        s = torch.randn(2, shape[0], 3, 3)
        expected = torch.einsum("ts,bshw->bthw", w, s)
        torch.testing.assert_close(projector.proj(s.movedim(1, -1)).movedim(-1, 1), expected, rtol=1e-5, atol=1e-6)


def test_task_returns_named_losses_in_order_and_checks_specs():
    student, teacher = create_model("mlp_small", 4, 1, 8), create_model("cnn_small", 4, 1, 8).eval()
    sample = torch.randn(2, 1, 8, 8)
    specs = {
        "distill": {"type": "kd"},
        "feat": {"type": "feature", "student_tap": "features", "teacher_tap": "stages.1"},
    }
    with pytest.raises(ValueError, match="differ in spatial size"):
        ClassificationTask(student, teacher, specs, sample)
    specs["feat"]["teacher_tap"] = "features"
    specs["task"] = {"type": "ce"}
    task = ClassificationTask(student, teacher, specs, sample)
    _, losses = task(torch.randn(5, 1, 8, 8), torch.randint(0, 4, (5,)))
    assert list(losses) == ["distill", "feat", "task"]
    assert any(p is task.projectors["feat"].proj.parametrizations.weight.original for p in task.parameters())
    assert not any(p is q for p in task.parameters() for q in teacher.parameters())
    with pytest.raises(ValueError, match="need a teacher"):
        ClassificationTask(student, None, {"distill": {"type": "kd"}}, sample)
    with pytest.raises(ValueError, match="type='kl'"):
        ClassificationTask(student, teacher, {"distill": {"type": "kl"}}, sample)
    for kind in (["kd"], None):  # not a word (a list is not even hashable): named like any wrong type
        message = re.escape(f"losses.distill.type={kind!r} is not allowed for task 'classification'")
        with pytest.raises(ValueError, match=message):
            ClassificationTask(student, teacher, {"distill": {"type": kind}}, sample)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['temp'\]"):
        ClassificationTask(student, teacher, {"distill": {"type": "kd", "temp": 4}}, sample)


def test_cifar_python_format_reader(tmp_path):
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 255, (4, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [0, 1, 2, 3]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    raw = sources.load_cifar(tmp_path, 10)
    assert raw.train_images.shape == (20, 3, 32, 32) and raw.test_images.shape == (4, 3, 32, 32)
    assert raw.classes[3] == "c3" and raw.train_labels[:4].tolist() == [0, 1, 2, 3]
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f)[b"data"][0]
    assert raw.train_images[0, 0, 0, :3].tolist() == first[:3].tolist()  # channel-major rows
    with pytest.raises(FileNotFoundError, match="CIFAR-100 python files not found"):
        sources.load_cifar(tmp_path, 100)


def test_dkd_warm_up_ramps_linearly_with_progress():
    student, teacher = create_model("mlp_small", 4, 1, 8), create_model("cnn_small", 4, 1, 8).eval()
    sample = torch.randn(2, 1, 8, 8)
    task = ClassificationTask(student, teacher, {"distill": {"type": "dkd", "warmup_epochs": 2}}, sample)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    full = task(x, y)[1]["distill"]
    torch.testing.assert_close(task(x, y, 0.5)[1]["distill"], 0.25 * full)
    torch.testing.assert_close(task(x, y, 3.0)[1]["distill"], full)


def test_carve_validation_is_one_seeded_permutation():
    """Every data set kind carves its validation split with this: a seeded permutation, the first
    round(f n) for validation, the rest for training; limit_train shortens training only."""
    from dtokd.data.bundle import carve_validation

    val, train = carve_validation(10, 0.3, seed=4, limit_train=None)
    order = torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()
    assert (val, train) == (order[:3], order[3:])
    assert carve_validation(10, 0.3, seed=4, limit_train=2) == (order[:3], order[3:5])
    assert carve_validation(10, 0.0, seed=4, limit_train=None) == ([], order)
    assert carve_validation(10, 0.3, seed=5, limit_train=None)[0] != val
