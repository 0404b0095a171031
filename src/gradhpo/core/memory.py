"""Choosing a memory strategy from a budget: compile the candidates, read their memory.

``memory_budget`` on the reverse-mode estimators (and :func:`gradhpo.reverse_hypergradient`)
is a ceiling on XLA's temporary buffers of the compiled hypergradient. The candidates are
lowered and compiled for the actual shapes (``jax.jit(...).lower(...).compile()``), their
``memory_analysis().temp_size_in_bytes`` read, and the first one that fits is used, in the
order of :data:`CANDIDATES`: fastest first, as the ``cost`` benchmark measures them on an
MLP (storing everything, per-step rematerialisation, √T segments, the same three in mixed
mode, then binomial checkpointing).
"""

from __future__ import annotations

import logging
import numbers
import re
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradhpo.core.checkpoint import Checkpoint

#: ``(checkpoint, mixed_mode)`` candidates, fastest first.
CANDIDATES: tuple[tuple[Checkpoint, bool], ...] = (
    (None, False),
    ("step", False),
    ("sqrt", False),
    (None, True),
    ("step", True),
    ("sqrt", True),
    ("binomial", False),
    ("binomial", True),
)

_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6}
_UNITS["gb"] = 10**9

logger = logging.getLogger("gradhpo")

# Plans already made, per owner (an optimizer, never mutated) and input signature.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class MemoryPlan(NamedTuple):
    """What a memory budget chose.

    Attributes:
      checkpoint: the chosen strategy (``None``, ``"sqrt"``, ``"step"``, ``"binomial"``).
      mixed_mode: whether mixed mode is on.
      budget: the budget in bytes.
      table: ``((checkpoint, mixed_mode, temp_bytes), ...)`` for every candidate compiled,
        in the order tried (compilation stops at the first that fits).
    """

    checkpoint: Checkpoint
    mixed_mode: bool
    budget: int
    table: tuple[tuple[Checkpoint, bool, int], ...]


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def parse_budget(memory_budget: Any) -> int | None:
    """A memory budget in bytes from an int (bytes) or a string such as ``"64 MiB"``.

    Example:
      >>> from gradhpo.core.memory import parse_budget
      >>> parse_budget("1.5 KiB"), parse_budget(4096), parse_budget(None)
      (1536, 4096, None)
    """
    if memory_budget is None:
        return None
    if isinstance(memory_budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", memory_budget)
        if match and match.group(2).lower() in _UNITS:
            value = float(match.group(1)) * _UNITS[match.group(2).lower()]
            if value > 0:
                return int(value)
    elif (
        isinstance(memory_budget, numbers.Real)
        and not isinstance(memory_budget, bool)
        and memory_budget > 0
    ):
        return int(memory_budget)
    raise ValueError(
        "memory_budget must be None, a positive number of bytes or a string such as "
        f'"64 MiB" (units B, KiB, MiB, GiB, KB, MB, GB), got {memory_budget!r}'
    )


def temp_bytes(fn: Callable, *args: Any) -> int:
    """XLA's temporary memory, in bytes, of ``jax.jit(fn)`` compiled for ``args``' shapes.

    ``args`` may be arrays, tracers or ``jax.ShapeDtypeStruct``: only shapes and dtypes are
    read, nothing is run.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.core.memory import temp_bytes
      >>> temp_bytes(lambda x: jnp.sum(jnp.sin(x) * jnp.cos(x)), jnp.ones(1000)) >= 0
      True
    """
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), args)
    compiled = jax.jit(fn).lower(*abstract).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:  # pragma: no cover - every backend gradhpo tests reports it
        raise RuntimeError("this JAX backend reports no memory analysis; give checkpoint instead")
    return int(analysis.temp_size_in_bytes)


def plan_memory(
    make_fn: Callable[[Checkpoint, bool], Callable],
    args: tuple,
    budget: int,
    *,
    allow_mixed: bool = True,
    name: str = "the hypergradient",
) -> MemoryPlan:
    """The fastest candidate whose compiled temporary memory fits ``budget`` bytes.

    Args:
      make_fn: ``make_fn(checkpoint, mixed_mode)`` returns the function to compile.
      args: its arguments (arrays, tracers or shape structs).
      budget: the budget in bytes.
      allow_mixed: whether mixed-mode candidates are possible (not with an ``update_fn``).
      name: what is compiled, for the messages.

    Returns:
      A :class:`MemoryPlan`. The choice is logged (logger ``"gradhpo"``, level INFO).

    Raises:
      ValueError: no candidate fits; the message lists each one's memory.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo import Stacked
      >>> from gradhpo.core.checkpoint import remat_scan
      >>> from gradhpo.core.memory import plan_memory
      >>> window = Stacked(jnp.ones((64, 256)))
      >>> def make(checkpoint, mixed):
      ...     body = lambda w, b: (jnp.tanh(w * b), None)
      ...     return jax.grad(lambda w: jnp.sum(remat_scan(body, w, window, checkpoint)))
      >>> plan = plan_memory(make, (jnp.ones(256),), 10**9, allow_mixed=False)
      >>> plan.checkpoint, plan.mixed_mode  # everything fits in 1 GB: store everything
      (None, False)
    """
    table = []
    for checkpoint, mixed in CANDIDATES:
        if mixed and not allow_mixed:
            continue
        used = temp_bytes(make_fn(checkpoint, mixed), *args)
        table.append((checkpoint, mixed, used))
        if used <= budget:
            plan = MemoryPlan(checkpoint, mixed, budget, tuple(table))
            logger.info(
                "memory_budget %s: %s uses checkpoint=%r, mixed_mode=%s (%s)",
                _size(budget),
                name,
                checkpoint,
                mixed,
                _size(used),
            )
            return plan
    rows = ", ".join(f"checkpoint={c!r} mixed_mode={m}: {_size(b)}" for c, m, b in table)
    raise ValueError(
        f"memory_budget = {_size(budget)} is below what every strategy for {name} "
        f"needs ({rows}); raise the budget or shorten unroll_steps"
    )


def cached_plan(
    owner: Any,
    tag: Any,
    make_fn: Callable[[Checkpoint, bool], Callable],
    args: tuple,
    budget: int,
    **options: Any,
) -> MemoryPlan:
    """:func:`plan_memory`, made once per ``owner``, ``tag``, budget and input shapes.

    ``owner`` (an optimizer) is held weakly; ``tag`` names what is compiled (with the loss
    functions, which change the program).

    Example:
      >>> import jax, jax.numpy as jnp, optax, gradhpo
      >>> from gradhpo.core.memory import cached_plan
      >>> opt = gradhpo.FOOptimizer(optax.sgd(0.1))
      >>> make = lambda checkpoint, mixed: jax.grad(lambda w: jnp.sum(jnp.sin(w)))
      >>> a = cached_plan(opt, "demo", make, (jnp.ones(3),), 2**20, allow_mixed=False)
      >>> a is cached_plan(opt, "demo", make, (jnp.ones(3),), 2**20, allow_mixed=False)
      True
    """
    leaves, treedef = jax.tree.flatten(args)
    shapes = tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)
    key = (tag, budget, treedef, shapes)
    plans = _PLANS.setdefault(owner, {})
    if key not in plans:
        plans[key] = plan_memory(make_fn, args, budget, **options)
    return plans[key]
