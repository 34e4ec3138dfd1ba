"""Training: configuration, the loop, checkpoints, records."""

from dtokd.train.config import Config, ConfigError, load_config
from dtokd.train.loop import train

__all__ = ["Config", "ConfigError", "load_config", "train"]
