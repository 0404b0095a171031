"""The bilevel algorithms."""

from gradhpo.algorithms.baselines import FOOptimizer, OneStepOptimizer
from gradhpo.algorithms.drmad import DrMADOptimizer
from gradhpo.algorithms.exact import ReverseModeOptimizer, TruncatedReverseOptimizer
from gradhpo.algorithms.forward import ForwardModeOptimizer
from gradhpo.algorithms.greedy import GreedyOptimizer, Stacked
from gradhpo.algorithms.implicit import ImplicitOptimizer, implicit_hypergradient
from gradhpo.algorithms.online import OnlineHypergradientOptimizer
from gradhpo.algorithms.t1t2 import T1T2Optimizer

__all__ = [
    "DrMADOptimizer",
    "FOOptimizer",
    "ForwardModeOptimizer",
    "GreedyOptimizer",
    "ImplicitOptimizer",
    "OneStepOptimizer",
    "OnlineHypergradientOptimizer",
    "ReverseModeOptimizer",
    "Stacked",
    "T1T2Optimizer",
    "TruncatedReverseOptimizer",
    "implicit_hypergradient",
]
