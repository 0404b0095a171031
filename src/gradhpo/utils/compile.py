"""Count XLA compilations, to check that a training loop compiles once."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Iterator

import jax.monitoring

# One MLIR lowering happens per compilation of a jitted program, whether or not the
# persistent compilation cache then serves the executable.
_LOWERING_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"


@dataclasses.dataclass
class CompilationCounter:
    """How many programs were compiled while the counter was active, and which.

    Attributes:
      count: the number of compilations.
      by_name: compilations per program name (``jit(<function name>)``).
    """

    count: int = 0
    by_name: collections.Counter = dataclasses.field(default_factory=collections.Counter)


#: Programs of gradhpo's trace-time checks, not part of any step (listed, not counted).
CHECK_PROGRAMS = frozenset({"jit(_singularity_probe)"})


@contextlib.contextmanager
def count_compilations() -> Iterator[CompilationCounter]:
    """Count the programs JAX compiles inside the ``with`` block.

    Every jitted program that has to be compiled (traced and lowered) counts once,
    including the small programs eager ``jnp`` operations compile on first use; call the
    code once before the block to count only what a steady-state loop compiles. The one
    exception: gradhpo's own trace-time check of the inner optimizer (the program
    ``_singularity_probe``, compiled once per optimizer and problem shape while a step is
    first traced) is listed in ``by_name`` but not counted.

    Returns:
      A :class:`CompilationCounter` whose ``count`` is updated as compilations happen.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo.utils import count_compilations
      >>> f = jax.jit(lambda x, lr: x - lr * x)
      >>> _ = f(jnp.ones(3), 0.1)
      >>> with count_compilations() as c:
      ...     for lr in (0.1, 0.2, 0.3):
      ...         _ = f(jnp.ones(3), lr)
      >>> c.count
      0
      >>> x = jnp.ones(4)
      >>> with count_compilations() as c:
      ...     _ = f(x, 0.1)  # a new shape: a new program
      >>> c.count, c.by_name
      (1, Counter({'jit(<lambda>)': 1}))
    """
    counter = CompilationCounter()

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == _LOWERING_EVENT:
            name = str(kwargs.get("fun_name", "?"))
            counter.by_name[name] += 1
            if name not in CHECK_PROGRAMS:
                counter.count += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
