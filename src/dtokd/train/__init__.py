"""Training: configuration, the loop, checkpoints, records (the loop, which needs PyTorch, is
imported on first use)."""

from __future__ import annotations

from typing import Any

from dtokd.train.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from dtokd.train.loop import train

        return train
    raise AttributeError(f"module 'dtokd.train' has no attribute {name!r}")
