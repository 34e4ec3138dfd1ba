"""Distillation losses as plain functions and modules; the task (:mod:`dtokd.tasks`) names them
so that a balancer sees them separately."""

from dtokd.losses.dkd import dkd_loss
from dtokd.losses.feature import FeatureProjector
from dtokd.losses.kd import cross_entropy, deit_token_loss, kd_loss
from dtokd.losses.token_kd import token_kd_loss

__all__ = ["FeatureProjector", "cross_entropy", "deit_token_loss", "dkd_loss", "kd_loss", "token_kd_loss"]
