"""Weights released by other projects: parameter-name mappings and input normalisation.

A state dict saved by another codebase holds the same network under other parameter names.
``key_map`` rewrites each name by an ordered list of regular-expression rules
``[pattern, replacement]`` (Python ``re.sub`` syntax, applied one after the other to every
key), or names a ready preset of :data:`KEY_MAP_PRESETS`::

    teacher:
      name: resnet56
      checkpoint: ../shared/data/teachers/cifar10_resnet56.pth
      key_map: cifar-resnet-chenyaofo            # or [["^module\\.", ""], ["^fc\\.", "head."]]
      normalize: {mean: [0.4914, 0.4822, 0.4465], std: [0.2023, 0.1994, 0.2010]}

Two keys that map to one name are an error, and the result is loaded strictly, so a mapping
that misses a parameter says which ones.

A model's ``normalize`` is the per-channel mean and std (of pixel values in [0, 1]) that it
was trained with. The data pipeline normalises images once, with the student's statistics;
a model with other statistics sees its own through :class:`Renormalize`, the per-channel
affine map ``x_model = (x * std_data + mean_data - mean_model) / std_model``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

KEY_MAP_PRESETS: dict[str, list[list[str]]] = {
    # CIFAR ResNets in the layout of chenyaofo/pytorch-cifar-models (stem conv1/bn1, stages
    # layer1..layer3 of BasicBlocks with a 'downsample' shortcut, head 'fc'): dtokd's resnetN.
    "cifar-resnet-chenyaofo": [
        [r"^conv1\.", "stem.0."],
        [r"^bn1\.", "stem.1."],
        [r"^layer1\.", "stages.0."],
        [r"^layer2\.", "stages.1."],
        [r"^layer3\.", "stages.2."],
        [r"\.downsample\.", ".shortcut."],
        [r"^fc\.", "head."],
    ],
    # a model saved from inside nn.DataParallel / DistributedDataParallel
    "strip-module": [[r"^module\.", ""]],
}


def key_map_rules(
    key_map: str | Sequence[Sequence[str]] | None, argument: str = "key_map"
) -> list[tuple[re.Pattern, str]]:
    """The compiled rules of ``key_map`` (a preset name, a list of [pattern, replacement], or None)."""
    if key_map is None:
        return []
    if isinstance(key_map, str):
        if key_map not in KEY_MAP_PRESETS:
            raise ValueError(
                f"{argument}={key_map!r} is not a known preset; use one of {sorted(KEY_MAP_PRESETS)} "
                "or a list of [pattern, replacement] rules"
            )
        key_map = KEY_MAP_PRESETS[key_map]
    rules = []
    for k, rule in enumerate(key_map):
        if (
            isinstance(rule, str)
            or not isinstance(rule, Sequence)
            or len(rule) != 2
            or not all(isinstance(r, str) for r in rule)
        ):
            raise ValueError(f"{argument}[{k}]={rule!r} must be a [pattern, replacement] pair of strings")
        try:
            rules.append((re.compile(rule[0]), rule[1]))
        except re.error as error:
            raise ValueError(
                f"{argument}[{k}]: pattern {rule[0]!r} is not a valid regular expression ({error})"
            ) from None
    return rules


def remap_keys(
    state: Mapping[str, Any], key_map: str | Sequence[Sequence[str]] | None, argument: str = "key_map"
) -> dict[str, Any]:
    """``state`` with every key rewritten by the rules of ``key_map``, in order."""
    rules = key_map_rules(key_map, argument)
    result: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        new = key
        for pattern, replacement in rules:
            new = pattern.sub(replacement, new)
        if new in result:
            raise ValueError(f"{argument} maps both {origin[new]!r} and {key!r} to {new!r}")
        result[new], origin[new] = value, key
    return result


def check_normalize(
    normalize: Mapping[str, Sequence[float]] | None, argument: str
) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` from a ``{mean: [...], std: [...]}`` mapping of equally long lists of
    numbers, the stds positive (None stays None)."""
    if normalize is None:
        return None
    if not isinstance(normalize, Mapping) or set(normalize) != {"mean", "std"}:
        raise ValueError(f"{argument}={normalize!r} must be a mapping with exactly the keys 'mean' and 'std'")
    values = {}
    for key in ("mean", "std"):
        given = normalize[key]
        if (
            isinstance(given, str)
            or not isinstance(given, Sequence)
            or not given
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in given)
        ):
            raise ValueError(f"{argument}.{key}={given!r} must be a list of numbers, one per channel")
        values[key] = tuple(float(v) for v in given)
    if len(values["mean"]) != len(values["std"]):
        raise ValueError(f"{argument} gives {len(values['mean'])} means but {len(values['std'])} stds")
    if not all(s > 0 for s in values["std"]):
        raise ValueError(f"{argument}.std={list(values['std'])} must be positive")
    return values["mean"], values["std"]


class Renormalize(nn.Module):
    """Images normalised with ``data`` statistics -> normalised with ``model`` statistics:
    ``x * (std_d / std_m) + (mean_d - mean_m) / std_m`` per channel (exact: an affine map)."""

    scale: Tensor
    shift: Tensor

    def __init__(
        self, data: tuple[Sequence[float], Sequence[float]], model: tuple[Sequence[float], Sequence[float]]
    ) -> None:
        super().__init__()
        mean_d, std_d = (torch.tensor(v, dtype=torch.float64) for v in data)
        mean_m, std_m = (torch.tensor(v, dtype=torch.float64) for v in model)
        self.register_buffer("scale", (std_d / std_m).float().view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean_d - mean_m) / std_m).float().view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.shift.to(x.dtype), x, self.scale.to(x.dtype))


class WithInput(nn.Module):
    """``model(renormalize(x))``: a model that sees its own input normalisation."""

    def __init__(self, model: nn.Module, renormalize: nn.Module) -> None:
        super().__init__()
        self.renormalize, self.model = renormalize, model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.renormalize(x))
