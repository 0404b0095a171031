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
    closed = jax.make_jaxpr(fn)(*args)
    n_before = sum(len(jax.tree.leaves(a)) for a in args[:argnum])
    n_arg = len(jax.tree.leaves(args[argnum]))
    jaxpr = closed.jaxpr
    marked = set(jaxpr.invars[n_before : n_before + n_arg])
    for eqn in jaxpr.eqns:
        if any(not isinstance(v, jex_core.Literal) and v in marked for v in eqn.invars):
            marked.update(eqn.outvars)
    return any(not isinstance(v, jex_core.Literal) and v in marked for v in jaxpr.outvars)
