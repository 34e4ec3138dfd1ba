"""Distillation losses; each returns named losses so that a balancer sees them separately."""

from dtokd.losses.distiller import LOSS_OPTIONS, Distiller, resolve_loss_specs
from dtokd.losses.dkd import dkd_loss
from dtokd.losses.feature import FeatureProjector
from dtokd.losses.kd import kd_loss

__all__ = ["LOSS_OPTIONS", "Distiller", "FeatureProjector", "dkd_loss", "kd_loss", "resolve_loss_specs"]
