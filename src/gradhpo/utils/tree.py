"""Small pytree helpers: arithmetic, norms, finiteness checks, batch stacking."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    """Leaf-wise ``a + b``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import tree_add
      >>> tree_add({"x": jnp.ones(2)}, {"x": jnp.ones(2)})["x"]
      Array([2., 2.], dtype=float32)
    """
    return jax.tree.map(jnp.add, a, b)


def tree_scale(c, a: PyTree) -> PyTree:
    """Leaf-wise ``c * a`` for a scalar ``c``, keeping each leaf's dtype.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import tree_scale
      >>> tree_scale(3.0, [jnp.ones(2)])[0]
      Array([3., 3.], dtype=float32)
    """
    return jax.tree.map(lambda x: (c * x).astype(x.dtype), a)


def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
    """Sum over all leaves of ``<a, b>``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import tree_dot
      >>> float(tree_dot((jnp.ones(2), 2.0), (jnp.ones(2), 3.0)))
      8.0
    """
    parts = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.vdot(x, y), a, b))
    return sum(parts, jnp.zeros((), jnp.result_type(*parts))) if parts else jnp.zeros(())


def tree_norm(a: PyTree) -> jax.Array:
    """Global Euclidean norm over all leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import tree_norm
      >>> float(tree_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0])}))
      5.0
    """
    return jnp.sqrt(tree_dot(a, a))


def tree_cosine(a: PyTree, b: PyTree) -> jax.Array:
    """Cosine similarity of two pytrees seen as flat vectors (0 when either is zero).

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import tree_cosine
      >>> float(tree_cosine(jnp.array([1.0, 0.0]), jnp.array([2.0, 0.0])))
      1.0
    """
    denom = tree_norm(a) * tree_norm(b)
    return jnp.where(denom > 0, tree_dot(a, b) / jnp.where(denom > 0, denom, 1), 0.0)


def all_finite(tree: PyTree) -> jax.Array:
    """A boolean scalar: every element of every inexact leaf of ``tree`` is finite.

    Integer leaves (step counters in optimizer states) are ignored.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import all_finite
      >>> bool(all_finite([jnp.ones(2), jnp.array([jnp.nan])]))
      False
    """
    flags = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def tree_select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leaf-wise ``jnp.where(pred, on_true, on_false)`` for a scalar boolean ``pred``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import tree_select
      >>> tree_select(jnp.asarray(False), [jnp.ones(2)], [jnp.zeros(2)])[0]
      Array([0., 0.], dtype=float32)
    """
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), on_true, on_false)


def stack_batches(batches: Sequence[PyTree] | PyTree) -> PyTree:
    """Stack a list of same-shaped batches along a new leading axis; pass a stacked one through.

    Args:
      batches: a list or tuple of batches (each any pytree of arrays), or an already stacked
        pytree whose leaves carry the leading step axis.

    Returns:
      One pytree whose leaves have a leading axis of length ``len(batches)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import stack_batches
      >>> stack_batches([{"x": jnp.zeros(3)}, {"x": jnp.ones(3)}])["x"].shape
      (2, 3)
    """
    if isinstance(batches, list):
        if not batches:
            raise ValueError("batches must hold at least one batch, got an empty list")
        return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
    return batches


def leading_axis_length(tree: PyTree, name: str) -> int:
    """The common length of the leading axis of every leaf of ``tree`` (a static int).

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import leading_axis_length
      >>> leading_axis_length({"x": jnp.zeros((4, 2)), "y": jnp.zeros(4)}, "batches")
      4
    """
    lengths = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(tree)}
    if not lengths or None in lengths or len(lengths) != 1:
        raise ValueError(
            f"{name} must be stacked with one leading (step) axis shared by every leaf; "
            f"got leading sizes {sorted(lengths, key=str)}"
        )
    return lengths.pop()


def is_inexact(x) -> bool:
    """Whether ``x`` has a floating or complex dtype (it can carry a derivative).

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import is_inexact
      >>> is_inexact(jnp.ones(2)), is_inexact(jnp.array(3))
      (True, False)
    """
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def tree_lerp(p: jax.Array, old: PyTree, new: PyTree) -> PyTree:
    """``p·old + (1-p)·new`` leaf-wise, keeping dtypes; integer leaves are rounded.

    The EMA update of Eqs. 13 and 17 and DrMAD's interpolation of the trajectory both take
    this form; rounding makes the interpolated step counters of optax states exact.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.utils import tree_lerp
      >>> tree_lerp(0.25, (jnp.zeros(2), jnp.array(0)), (jnp.ones(2), jnp.array(4)))
      (Array([0.75, 0.75], dtype=float32), Array(3, dtype=int32))
    """

    def mix(a, b):
        if is_inexact(a):
            return (p * a + (1 - p) * b).astype(jnp.result_type(a))
        return (b + jnp.round(p * (a - b))).astype(jnp.result_type(a))

    return jax.tree.map(mix, old, new)
