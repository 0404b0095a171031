"""Training loops: episodes, Reptile, schedules, progress, metrics, populations."""

from gradhpo.training.data import Sampler, fixed_batch, minibatches
from gradhpo.training.loop import STALL_AFTER, RunResult, StalledRunError, run, run_population

__all__ = [
    "STALL_AFTER",
    "RunResult",
    "Sampler",
    "StalledRunError",
    "fixed_batch",
    "minibatches",
    "run",
    "run_population",
]
