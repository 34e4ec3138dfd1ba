"""Data: Fashion-MNIST, image folders (or .tar.gz), CIFAR python format, digits, synthetic."""

from dtokd.data.bundle import DATASETS, DataBundle, build_data, eval_loader, place_data, to_device, train_loader

__all__ = ["DATASETS", "DataBundle", "build_data", "eval_loader", "place_data", "to_device", "train_loader"]
