"""Detectors from torchvision by name: ``detection:<head>_<backbone>_fpn``.

``head``: ``fasterrcnn`` (two-stage, RPN + RoI heads), ``retinanet`` or ``fcos`` (one-stage,
dense); ``backbone``: ``resnet18|34|50|101|152`` or ``mobilenet_v3_large|small``, always with
an FPN of 256 channels. The levels: Faster R-CNN takes ResNet stages C2-C5 (P2-P5 plus a
max-pooled P6, strides 4-64); RetinaNet and FCOS take C3-C5 plus P6/P7 (strides 8-128), as
torchvision builds them; MobileNetV3 gives its last two stages (strides 16, 32) plus the extra
level(s). ``detection:fasterrcnn_resnet50_fpn`` has torchvision's ``fasterrcnn_resnet50_fpn``
state-dict names (and ``norm: frozen`` its layers), so its released COCO weights load as
``weights`` from a local file.

Weights start random (nothing is downloaded). ``num_classes`` is the data's K; the
detectors get K + 1 outputs (0 is the background, torchvision's convention).

``kwargs``:

- ``min_size`` / ``max_size``: the detector's own resize (shorter side, longer-side cap);
  default ``image_size`` and ``image_size * 1333 / 800`` (COCO's 800/1333 for 800);
- ``anchor_scale`` (1.0): anchor sizes relative to torchvision's COCO anchors (Faster R-CNN
  8 x stride, RetinaNet 4 x stride at 3 octave scales, FCOS one stride); below 1 for small
  images and objects;
- ``norm``: the backbone's normalisation, ``batch`` (default: BatchNorm, for training from
  scratch), ``frozen`` (torchvision's FrozenBatchNorm2d, for pretrained backbones) or
  ``group`` (32 groups);
- ``trainable_layers`` (all): backbone stages that train (torchvision's argument);
- ``backbone_weights``: a local ImageNet state dict of the backbone classifier (e.g.
  torchvision's ``resnet50-*.pth``), loaded into the backbone (its classifier dropped);
- anything else goes to the detector's constructor (``box_detections_per_img``,
  ``score_thresh``, ...).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

HEADS = ("fasterrcnn", "retinanet", "fcos")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
MOBILENETS = ("mobilenet_v3_large", "mobilenet_v3_small")
NORMS = ("batch", "frozen", "group")
OWN_KWARGS = ("min_size", "max_size", "anchor_scale", "norm", "trainable_layers", "backbone_weights")


def detector_names() -> list[str]:
    return [f"detection:{h}_{b}_fpn" for h in HEADS for b in RESNETS + MOBILENETS]


def parse_name(name: str) -> tuple[str, str]:
    """``detection:<head>_<backbone>_fpn`` -> (head, backbone), or a ValueError listing the choices."""
    arch = name.split(":", 1)[1]
    for head in HEADS:
        for backbone in RESNETS + MOBILENETS:
            if arch == f"{head}_{backbone}_fpn":
                return head, backbone
    raise ValueError(
        f"unknown detector {name!r}; use detection:<head>_<backbone>_fpn with head in {list(HEADS)} "
        f"and backbone in {list(RESNETS + MOBILENETS)}"
    )


def create_detector(name: str, num_classes: int, image_size: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """A randomly initialised torchvision detector for ``num_classes`` object classes."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    head, backbone_name = parse_name(name)
    kwargs = dict(kwargs or {})
    own = {k: kwargs.pop(k) for k in OWN_KWARGS if k in kwargs}
    norm = own.get("norm", "batch")
    if norm not in NORMS:
        raise ValueError(f"{name}: kwargs norm={norm!r} is not allowed; use one of {list(NORMS)}")
    min_size = int(own.get("min_size", image_size))
    max_size = int(own.get("max_size", round(min_size * 1333 / 800)))
    two_stage = head == "fasterrcnn"
    extra = None if two_stage else LastLevelP6P7(256, 256)
    backbone = _backbone(backbone_name, norm, own.get("trainable_layers"), two_stage, extra)
    if own.get("backbone_weights"):
        _load_backbone_weights(cast(nn.Module, backbone.body), Path(own["backbone_weights"]), backbone_name)
    strides = _strides(backbone)
    anchors = _anchor_generator(head, strides, float(own.get("anchor_scale", 1.0)))
    builder = {"fasterrcnn": FasterRCNN, "retinanet": RetinaNet, "fcos": FCOS}[head]
    try:
        return builder(
            backbone,
            num_classes=num_classes + 1,
            min_size=min_size,
            max_size=max_size,
            **{"rpn_anchor_generator" if two_stage else "anchor_generator": anchors},
            **kwargs,
        )
    except TypeError as error:
        raise ValueError(f"model {name!r} does not take kwargs {kwargs}: {error}") from None


