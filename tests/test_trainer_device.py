"""The trainer's device handling on the CPU: where each step's numbers live (host-path and
device-path steps mixed in one epoch), data held and augmented where training reads it, the
device and compile settings, deferred checks by default.

A CPU has one device, so a device mix cannot happen here by itself; the tests check the
contract that prevents it (every step's ``StepInfo.packed`` on the losses' device, asked for
explicitly by the host path) and exercise the moves with the ``meta`` device as a stand-in
for an accelerator. ``tests/test_cuda.py`` runs the same trainer on a real GPU.
"""

import json

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from dtokd import make_balancer
from dtokd.balancing import base as balancer_base
from dtokd.balancing import stepinfo as stepinfo_module
from dtokd.data import build_data, eval_loader, place_data, train_loader
from dtokd.train import load_config, train
from dtokd.train.distributed import resolve_device

BASE = ["data.name=synthetic", "batch_size=32", "eval_batch_size=64", "student.name=mlp_small"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teacher") / "run"
    train(load_config(None, BASE + ["name=teacher", "student.name=cnn_small", "epochs=2"]), folder, progress=False)
    return folder / "best.pt"


def distill_overrides(teacher, *extra):
    return BASE + [
        "name=s",
        "epochs=2",
        "log_every=3",
        "teacher.name=cnn_small",
        f"teacher.checkpoint={teacher}",
        "losses={distill: {type: kd}, task: {type: ce}}",
        *extra,
    ]


# ------------------------------------------------------------------------ StepInfo placement


def test_stepinfo_keeps_packed_on_the_requested_device_and_reads_the_host_copy():
    values = torch.tensor([1.0, 2.0], dtype=torch.float64)
    info = stepinfo_module.StepInfo(
        ("a", "b"), values, torch.tensor([0.25, 0.75]), torch.tensor([0.5, 0.5]), device=torch.device("meta")
    )
    assert info.packed.device.type == "meta"  # where a training loop sums it
    assert info.per_loss_on_device.device.type == "meta" and info.per_loss_on_device.shape == (6,)
    assert info.losses == {"a": 1.0, "b": 2.0} and info.weights == {"a": 0.25, "b": 0.75}
    host = stepinfo_module.StepInfo(
        ("a", "b"),
        values,
        torch.tensor([0.25, 0.75]),
        torch.tensor([0.5, 0.5]),
        torch.eye(2, dtype=torch.float64),
        torch.eye(2, dtype=torch.float64),
    )
    assert host.per_loss_on_device.tolist() == [1.0, 2.0, 0.25, 0.75, 0.5, 0.5]  # the Grams are left out


def test_stepinfo_reads_the_per_loss_numbers_and_their_sums_by_name_where_they_lie():
    """What a training loop sums over an epoch (``per_loss_on_device``) is read back by name, as
    views on its own device (no host read): the losses, the weights, the loss weights."""
    info = stepinfo_module.StepInfo(
        ("a", "b"),
        torch.tensor([1.0, 2.0]),
        torch.tensor([0.25, 0.75]),
        torch.tensor([0.5, 0.5]),
        torch.eye(2, dtype=torch.float64),
        torch.eye(2, dtype=torch.float64),
    )
    total = info.per_loss_on_device + info.per_loss_on_device
    read = stepinfo_module.StepInfo.read_per_loss(total)
    assert read.losses.tolist() == [2.0, 4.0] and read.weights.tolist() == [0.5, 1.5]
    assert read.loss_weights.tolist() == [1.0, 1.0]
    assert read.losses.data_ptr() == total.data_ptr()  # a view, not a copy
    on_meta = stepinfo_module.StepInfo.read_per_loss(torch.zeros(6, dtype=torch.float64, device="meta"))
    assert all(part.device.type == "meta" and part.shape == (2,) for part in on_meta)
    with pytest.raises(ValueError, match=r"laid out as StepInfo.per_loss_on_device .* got shape \(4,\)"):
        stepinfo_module.StepInfo.read_per_loss(torch.zeros(4))


def _spy_steps(monkeypatch):
    """Record every StepInfo's device argument and which path each step took."""
    record = {"host_reads": 0, "infos": []}
    real_to_host, real_init = balancer_base._to_host, stepinfo_module.StepInfo.__init__

    def to_host(*args, **kwargs):
        record["host_reads"] += 1
        return real_to_host(*args, **kwargs)

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        record["infos"].append((kwargs.get("device"), self))

    monkeypatch.setattr(balancer_base, "_to_host", to_host)
    monkeypatch.setattr(stepinfo_module.StepInfo, "__init__", init)
    return record


@pytest.mark.parametrize(
    "method, engine",
    [
        ("fixed", "exact"),
        ("dto-amortized", "exact"),
        ("dto", "exact"),
        ("dto", "representation"),
        ("mgda", "representation"),
    ],
)
def test_host_path_step_asks_for_the_losses_device(monkeypatch, method, engine):
    record = _spy_steps(monkeypatch)
    model = torch.nn.Linear(3, 2)
    options = {"weights": [0.5, 0.5]} if method == "fixed" else {}
    if method == "dto-amortized":
        options["update"] = "next-step"
    balancer = make_balancer(method, model.parameters(), engine=engine, **options)
    for diagnose in (True, False):
        z = model(torch.randn(4, 3))
        losses = {"distill": z.pow(2).mean(), "task": (z - 1).pow(2).mean()}
        balancer.backward(losses, representation=z if engine == "representation" else None, diagnose=diagnose)
    host_steps = [(device, info) for device, info in record["infos"] if device is not None]
    assert len(host_steps) == record["host_reads"]  # each host-path step names the losses' device
    for device, info in record["infos"]:
        assert info.packed.device == torch.device("cpu")


@pytest.mark.parametrize("method, engine", [("fixed", "exact"), ("dto", "representation"), ("dto-amortized", "exact")])
def test_one_epoch_mixes_host_and_device_path_steps_and_sums_them_on_the_training_device(
    teacher, tmp_path, monkeypatch, method, engine
):
    """The regression of the CUDA crash: diagnostic steps (host path) between device-path
    steps; every step's numbers where the epoch sums them; the epoch means equal the steps'."""
    record = _spy_steps(monkeypatch)
    options = ["balancer.options={weights: {distill: 0.9, task: 0.1}}"] if method == "fixed" else []
    config = load_config(
        None,
        distill_overrides(
            teacher, f"balancer.method={method}", f"balancer.engine={engine}", "epochs=1", "log_every=2", *options
        ),
    )
    train(config, tmp_path / "run", progress=False)
    infos = [info for _, info in record["infos"] if info.names == ("distill", "task")]
    device_path = [info for device, info in record["infos"] if device is None]
    assert record["host_reads"] > 0 or method == "dto", "no host-path step: the test lost its point"
    assert device_path, "no device-path step: the test lost its point"
    assert all(info.packed.device == torch.device("cpu") for info in infos)
    assert sum(device is not None for device, _ in record["infos"]) == record["host_reads"]
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    for k, name in enumerate(("distill", "task")):
        mean = sum(float(info.loss_values[k]) for info in infos) / len(infos)
        assert row[f"loss/{name}"] == pytest.approx(mean, rel=1e-12)


# ------------------------------------------------------------------------ data where training reads it


def test_in_memory_batches_equal_a_dataloader_with_a_random_sampler():
    data = build_data("synthetic", seed=0, augment=False)
    generator = torch.Generator().manual_seed(7)
    reference = DataLoader(
        data.train,
        batch_size=32,
        sampler=RandomSampler(data.train, generator=generator),
        collate_fn=lambda batch: batch,
        drop_last=True,
    )
    ours = train_loader(data.train, 32, seed=0, epoch=0)
    ours.generator.manual_seed(7)
    expected = [data.train.__getitems__(indices) for indices in reference.batch_sampler]
    got = list(ours)
    assert len(got) == len(expected) == len(ours)
    for (x, y), (ex, ey) in zip(got, expected):
        torch.testing.assert_close(x, ex, rtol=0, atol=0)
        assert torch.equal(y, ey)


def test_augmentation_on_another_device_draws_the_same_random_numbers():
    """Moved to a device (``meta`` here), a batch is gathered and augmented there without a
    CPU-only operation, and the CPU generator advances exactly as for the CPU data set."""
    data = build_data("synthetic", seed=0)
    moved = data.train.to("meta")
    assert moved.images.device.type == "meta" and moved.augmentation == data.train.augmentation
    for dataset in (data.train, moved):
        dataset.generator.manual_seed(3)
    x_cpu, _ = data.train.__getitems__(list(range(16)))
    x_meta, y_meta = moved.__getitems__(torch.arange(16, device="meta"))
    assert x_meta.device.type == "meta" and x_meta.shape == x_cpu.shape and y_meta.device.type == "meta"
    assert torch.equal(data.train.generator.get_state(), moved.generator.get_state())
    batches = list(eval_loader(moved, 64))
    assert sum(x.shape[0] for x, _ in batches) == len(moved) and batches[0][0].device.type == "meta"


def test_place_data_keeps_the_cpu_and_refuses_unknown_placements():
    data = build_data("synthetic", seed=0)
    assert place_data(data, torch.device("cpu"), "device") is data
    with pytest.raises(
        ValueError, match=r"data.placement='gpu' is not allowed; use one of \['auto', 'device', 'host'\]"
    ):
        place_data(data, torch.device("cpu"), "gpu")


# ------------------------------------------------------------------------ settings


def test_device_auto_and_errors():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='tpu' is not allowed"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available here"):
            resolve_device("cuda")


