"""Model zoo: small Fashion-MNIST models, the CIFAR KD zoo, torchvision/timm by name, feature taps."""

from dtokd.models.registry import available_models, create_model, load_weights
from dtokd.models.taps import FeatureTaps

__all__ = ["FeatureTaps", "available_models", "create_model", "load_weights"]