def _norm_layer(norm: str) -> Any:
    from torchvision.ops.misc import FrozenBatchNorm2d

    if norm == "frozen":
        return FrozenBatchNorm2d
    if norm == "group":
        return partial(nn.GroupNorm, 32)
    return nn.BatchNorm2d


def _backbone(
    name: str, norm: str, trainable_layers: int | None, two_stage: bool, extra: nn.Module | None
) -> nn.Module:
    from torchvision.models.detection.backbone_utils import mobilenet_backbone, resnet_fpn_backbone

    norm_layer = _norm_layer(norm)
    if name in RESNETS:
        returned = [1, 2, 3, 4] if two_stage else [2, 3, 4]
        return resnet_fpn_backbone(
            backbone_name=name,
            weights=None,
            norm_layer=norm_layer,
            trainable_layers=5 if trainable_layers is None else trainable_layers,
            returned_layers=returned,
            extra_blocks=extra,
        )
    return mobilenet_backbone(
        backbone_name=name,
        weights=None,
        fpn=True,
        norm_layer=norm_layer,
        trainable_layers=6 if trainable_layers is None else trainable_layers,
        extra_blocks=extra,
    )


@torch.no_grad()
def _strides(backbone: nn.Module) -> list[int]:
    """Each FPN level's stride, measured on a 256-pixel input."""
    was_training = backbone.training
    backbone.eval()
    features = backbone(torch.zeros(1, 3, 256, 256))
    backbone.train(was_training)
    return [round(256 / f.shape[-1]) for f in features.values()]


def _anchor_generator(head: str, strides: list[int], scale: float) -> nn.Module:
    """One anchor size per level (times 3 octave scales for RetinaNet), 3 aspect ratios (1 for FCOS)."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    if scale <= 0:
        raise ValueError(f"kwargs anchor_scale={scale} is not allowed; use a positive factor")
    sizes: tuple[tuple[int, ...], ...]
    if head == "fasterrcnn":
        sizes = tuple((max(1, round(8 * s * scale)),) for s in strides)
    elif head == "retinanet":
        base = [max(1, round(4 * s * scale)) for s in strides]  # octave scales truncated, as torchvision does
        sizes = tuple(tuple(max(1, int(b * 2 ** (k / 3))) for k in range(3)) for b in base)
    else:
        sizes = tuple((max(1, round(s * scale)),) for s in strides)
    ratios = ((1.0,),) * len(strides) if head == "fcos" else ((0.5, 1.0, 2.0),) * len(strides)
    return AnchorGenerator(sizes, ratios)


def _load_backbone_weights(body: nn.Module, path: Path, backbone_name: str) -> None:
    """An ImageNet classifier's state dict into the FPN backbone's body (which has no classifier)."""
    from dtokd.models.weight_file import read_weights

    state, _ = read_weights(path)
    if backbone_name in MOBILENETS:
        state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    expected = body.state_dict()
    kept = {k: v for k, v in state.items() if k in expected}
    missing = [k for k in expected if k not in kept and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(
            f"kwargs backbone_weights={str(path)!r} does not fit the {backbone_name} backbone: "
            f"{len(missing)} missing name(s), e.g. {missing[:3]}"
        )
    body.load_state_dict(kept, strict=False)


def is_detector(model: nn.Module) -> bool:
    """A torchvision detector (loss dict in training, boxes in evaluation)."""
    from torchvision.models.detection import FCOS, RetinaNet
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN

    return isinstance(model, (GeneralizedRCNN, RetinaNet, FCOS))


def loss_terms(model: nn.Module) -> tuple[str, ...]:
    """The keys of the loss dict ``model`` returns in training mode."""
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

    if isinstance(model, FasterRCNN):
        return ("loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg")
    if isinstance(model, RetinaNet):
        return ("classification", "bbox_regression")
    if isinstance(model, FCOS):
        return ("classification", "bbox_regression", "bbox_ctrness")
    raise ValueError(f"{type(model).__name__} is not a torchvision detector (FasterRCNN, RetinaNet, FCOS)")


TERM_KINDS = {
    "loss_classifier": "cls",
    "classification": "cls",
    "loss_box_reg": "box",
    "loss_rpn_box_reg": "box",
    "bbox_regression": "box",
    "loss_objectness": "obj",
    "bbox_ctrness": "obj",
}
"""Each loss term's kind: classification, box regression, objectness (or FCOS's centerness)."""
