"""Gradient balancing: weight rules (pure), gradient engines (autograd), balancers (both + state).

Public API::

    weights(method, gram, **options) -> Tensor          # pure rules on an m x m Gram matrix
    make_balancer(method, params, **options) -> Balancer
    Balancer.backward(losses) -> StepInfo
"""

from dtokd.balancing.balancers import BALANCERS, make_balancer
from dtokd.balancing.base import Balancer
from dtokd.balancing.checks import NonFiniteStepError
from dtokd.balancing.engines import ENGINES
from dtokd.balancing.rules import RULES, weights
from dtokd.balancing.stepinfo import StepInfo

__all__ = ["BALANCERS", "ENGINES", "RULES", "Balancer", "NonFiniteStepError", "StepInfo", "make_balancer", "weights"]
