"""Training loops: episodes, Reptile, schedules, progress, metrics, populations."""

from gradhpo.training.data import Sampler, fixed_batch, minibatches
from gradhpo.training.loop import RunResult, run, run_population

__all__ = ["RunResult", "Sampler", "fixed_batch", "minibatches", "run", "run_population"]
