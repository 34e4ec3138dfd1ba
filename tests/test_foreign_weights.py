"""Teachers (and student starts) from state dicts released by other projects: parameter-name
maps, the teacher's own input normalisation, and its accuracy reported before training."""

import json
import re
from pathlib import Path

import pytest
import torch

from dtokd.data import build_data
from dtokd.models import create_model, load_weights
from dtokd.models.foreign import KEY_MAP_PRESETS, Renormalize, check_normalize, remap_keys
from dtokd.models.weight_file import read_weights
from dtokd.report import report
from dtokd.tasks import evaluate_classifier as evaluate
from dtokd.train import load_config, train
from dtokd.train.checkpoint import checksum

SHARED_TEACHERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "teachers"
CIFAR10_STATS = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}


def chenyaofo_names(state: dict) -> dict:
    """Our resnetN's state dict under the parameter names of chenyaofo/pytorch-cifar-models,
    written out by hand (the inverse of the preset, independently)."""
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "stem":
            parts = [{"0": "conv1", "1": "bn1"}[parts[1]], *parts[2:]]
        elif parts[0] == "stages":
            parts = [f"layer{int(parts[1]) + 1}", *parts[2:]]
            parts = ["downsample" if p == "shortcut" else p for p in parts]
        elif parts[0] == "head":
            parts = ["fc", *parts[1:]]
        renamed[".".join(parts)] = value
    return renamed


@pytest.fixture(scope="module")
def foreign_teacher(tmp_path_factory):
    """A resnet8 trained here briefly on the synthetic set with CIFAR-10's normalisation, saved
    as a plain state dict with the other project's names."""
    folder = tmp_path_factory.mktemp("foreign")
    config = load_config(
        None,
        [
            "data.name=synthetic-rgb",
            "student.name=resnet8",
            "epochs=3",
            "batch_size=32",
            "name=t",
            f"student.normalize={json.dumps(CIFAR10_STATS)}",
        ],
    )
    train(config, folder / "run", progress=False)
    state = torch.load(folder / "run" / "best.pt", weights_only=True)["model"]
    path = folder / "resnet8_chenyaofo.pth"
    torch.save(chenyaofo_names(state), path)
    return path, state


def test_preset_maps_the_other_layout_back_exactly(foreign_teacher):
    path, ours = foreign_teacher
    foreign = torch.load(path, weights_only=True)
    assert "conv1.weight" in foreign and "layer2.0.downsample.0.weight" in foreign and "fc.bias" in foreign
    mapped = remap_keys(foreign, "cifar-resnet-chenyaofo")
    assert list(mapped) == list(ours)
    assert all(torch.equal(mapped[k], ours[k]) for k in ours)


def test_rule_lists_and_their_errors():
    state = {"module.fc.weight": 1, "module.fc.bias": 2}
    assert remap_keys(state, [[r"^module\.", ""], [r"^fc\.", "head."]]) == {"head.weight": 1, "head.bias": 2}
    assert remap_keys(state, "strip-module") == {"fc.weight": 1, "fc.bias": 2}
    assert remap_keys(state, None) == state
    with pytest.raises(ValueError, match=r"teacher.key_map='nope' is not a known preset; use one of \["):
        remap_keys(state, "nope", "teacher.key_map")
    with pytest.raises(ValueError, match=r"key_map\[0\]=\['x'\] must be a \[pattern, replacement\] pair"):
        remap_keys(state, [["x"]])
    with pytest.raises(ValueError, match=r"key_map\[0\]: pattern '\(' is not a valid regular expression"):
        remap_keys(state, [["(", ""]])
    with pytest.raises(ValueError, match="maps both 'module.fc.weight' and 'module.fc.bias' to 'w'"):
        remap_keys(state, [[r"^.*$", "w"]])
    assert set(KEY_MAP_PRESETS) >= {"cifar-resnet-chenyaofo", "strip-module"}


