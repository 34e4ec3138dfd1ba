"""Intermediate features through forward hooks, without editing model code (as torchdistill)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class FeatureTaps:
    """Record the outputs of the named submodules on every forward pass.

    ``taps = FeatureTaps(model, ["stages.2"]); logits = model(x); taps.features["stages.2"]``.
    The special name ``"features"`` taps ``forward_features`` (the pooled feature before the head),
    by recording the head's input. ``close()`` removes the hooks.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.features: dict[str, Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in names:
            if name == "features":
                if not hasattr(model, "head"):
                    raise ValueError(f"{type(model).__name__} has no 'head' to tap 'features' from")
                self._handles.append(model.head.register_forward_hook(self._record_input(name)))
                continue
            if name not in modules:
                listing = [n for n in modules if n][:40]
                raise ValueError(f"{type(model).__name__} has no submodule {name!r}; some names: {listing}")
            self._handles.append(modules[name].register_forward_hook(self._record_output(name)))

    def _record_output(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self.features[name] = output

        return hook

    def _record_input(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self.features[name] = inputs[0]

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
