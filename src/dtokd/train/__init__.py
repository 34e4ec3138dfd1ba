"""Training: configuration, the loop, checkpoints, records."""

from dtokd.train.config import Config, ConfigError, load_config
from dtokd.train.loop import evaluate, train

__all__ = ["Config", "ConfigError", "evaluate", "load_config", "train"]
