"""Static (trace-time) dependence analysis of a function's output on its inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex_core


def output_depends_on(fn: Callable[..., Any], argnum: int, *args: Any) -> bool:
    """Whether ``fn(*args)`` depends on its argument ``argnum`` in the traced program.

    Decided on the jaxpr, without running ``fn``: a forward pass marks every value computed
    from the argument. It is conservative (a dependence through a nested call counts), so
    ``False`` means the output cannot change with the argument and its gradient is zero.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import output_depends_on
      >>> output_depends_on(lambda w, lam: jnp.sum(w**2), 1, jnp.ones(2), jnp.ones(2))
      False
      >>> output_depends_on(lambda w, lam: jnp.sum(w * lam), 1, jnp.ones(2), jnp.ones(2))
      True
    """
    return any(leaves_used(fn, argnum, *args))


def leaves_used(fn: Callable[..., Any], argnum: int, *args: Any) -> list[bool]:
    """For each leaf of argument ``argnum``: whether any output of ``fn(*args)`` depends on it.

    The same conservative forward marking on the jaxpr as :func:`output_depends_on`, one
    bit per leaf, in ``jax.tree.leaves`` order.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils.dependence import leaves_used
      >>> leaves_used(lambda w, lam: w * lam["a"], 1, jnp.ones(2), {"a": 1.0, "b": 2.0})
      [True, False]
    """
    closed = jax.make_jaxpr(fn)(*args)
    n_before = sum(len(jax.tree.leaves(a)) for a in args[:argnum])
    n_arg = len(jax.tree.leaves(args[argnum]))
    jaxpr = closed.jaxpr
    # Bit i of a variable's mask: the variable is computed from leaf i.
    masks = {v: 1 << i for i, v in enumerate(jaxpr.invars[n_before : n_before + n_arg])}

    def mask(v) -> int:
        return 0 if isinstance(v, jex_core.Literal) else masks.get(v, 0)

    for eqn in jaxpr.eqns:
        m = 0
        for v in eqn.invars:
            m |= mask(v)
        if m:
            for v in eqn.outvars:
                masks[v] = m
    used = 0
    for v in jaxpr.outvars:
        used |= mask(v)
    return [bool(used >> i & 1) for i in range(n_arg)]
