"""Reading configurations: choices checked as a file is read, a config that starts from another
(``base:``), and the task's settings checked before any data is read."""

import pytest

from dtokd.train import ConfigError, build, load_config, loop
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
        (["data.name=text"], "data.name='text' is a text corpus: set task: causal-lm"),
    ],
)
def test_task_settings_are_checked_before_any_data_is_read(tmp_path, monkeypatch, overrides, message):
    def no_data(*args, **kwargs):
        raise AssertionError("the data was read before the settings were checked")

    monkeypatch.setattr(build, "data_of", no_data)  # where the run's build reads the data
    with pytest.raises(ValueError, match=message):
        loop.train(load_config(None, ["device=cpu", *overrides]), tmp_path / "run", progress=False, verbose=False)


# -- a config file's own syntax and the optimizer's settings never change what a run names ------


@pytest.mark.parametrize(
    "text, match",
    [
        ("optim:\n  lr: 0.05\n  lr: 0.5\n", r"key 'lr' is given twice \(lines 2 and 3\)"),
        ("optim: {lr: 0.3}\noptim: {momentum: 0.0}\n", r"key 'optim' is given twice"),
        ("seed: 010\n", "octal, hex, binary or base-60"),
        ("seed: 0x1F\n", "octal, hex, binary or base-60"),
        ("seed: 1:30\n", "octal, hex, binary or base-60"),
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        ("[]\n", "must hold a mapping of settings at the top level, got list"),
        ("false\n", "got bool"),
        ("0\n", "got int"),
    ],
)
def test_a_config_file_that_yaml_would_read_as_something_else_is_refused(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_merge_keys_may_be_overridden_and_decimal_integers_read_as_written(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  <<: {lr: 0.1, momentum: 0.5}\n  lr: 0.2\nseed: 1_000\n")
    config = load_config(path)
    assert (config.optim.lr, config.optim.momentum, config.seed) == (0.2, 0.5, 1000)


def test_a_section_override_merges_key_by_key_as_a_base_does(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 0.1, momentum: 0.5, schedule: step, milestones: [3]}\nepochs: 5\n")
    config = load_config(path, ["optim={lr: 0.2}"])
    assert (config.optim.lr, config.optim.momentum, config.optim.schedule, config.optim.milestones) == (
        0.2,
        0.5,
        "step",
        [3],
    )


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["optim.grad_clip=-1"], r"optim.grad_clip=-1.0 is not allowed; it must be a finite number > 0"),
        (["optim.grad_clip=.nan"], "optim.grad_clip=nan"),
        (["optim.grad_clip=0"], "or null for no clipping"),
        (["optim.lr=-0.1"], r"optim.lr=-0.1 is not allowed; it must be a finite number >= 0"),
        (["optim.momentum=1.5"], r"optim.momentum=1.5 is not allowed; it must be a number in \[0, 1\)"),
        (["optim.gamma=5", "optim.schedule=step"], r"optim.gamma=5.0 is not allowed"),
        (["optim.name=adamw", "optim.momentum=0.5"], "apply to optim.name=sgd"),
        (["optim.name=adamw", "optim.nesterov=true"], "apply to optim.name=sgd"),
        (["optim.nesterov=true", "optim.momentum=0"], "needs optim.momentum > 0"),
        (["epochs=3", "optim.warmup_epochs=5"], "below the number of epochs"),
        (["optim.warmup_epochs=-2"], "integer >= 0"),
        (["optim.milestones=[1]"], "apply to optim.schedule=step, not 'cosine'"),
        (["optim.gamma=0.5"], "apply to optim.schedule=step"),
        (["epochs=3", "optim.schedule=step", "optim.milestones=[10]"], r"each in \[1, epochs\)"),
        (["epochs=9", "optim.schedule=step", "optim.milestones=[-1]"], "increasing"),
        (["epochs=9", "optim.schedule=step", "optim.milestones=[5, 3]"], "increasing"),
    ],
)
def test_optimizer_settings_outside_their_range_or_ignored_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_a_number_in_scientific_notation_is_a_number_wherever_it_is_written():
    config = load_config(None, ["balancer.method=dto-amortized", "balancer.options={lr: 1e-3}", "optim.lr=2e-3"])
    assert config.balancer.options == {"lr": 0.001} and config.optim.lr == 0.002
    assert load_config(None, ["name='1e-3'"]).name == "1e-3"  # quoted: a string


@pytest.mark.parametrize(
    "method, divergence, expected",
    [
        ("dto-amortized", None, "forward_ce"),  # left out: the method's form
        ("dto-amortized", "auto", "forward_ce"),
        ("dto", None, "forward_kl"),
        ("fixed", "auto", "forward_kl"),
        ("dto-amortized", "forward_kl", "forward_kl"),  # given: kept
    ],
)
def test_a_token_kd_form_left_to_the_library_is_resolved_by_the_method(method, divergence, expected):
    spec = "{type: token-kd}" if divergence is None else f"{{type: token-kd, divergence: {divergence}}}"
    config = load_config(
        None, ["task=causal-lm", "data.name=text", f"balancer.method={method}", f"losses={{distill: {spec}}}"]
    )
    assert config.losses["distill"]["divergence"] == expected
    assert to_dict(config)["losses"]["distill"]["divergence"] == expected  # what the run folder records
