"""Training loops: episodes, Reptile, schedules, progress, metrics, populations."""

from gradhpo.training.data import (
    DataExhaustedError,
    Sampler,
    Tasks,
    fixed_batch,
    minibatches,
    sharded_minibatches,
)
from gradhpo.training.loop import (
    STALL_AFTER,
    STOP_REASONS,
    RunResult,
    StalledRunError,
    run,
    run_population,
)

__all__ = [
    "STALL_AFTER",
    "STOP_REASONS",
    "DataExhaustedError",
    "RunResult",
    "Sampler",
    "StalledRunError",
    "Tasks",
    "fixed_batch",
    "minibatches",
    "run",
    "run_population",
    "sharded_minibatches",
]
