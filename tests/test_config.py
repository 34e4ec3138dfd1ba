"""Reading configurations: choices checked as a file is read, a config that starts from another
(``base:``), and the task's settings checked before any data is read."""

import pytest

from dtokd.train import ConfigError, load_config, loop
from dtokd.train.config import CHOICES, DataConfig, read_config_file, to_dict


@pytest.mark.parametrize(
    "key, value",
    [
        ("optim.name", "adamw2"),
        ("amp", "fp8"),
        ("data.name", "imagenette"),
        ("data.labels", "coco"),
        ("compile", "fast"),
        ("task", "segmentation"),
    ],
)
def test_a_choice_outside_its_literal_is_refused_as_it_is_read(key, value):
    allowed = list(CHOICES[key])
    with pytest.raises(
        ConfigError, match=rf"^{key}='{value}' is not allowed; use one of {allowed}".replace("[", r"\[")
    ):
        load_config(None, [f"{key}={value}"])


def test_choices_are_the_literal_fields():
    assert CHOICES["optim.schedule"] == ("cosine", "step", "constant")
    assert "text" in CHOICES["data.name"] and DataConfig().name in CHOICES["data.name"]
    with pytest.raises(ConfigError, match=r"optim.name=3 is not allowed"):  # a number is no choice either
        load_config(None, ["optim.name=3"])


def test_a_config_states_only_what_differs_from_its_base(tmp_path):
    (tmp_path / "family").mkdir()
    (tmp_path / "family" / "recipe.yaml").write_text(
        "epochs: 7\noptim: {name: adamw, lr: 0.001, warmup_epochs: 2}\n"
        "losses: {distill: {type: kd}, task: {type: ce}}\nbalancer: {method: fixed, options: {weights: [0.9, 0.1]}}\n"
    )
    (tmp_path / "family" / "dto.yaml").write_text(
        "base: recipe.yaml\nname: dto\nbalancer: {method: dto, options: {}}\n"
    )
    (tmp_path / "tiny.yaml").write_text("base: family/dto.yaml\noptim: {lr: 0.002}\nlosses: {task: {type: ce}}\n")
    config = load_config(tmp_path / "tiny.yaml", ["epochs=9"])
    assert (config.name, config.epochs) == ("dto", 9)
    assert (config.optim.name, config.optim.lr, config.optim.warmup_epochs) == (
        "adamw",
        0.002,
        2,
    )  # a section: key by key
    assert config.losses == {"task": {"type": "ce"}}  # a free mapping: replaced whole
    assert (config.balancer.method, config.balancer.options) == ("dto", {})
    assert "base" not in to_dict(config)
    assert read_config_file(tmp_path / "tiny.yaml")["optim"] == {"name": "adamw", "lr": 0.002, "warmup_epochs": 2}


def test_bad_bases_are_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base='a.yaml' makes a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml' \(the base of .*c.yaml'\) does not exist"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [x.yaml]\n")
    with pytest.raises(ConfigError, match=r"base=\['x.yaml'\] must be the path of another config file"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["losses={task: {type: cee}}"], "cee"),
        (["losses={task: {type: ce, smoothing: 0.1}}"], "smoothing"),
        (["task=detection"], "needs a detection data set"),
        (["data.name=synthetic-coco"], "is a detection data set: set task: detection"),
        (["data.name=text"], "task='causal-lm' and data.name='text' go together"),
    ],
)
def test_task_settings_are_checked_before_any_data_is_read(tmp_path, monkeypatch, overrides, message):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the settings were checked")

    monkeypatch.setattr(loop, "data_of", no_data)
    with pytest.raises(ValueError, match=message):
        loop.train(load_config(None, ["device=cpu", *overrides]), tmp_path / "run", progress=False, verbose=False)
