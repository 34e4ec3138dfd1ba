"""Intermediate features through forward hooks, without editing model code (as torchdistill)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

SPECIAL_TAPS = ("features", "patch_mean")


class FeatureTaps:
    """Record the outputs of the named submodules on every forward pass.

    ``taps = FeatureTaps(model, ["stages.2"]); logits = model(x); taps.features["stages.2"]``.
    Two special names:

    - ``"features"``: the pooled feature before the classifier, recorded as the input of the
      model's classifier (:func:`classifier`; global-average-pooled when that input is a
      feature map, as in timm's ``ClassifierHead``);
    - ``"patch_mean"``: for a vision transformer, the mean of the patch tokens after its final
      norm (``model.norm`` output without the first ``model.num_prefix_tokens`` tokens: the
      class and distillation tokens), the student feature of VkD.

    ``close()`` removes the hooks.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.features: dict[str, Tensor] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for name in names:
            if name == "features":
                self._handles.append(classifier(model).register_forward_hook(self._record_pooled_input(name)))
                continue
            if name == "patch_mean":
                norm, prefix = getattr(model, "norm", None), getattr(model, "num_prefix_tokens", None)
                if not isinstance(norm, nn.Module) or not isinstance(prefix, int):
                    raise ValueError(
                        f"{type(model).__name__} is not a vision transformer with 'norm' and "
                        "'num_prefix_tokens': it has no 'patch_mean' to tap"
                    )
                self._handles.append(norm.register_forward_hook(self._record_patch_mean(name, prefix)))
                continue
            if name not in modules:
                listing = [n for n in modules if n][:40]
                raise ValueError(f"{type(model).__name__} has no submodule {name!r}; some names: {listing}")
            self._handles.append(modules[name].register_forward_hook(self._record_output(name)))

    def _record_output(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self.features[name] = output

        return hook

    def _record_pooled_input(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            feature = inputs[0]
            self.features[name] = feature.mean((2, 3)) if feature.dim() == 4 else feature

        return hook

    def _record_patch_mean(self, name: str, prefix: int):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self.features[name] = output[:, prefix:].mean(1)

        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def classifier(model: nn.Module) -> nn.Module:
    """The final classifier: the zoo's and timm's ViTs' ``head``, timm's ``get_classifier()``,
    torchvision's ``fc`` or ``classifier`` (the last module of a Sequential classifier)."""
    for name in ("head", "fc", "classifier"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        return get_classifier()
    raise ValueError(f"{type(model).__name__} has no 'head', 'fc' or 'classifier' to tap 'features' from")
