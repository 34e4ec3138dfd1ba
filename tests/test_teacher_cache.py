"""The teacher-output cache: a cached output is bit-identical to a fresh teacher forward on the
same batch; the batch stream depends only on the seed and the data settings; a cache from
another teacher or other data is never used."""

import json

import pytest
import torch

from dtokd.data import build_data, train_loader
from dtokd.train import load_config, train
from dtokd.train import teacher_cache as tc
from dtokd.train.config import ConfigError

BASE = [
    "data.name=synthetic",
    "batch_size=32",
    "log_every=2",
    "eval_batch_size=64",
    "student.name=mlp_small",
    "epochs=2",
]


@pytest.fixture
def teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("DTOKD_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "teacher"
    train(load_config(None, BASE + ["student.name=cnn_small", "epochs=1"]), folder, progress=False, verbose=False)
    return folder / "best.pt"


def _distil(teacher, *extra):
    return load_config(
        None,
        BASE
        + [
            "teacher.name=cnn_small",
            f"teacher.checkpoint={teacher}",
            "losses={distill: {type: kd}, task: {type: ce}}",
            "balancer.method=mean",
            *extra,
        ],
    )


def _counting(monkeypatch):
    calls = {"hits": 0, "misses": 0}
    real = tc.CachedTeacher.__call__

    def counted(self, x):
        before = (self.hits, self.misses)
        out = real(self, x)
        calls["hits"] += self.hits - before[0]
        calls["misses"] += self.misses - before[1]
        return out

    monkeypatch.setattr(tc.CachedTeacher, "__call__", counted)
    return calls


def _last_rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mixup", [False, True])
def test_a_cached_run_equals_an_uncached_one_and_pays_the_teacher_once(teacher, tmp_path, monkeypatch, mixup):
    pytest.importorskip("timm") if mixup else None
    extra = ["data.mixup={mixup_alpha: 0.8, cutmix_alpha: 1.0}"] if mixup else []
    plain = train(_distil(teacher, *extra, "balancer.method=dto"), tmp_path / "plain", progress=False, verbose=False)
    calls = _counting(monkeypatch)
    first = train(
        _distil(teacher, *extra, "balancer.method=dto", "teacher.cache_outputs=true"),
        tmp_path / "a",
        progress=False,
        verbose=False,
    )
    assert calls == {"hits": 0, "misses": 2 * 7}  # 2 epochs of 7 steps (200 synthetic images, batches of 32)
    other = train(
        _distil(teacher, *extra, "balancer.method=mean", "teacher.cache_outputs=true"),
        tmp_path / "b",
        progress=False,
        verbose=False,
    )
    assert calls == {"hits": 2 * 7, "misses": 2 * 7}  # another method, same seed: the teacher did not run
    assert first["last_test_top1"] == plain["last_test_top1"]
    assert _last_rows(tmp_path / "a") == [
        dict(r, epoch_seconds=a["epoch_seconds"])
        for r, a in zip(_last_rows(tmp_path / "plain"), _last_rows(tmp_path / "a"))
    ]
    mean_plain = train(_distil(teacher, *extra, "balancer.method=mean"), tmp_path / "c", progress=False, verbose=False)
    assert other["last_test_top1"] == mean_plain["last_test_top1"]


def test_cached_outputs_are_the_teacher_forward_bit_for_bit(teacher, tmp_path):
    train(
        _distil(teacher, "balancer.method=dto", "teacher.cache_outputs=true"),
        tmp_path / "a",
        progress=False,
        verbose=False,
    )
    files = sorted((tmp_path / "cache" / "teacher-outputs").glob("*/epoch*.pt"))
    assert [f.name for f in files] == ["epoch0.pt", "epoch1.pt"]
    from dtokd.models import create_model
    from dtokd.models.registry import apply_weights, read_weights

    config = _distil(teacher)
    data = build_data(
        "synthetic",
        None,
        val_fraction=config.data.val_fraction,
        seed=0,
        augment=True,
        image_size=config.data.image_size,
    )
    model = create_model("cnn_small", data.num_classes, data.in_channels, data.image_size)
    state, _ = read_weights(teacher)
    apply_weights(model, state, teacher, "teacher.key_map")
    model.eval()
    stored = torch.load(files[1], weights_only=True)["outputs"]
    with torch.no_grad():
        fresh = [model(x) for x, _ in train_loader(data.train, 32, 0, 1)]
    assert len(stored) == len(fresh) and all(torch.equal(a, b) for a, b in zip(stored, fresh))


def test_the_batch_stream_depends_only_on_seed_epoch_and_data():
    """Building models, other RNG use and another method between two loaders change nothing."""
    data = build_data("synthetic", None, val_fraction=0.1, seed=3, augment=True, image_size=32)
    first = [x.clone() for x, _ in train_loader(data.train, 32, 3, 2)]
    torch.manual_seed(123)
    torch.randn(1000)
    torch.nn.Linear(10, 10)
    second = [x for x, _ in train_loader(data.train, 32, 3, 2)]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    other_epoch = [x for x, _ in train_loader(data.train, 32, 3, 1)]
    assert not torch.equal(first[0], other_epoch[0])


def test_a_cache_of_another_teacher_or_other_data_is_never_used(teacher, tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    train(_distil(teacher, "teacher.cache_outputs=true"), tmp_path / "a", progress=False, verbose=False)
    other_teacher = tmp_path / "teacher2"
    train(
        load_config(None, BASE + ["student.name=cnn_small", "epochs=1", "seed=5"]),
        other_teacher,
        progress=False,
        verbose=False,
    )
    train(
        _distil(other_teacher / "best.pt", "teacher.cache_outputs=true"), tmp_path / "b", progress=False, verbose=False
    )
    train(
        _distil(teacher, "teacher.cache_outputs=true", "data.augment=false"),
        tmp_path / "c",
        progress=False,
        verbose=False,
    )
    train(_distil(teacher, "teacher.cache_outputs=true", "seed=1"), tmp_path / "d", progress=False, verbose=False)
    assert calls == {"hits": 0, "misses": 4 * 2 * 7}
    assert len(list((tmp_path / "cache" / "teacher-outputs").iterdir())) == 4


def test_a_cache_file_under_a_wrong_key_is_refused(teacher, tmp_path):
    train(_distil(teacher, "teacher.cache_outputs=true"), tmp_path / "a", progress=False, verbose=False)
    path = next((tmp_path / "cache" / "teacher-outputs").glob("*/epoch0.pt"))
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "key": "someone-else"}, path)
    with pytest.raises(ValueError, match="was written for another teacher or data"):
        train(
            _distil(teacher, "teacher.cache_outputs=true", "balancer.method=mean"),
            tmp_path / "b",
            progress=False,
            verbose=False,
        )


def test_the_cache_refuses_what_it_cannot_hold(teacher):
    feature = "losses={task: {type: ce}, feat: {type: feature, student_tap: features, teacher_tap: features}}"
    with pytest.raises(ValueError, match="caches the teacher's logits only, and losses \\['feat'\\]"):
        train(
            load_config(
                None,
                BASE
                + [
                    "student.name=cnn_small",
                    "teacher.name=cnn_small",
                    f"teacher.checkpoint={teacher}",
                    feature,
                    "teacher.cache_outputs=true",
                ],
            ),
            teacher.parent.parent / "f",
            progress=False,
            verbose=False,
        )


def test_a_cache_without_a_teacher_is_refused_with_the_config():
    """Refused when the config is read (so a bench checks it before any cell runs), naming both keys."""
    alone = ["teacher.name=null", "losses={task: {type: ce}}", "teacher.cache_outputs=true"]
    with pytest.raises(ConfigError, match="teacher.cache_outputs=true .* teacher.name is null"):
        load_config(None, BASE + alone)
    assert load_config(None, BASE + alone[:2]).teacher.cache_outputs is False
