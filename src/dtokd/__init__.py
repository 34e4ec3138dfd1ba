"""dtokd: knowledge distillation with the task/distillation trade-off solved per step (DTO-KD)."""

from dtokd.balancing import BALANCERS, Balancer, StepInfo, make_balancer, weights

__version__ = "0.1.0"

__all__ = ["BALANCERS", "Balancer", "StepInfo", "__version__", "make_balancer", "weights"]
