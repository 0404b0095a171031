"""Core: the state, the optimizer base class, the inner step, type aliases."""

from gradhpo.core.base import BilevelOptimizer, Estimate
from gradhpo.core.inner import InnerResult, InnerStep, validation_grads
from gradhpo.core.state import BilevelState

__all__ = [
    "BilevelOptimizer",
    "BilevelState",
    "Estimate",
    "InnerResult",
    "InnerStep",
    "validation_grads",
]