def test_trainer_records_its_device_and_defers_checks_where_every_step_allows(teacher, tmp_path):
    cases = {
        "dto-repr": (["balancer.method=dto", "balancer.engine=representation"], True),
        "dto-exact": (["balancer.method=dto"], False),
        "mgda-repr": (["balancer.method=mgda", "balancer.engine=representation"], False),
        "amortized": (["balancer.method=dto-amortized"], True),
        "asked-off": (
            ["balancer.method=dto", "balancer.engine=representation", "balancer.options={deferred_checks: false}"],
            False,
        ),
    }
    for name, (overrides, deferred) in cases.items():
        train(load_config(None, distill_overrides(teacher, "epochs=1", *overrides)), tmp_path / name, progress=False)
        meta = json.loads((tmp_path / name / "meta.json").read_text())
        assert meta["deferred_checks"] is deferred, name
        assert meta["device"] == "cpu" and meta["training_images_on"] == "cpu"


def test_deferred_checks_still_stop_a_run_whose_loss_became_nan(teacher, tmp_path, monkeypatch):
    from dtokd.tasks import classification_losses as task_module  # where the KD loss type calls kd_loss

    real = task_module.kd_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 4 else value

    monkeypatch.setattr(task_module, "kd_loss", poisoned)
    config = load_config(None, distill_overrides(teacher, "balancer.method=dto", "balancer.engine=representation"))
    with pytest.raises(ValueError, match="the previous step.*non-finite loss"):
        train(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # nothing saved after the bad step


def test_compile_settings_are_checked_before_training(teacher, tmp_path):
    with pytest.raises(ValueError, match="compile='fast' is not allowed"):
        train(load_config(None, distill_overrides(teacher, "compile=fast")), tmp_path / "a", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            train(
                load_config(None, distill_overrides(teacher, "compile=reduce-overhead", "device=cpu")),
                tmp_path / "b",
                progress=False,
            )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_channels_last_gives_the_same_run(teacher, tmp_path):
    overrides = distill_overrides(teacher, "balancer.method=dto", "student.name=cnn_small", "epochs=1")
    plain = train(load_config(None, overrides), tmp_path / "plain", progress=False)
    channels_last = train(load_config(None, overrides + ["channels_last=true"]), tmp_path / "cl", progress=False)
    assert channels_last["last_test_top1"] == pytest.approx(plain["last_test_top1"], abs=1e-9)
    a = torch.load(tmp_path / "plain" / "checkpoint.pt", weights_only=False)["student"]
    b = torch.load(tmp_path / "cl" / "checkpoint.pt", weights_only=False)["student"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