def test_normalize_checks():
    assert check_normalize(None, "x") is None
    assert check_normalize({"mean": [0, 1], "std": [1, 2]}, "x") == ((0.0, 1.0), (1.0, 2.0))
    for bad, message in (
        ({"mean": [0]}, "exactly the keys 'mean' and 'std'"),
        ({"mean": [0, 1], "std": [1]}, "gives 2 means but 1 stds"),
        ({"mean": [0], "std": [0]}, "must be positive"),
        ({"mean": "0", "std": [1]}, "must be a list of numbers"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            check_normalize(bad, "teacher.normalize")


def test_renormalize_equals_normalising_the_raw_pixels_with_the_models_statistics():
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    data_stats = ((0.1, 0.5, 0.9), (0.3, 0.2, 0.25))
    model_stats = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    as_data = (pixels - torch.tensor(data_stats[0]).view(1, 3, 1, 1)) / torch.tensor(data_stats[1]).view(1, 3, 1, 1)
    expected = (pixels - torch.tensor(model_stats[0]).view(1, 3, 1, 1)) / torch.tensor(model_stats[1]).view(1, 3, 1, 1)
    got = Renormalize(data_stats, model_stats)(as_data.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def distill_overrides(path, *extra):
    return [
        "data.name=synthetic-rgb",
        "batch_size=32",
        "epochs=1",
        "name=s",
        "student.name=mlp_small",
        "teacher.name=resnet8",
        f"teacher.checkpoint={path}",
        "losses={distill: {type: kd}, task: {type: ce}}",
        "balancer.method=dto",
        *extra,
    ]


def test_distilling_from_the_foreign_teacher_reports_its_accuracy_first(foreign_teacher, tmp_path):
    path, ours = foreign_teacher
    with pytest.raises(
        ValueError,
        match=r"do not fit model CifarResNet: 56 missing name\(s\) \[.stem.0.weight., "
        r".*56 unexpected name\(s\) \[.conv1.weight.*need teacher.key_map",
    ):
        train(load_config(None, distill_overrides(path)), tmp_path / "unmapped", progress=False)
    overrides = distill_overrides(
        path, "teacher.key_map=cifar-resnet-chenyaofo", f"teacher.normalize={json.dumps(CIFAR10_STATS)}"
    )
    summary = train(load_config(None, overrides), tmp_path / "run", progress=False)
    recorded = json.loads((tmp_path / "run" / "teacher.json").read_text())
    assert summary["teacher"] == recorded
    # independent reference: the teacher on data normalised with its own statistics
    stats = (tuple(CIFAR10_STATS["mean"]), tuple(CIFAR10_STATS["std"]))
    data = build_data("synthetic-rgb", seed=0, augment=False, normalize=stats)
    teacher = create_model("resnet8", data.num_classes, data.in_channels, data.image_size)
    teacher.load_state_dict(ours)
    for split in ("val", "test"):
        expected = evaluate(teacher, getattr(data, split), 512, torch.device("cpu"))
        assert recorded[f"{split}_top1"] == pytest.approx(expected["top1"], abs=1e-9)
        assert recorded[f"{split}_loss"] == pytest.approx(expected["loss"], rel=1e-4)
    assert recorded["test_top1"] > 50.0  # the mapping found a trained teacher (4 classes: chance 25 %)
    assert recorded["weights"] == checksum(teacher.state_dict())  # which teacher, by content
    markdown = report([tmp_path / "run"], tmp_path / "report").read_text()
    assert f"{recorded['val_top1']:.2f} / {recorded['test_top1']:.2f}" in markdown


def test_without_its_own_normalisation_the_teacher_sees_other_inputs(foreign_teacher, tmp_path):
    """The student's statistics differ from CIFAR-10's here, so leaving teacher.normalize out
    changes what the teacher sees: the reported accuracy shows it."""
    path, _ = foreign_teacher
    overrides = distill_overrides(path, "teacher.key_map=cifar-resnet-chenyaofo")
    own = train(
        load_config(None, overrides + [f"teacher.normalize={json.dumps(CIFAR10_STATS)}"]),
        tmp_path / "own",
        progress=False,
    )["teacher"]
    other = train(load_config(None, overrides), tmp_path / "other", progress=False)["teacher"]
    assert own["test_loss"] != pytest.approx(other["test_loss"], rel=1e-3)


def test_student_start_from_a_foreign_state_dict(foreign_teacher, tmp_path):
    path, ours = foreign_teacher
    config = load_config(
        None,
        [
            "data.name=synthetic-rgb",
            "batch_size=32",
            "epochs=1",
            "name=s",
            "student.name=resnet8",
            f"student.weights={path}",
            "student.key_map=cifar-resnet-chenyaofo",
            "optim.lr=0.0",
            "optim.weight_decay=0.0",
            "optim.momentum=0.0",
            "data.augment=false",
        ],
    )
    train(config, tmp_path / "run", progress=False)
    trained = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["student"]
    for key, value in ours.items():
        if "running" not in key and "num_batches" not in key:  # lr 0: only BatchNorm statistics move
            assert torch.equal(trained[key], value), key
    with pytest.raises(ValueError, match="teacher.normalize gives 1 channel"):
        train(
            load_config(
                None,
                distill_overrides(
                    path, "teacher.key_map=cifar-resnet-chenyaofo", "teacher.normalize={mean: [0.5], std: [0.2]}"
                ),
            ),
            tmp_path / "bad",
            progress=False,
        )


@pytest.mark.skipif(
    not (SHARED_TEACHERS / "cifar10_resnet56.pth").is_file(),
    reason="the shared pretrained teachers (../shared/data/teachers) are not present",
)
@pytest.mark.parametrize(
    "name, classes",
    [("cifar10_resnet56", 10), ("cifar10_resnet20", 10), ("cifar100_resnet56", 100), ("cifar100_resnet20", 100)],
)
def test_shared_pretrained_teachers_load_strictly_with_the_preset(name, classes):
    depth = int(name.rsplit("resnet", 1)[1])
    model = create_model(f"resnet{depth}", classes)
    state = torch.load(SHARED_TEACHERS / f"{name}.pth", weights_only=True)
    model.load_state_dict(remap_keys(state, "cifar-resnet-chenyaofo"))  # strict: every key accounted for
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert logits.shape == (2, classes) and torch.isfinite(logits).all()


@pytest.mark.parametrize("zip_format", [True, False])
def test_weights_load_memory_mapped_and_from_the_pre_1_6_format(tmp_path, zip_format, monkeypatch):
    model = create_model("mlp_small", num_classes=10, in_channels=1)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    maps, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: maps.append(k.get("mmap")) or real_load(*a, **k))
    state, identity = read_weights(path)
    assert maps == [zip_format]  # mapped where torch's zip format allows it
    assert identity == {} and state.keys() == model.state_dict().keys()
    for a, b in zip(state.values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    loaded = create_model("mlp_small", num_classes=10, in_channels=1)
    load_weights(loaded, path)
    torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
