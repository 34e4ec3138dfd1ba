"""Models by name: the project's zoo, ``torchvision:<name>`` and ``timm:<name>`` (when installed),
detectors ``detection:<head>_<backbone>_fpn`` (see :mod:`dtokd.models.detection`), and causal
language models ``hf-causal-lm:<model_type>`` (see :mod:`dtokd.models.causal_lm`).

``create_model(name, num_classes, in_channels)`` builds a model with freshly initialised
weights; ``load_weights(model, path)`` loads a local checkpoint (no run-time downloads).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from dtokd.models.cifar_others import VGG, MobileNetV2, ResNet50, ShuffleNetV1, ShuffleNetV2, WideResNet
from dtokd.models.cifar_resnet import cifar_resnet
from dtokd.models.foreign import KEY_MAP_PRESETS, remap_keys
from dtokd.models.small import MLP, SmallCNN
from dtokd.models.weight_file import read_weights

Builder = Callable[[int, int, int], nn.Module]  # (num_classes, in_channels, image_size) -> model


def _zoo() -> dict[str, Builder]:
    zoo: dict[str, Builder] = {
        "cnn": lambda k, c, s: SmallCNN(32, k, c, s, hidden=128),
        "cnn_small": lambda k, c, s: SmallCNN(8, k, c, s, hidden=32),
        "mlp": lambda k, c, s: MLP(c * s * s, (256, 128), k),
        "mlp_small": lambda k, c, s: MLP(c * s * s, (64,), k),
        "mobilenetv2": lambda k, c, s: MobileNetV2(0.5, k, c),
        "shufflenetv1": lambda k, c, s: ShuffleNetV1(k, c),
        "shufflenetv2": lambda k, c, s: ShuffleNetV2(k, c),
        "resnet50": lambda k, c, s: ResNet50(k, c),
    }
    for depth in (8, 14, 20, 32, 44, 56, 110):
        zoo[f"resnet{depth}"] = _resnet(depth, wide=False)
    for depth in (8, 32):
        zoo[f"resnet{depth}x4"] = _resnet(depth, wide=True)
    for depth, widen in ((16, 2), (40, 1), (40, 2)):
        zoo[f"wrn_{depth}_{widen}"] = _wide_resnet(depth, widen)
    for depth in (8, 11, 13):
        zoo[f"vgg{depth}"] = _vgg(depth)
    return zoo


def _resnet(depth: int, wide: bool) -> Builder:
    return lambda k, c, s: cifar_resnet(depth, wide=wide, num_classes=k, in_channels=c)


def _wide_resnet(depth: int, widen: int) -> Builder:
    return lambda k, c, s: WideResNet(depth, widen, k, c)


def _vgg(depth: int) -> Builder:
    return lambda k, c, s: VGG(depth, k, c)


ZOO = _zoo()


def available_models() -> list[str]:
    return sorted(ZOO) + [
        "torchvision:<name>",
        "timm:<name>",
        "detection:<head>_<backbone>_fpn",
        "hf-causal-lm:<model_type or local folder>",
    ]


def create_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, kwargs: dict | None = None
) -> nn.Module:
    """A freshly initialised classifier ``name`` with ``num_classes`` outputs; ``kwargs`` go to
    a ``timm:`` or ``torchvision:`` constructor (the zoo's models take none)."""
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    kwargs = dict(kwargs or {})
    if name.startswith("hf-causal-lm:"):
        from dtokd.models.causal_lm import create_causal_lm

        return create_causal_lm(name, num_classes, kwargs)
    if name.startswith("detection:"):
        from dtokd.models.detection import create_detector

        if in_channels != 3:
            raise ValueError(f"detectors take 3-channel images; the data has {in_channels}")
        return create_detector(name, num_classes, image_size, kwargs)
    if name in ZOO:
        if kwargs:
            raise ValueError(
                f"model {name!r} takes no kwargs (got {sorted(kwargs)}); kwargs are for timm:/torchvision: models"
            )
        return ZOO[name](num_classes, in_channels, image_size)
    if name.startswith("torchvision:"):
        import torchvision

        arch = name.split(":", 1)[1]
        if arch not in torchvision.models.list_models(module=torchvision.models):
            raise ValueError(f"unknown torchvision classification model {arch!r}")
        if in_channels != 3:
            raise ValueError(f"torchvision models take 3-channel images; the data has {in_channels}")
        return _construct(
            lambda: torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs), name, kwargs
        )
    if name.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ValueError(f"model {name!r} needs timm: pip install 'dtokd[timm]'") from None
        arch = name.split(":", 1)[1]
        if not timm.is_model(arch):
            raise ValueError(f"unknown timm model {arch!r}")
        return _construct(
            lambda: timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs),
            name,
            kwargs,
        )
    raise ValueError(f"unknown model {name!r}; available: {available_models()}")


def _construct(build: Callable[[], nn.Module], name: str, kwargs: dict) -> nn.Module:
    try:
        return build()
    except TypeError as error:  # an argument the constructor does not take
        raise ValueError(f"model {name!r} does not take kwargs {kwargs}: {error}") from None


def apply_weights(model: nn.Module, state: dict, source: str | Path, key_map_argument: str = "key_map") -> None:
    """``model.load_state_dict(state)`` strictly, with an error naming ``source`` if it does not
    fit: the missing and unexpected names (the first few of each) and, for names that differ,
    the ``key_map_argument`` setting that maps them."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"weights in {str(source)!r} do not fit model {type(model).__name__}: {len(missing)} missing name(s) "
            f"{_first(missing)}, {len(unexpected)} unexpected name(s) {_first(unexpected)}; weights saved by another "
            f"codebase need {key_map_argument} (a preset of {sorted(KEY_MAP_PRESETS)} or [[pattern, replacement], ...])"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"weights in {str(source)!r} do not fit model {type(model).__name__}: {error}") from None


def _first(names: list[str], count: int = 5) -> str:
    return str(names[:count])[:-1] + (", ...]" if len(names) > count else "]")


def load_weights(
    model: nn.Module, path: str | Path, key_map: str | list[list[str]] | None = None, argument: str = "key_map"
) -> None:
    """Load a state dict (or a dtokd checkpoint's ``model``) from a local file, strictly, its
    parameter names rewritten by ``key_map`` (see :mod:`dtokd.models.foreign`)."""
    apply_weights(model, remap_keys(read_weights(path)[0], key_map, argument), path, argument)
