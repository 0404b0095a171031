"""Core: the state, the window seam (base classes), batches, the inner step, type aliases."""

from gradhpo.core.base import (
    BilevelOptimizer,
    Estimate,
    OnlineOptimizer,
    Refit,
    WindowOptimizer,
)
from gradhpo.core.batches import Stacked
from gradhpo.core.inner import InnerResult, InnerStep, validation_grads
from gradhpo.core.state import BilevelState

__all__ = [
    "BilevelOptimizer",
    "BilevelState",
    "Estimate",
    "InnerResult",
    "InnerStep",
    "OnlineOptimizer",
    "Refit",
    "Stacked",
    "WindowOptimizer",
    "validation_grads",
]
