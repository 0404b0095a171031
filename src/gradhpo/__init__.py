"""gradhpo: gradient-based hyperparameter optimization in JAX.

Short-horizon hypergradient estimators (HyperDistill, T1-T2 with DARTS finite differences,
generalized Greedy, First-Order, One-Step) behind one ``BilevelOptimizer`` interface, and the
exact references (reverse and forward mode through the unrolled inner loop, and exact reverse
mode as an optimizer) that measure them.
"""

from gradhpo.algorithms.baselines import FOOptimizer, OneStepOptimizer
from gradhpo.algorithms.drmad import DrMADOptimizer
from gradhpo.algorithms.exact import ReverseModeOptimizer, TruncatedReverseOptimizer
from gradhpo.algorithms.forward import ForwardModeOptimizer
from gradhpo.algorithms.greedy import GreedyOptimizer
from gradhpo.algorithms.implicit import ImplicitOptimizer, implicit_hypergradient
from gradhpo.algorithms.online import OnlineHypergradientOptimizer
from gradhpo.algorithms.t1t2 import T1T2Optimizer
from gradhpo.core.base import (
    BilevelOptimizer,
    Estimate,
    OnlineOptimizer,
    Refit,
    WindowOptimizer,
)
from gradhpo.core.batches import Stacked
from gradhpo.core.inner import InnerStep
from gradhpo.core.state import BilevelState
from gradhpo.reference import forward_hypergradient, reverse_hypergradient, unrolled_val_loss

__version__ = "0.1.0"

__all__ = [
    "BilevelOptimizer",
    "BilevelState",
    "DrMADOptimizer",
    "Estimate",
    "FOOptimizer",
    "ForwardModeOptimizer",
    "GreedyOptimizer",
    "ImplicitOptimizer",
    "InnerStep",
    "OneStepOptimizer",
    "OnlineHypergradientOptimizer",
    "OnlineOptimizer",
    "Refit",
    "ReverseModeOptimizer",
    "Stacked",
    "T1T2Optimizer",
    "TruncatedReverseOptimizer",
    "WindowOptimizer",
    "__version__",
    "forward_hypergradient",
    "implicit_hypergradient",
    "reverse_hypergradient",
    "unrolled_val_loss",
]
