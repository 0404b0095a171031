"""The bilevel algorithms."""

from gradhpo.algorithms.baselines import FOOptimizer, OneStepOptimizer
from gradhpo.algorithms.exact import ReverseModeOptimizer
from gradhpo.algorithms.greedy import GreedyOptimizer, Stacked
from gradhpo.algorithms.online import OnlineHypergradientOptimizer
from gradhpo.algorithms.t1t2 import T1T2Optimizer

__all__ = [
    "FOOptimizer",
    "GreedyOptimizer",
    "OneStepOptimizer",
    "OnlineHypergradientOptimizer",
    "ReverseModeOptimizer",
    "Stacked",
    "T1T2Optimizer",
]
