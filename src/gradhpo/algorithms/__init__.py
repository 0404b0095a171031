"""The bilevel algorithms."""

from gradhpo.algorithms.baselines import FOOptimizer, OneStepOptimizer

__all__ = ["FOOptimizer", "OneStepOptimizer"]
