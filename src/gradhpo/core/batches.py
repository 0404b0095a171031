"""``Stacked``: a window of per-step batches, the unit every estimator and loop exchanges.

A window is the k inner steps one hyper-update covers (DESIGN of the library: k = 1 for an
online ``step``, ``unroll_steps`` for a window optimizer). Its batches are either k batches
stacked along a leading step axis, or one batch reused for every step
(:meth:`Stacked.repeat`, which stores the batch once).
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gradhpo.utils.tree import leading_axis_length, stack_batches

PyTree = Any


@jax.tree_util.register_pytree_node_class
class Stacked:
    """Marks a batch argument as one batch per inner step (a leading step axis of length k).

    An unmarked batch given to a window optimizer is reused for every unrolled step,
    whatever its shape, so a batch of T examples is never mistaken for T batches. Wrap the
    batches in ``Stacked`` to give step ``t`` its own batch ``D_t`` (or validation batch
    ``V_t``); ``Stacked.repeat(batch, k)`` is a window of k steps on one batch (stored once).

    Args:
      batches: a Python ``list`` of k same-shaped batches (stacked here, as
        :func:`~gradhpo.utils.stack_batches` does), or one already stacked pytree whose leaves
        all carry the leading step axis. A stacked batch whose own container is a list must
        be given as a tuple, since a list is read as a list of batches.

    Returns:
      A pytree (its one child is the stacked batch), so it passes through ``jax.jit``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo import Stacked
      >>> Stacked([{"x": jnp.zeros(3)}, {"x": jnp.ones(3)}]).batches["x"].shape
      (2, 3)
      >>> Stacked({"x": jnp.zeros((5, 3))}).num_steps
      5
      >>> window = Stacked.repeat({"x": jnp.zeros(3)}, 4)
      >>> window.num_steps, window.batches["x"].shape
      (4, (3,))

    References:
      Anonymous, generalized greedy HO, ICLR 2025 submission (one batch per unrolled step).
    """

    __slots__ = ("_repeat", "batches")

    def __init__(self, batches: Sequence[PyTree] | PyTree):
        object.__setattr__(self, "batches", stack_batches(batches))
        object.__setattr__(self, "_repeat", None)
        _ = self.num_steps  # a leading axis shared by every leaf, checked now

    @classmethod
    def repeat(cls, batch: PyTree, num_steps: int) -> Stacked:
        """A window of ``num_steps`` inner steps that all use ``batch`` (stored once).

        Example:
          >>> import jax.numpy as jnp
          >>> from gradhpo import Stacked
          >>> Stacked.repeat(jnp.ones(2), 3).at(None)
          Array([1., 1.], dtype=float32)
        """
        if (
            isinstance(num_steps, bool)
            or not isinstance(num_steps, numbers.Integral)
            or num_steps < 1
        ):
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        obj = object.__new__(cls)
        object.__setattr__(obj, "batches", batch)
        object.__setattr__(obj, "_repeat", int(num_steps))
        return obj

    @property
    def num_steps(self) -> int:
        """The number of inner steps of the window (a static int)."""
        if self._repeat is not None:
            return self._repeat
        return leading_axis_length(self.batches, "Stacked batches")

    @property
    def scan_xs(self) -> PyTree:
        """What ``lax.scan`` iterates over: the stacked batches, or ``None`` for a repeat."""
        return None if self._repeat is not None else self.batches

    def at(self, xs_t: PyTree) -> PyTree:
        """The batch of one step, from the slice ``xs_t`` of :attr:`scan_xs` a scan hands out."""
        return self.batches if self._repeat is not None else xs_t

    def last(self) -> PyTree:
        """The batch of the window's last step.

        Example:
          >>> import jax.numpy as jnp
          >>> from gradhpo import Stacked
          >>> Stacked(jnp.arange(3.0)[:, None]).last()
          Array([2.], dtype=float32)
        """
        if self._repeat is not None:
            return self.batches
        return jax.tree.map(lambda x: x[-1], self.batches)

    def split(self, num_steps: int) -> tuple[Stacked, Stacked]:
        """The window's first ``num_steps`` steps and the rest, as two windows.

        Example:
          >>> import jax.numpy as jnp
          >>> from gradhpo import Stacked
          >>> head, tail = Stacked(jnp.arange(5.0)).split(3)
          >>> head.num_steps, tail.batches
          (3, Array([3., 4.], dtype=float32))
        """
        n, k = num_steps, self.num_steps
        if not 0 < n < k:
            raise ValueError(f"num_steps must be in [1, {k - 1}] to split {k} steps, got {n}")
        if self._repeat is not None:
            return Stacked.repeat(self.batches, n), Stacked.repeat(self.batches, k - n)
        head = jax.tree.map(lambda x: x[:n], self.batches)
        tail = jax.tree.map(lambda x: x[n:], self.batches)
        return Stacked.tree_unflatten(None, (head,)), Stacked.tree_unflatten(None, (tail,))

    def scan(self, body: Callable, carry: Any, num_steps: int | None = None) -> tuple[Any, Any]:
        """``lax.scan(lambda c, x: body(c, batch_t), carry)`` over the window's batches.

        Args:
          body: ``body(carry, batch_t) -> (carry, output)``.
          carry: the initial carry.
          num_steps: scan only the first ``num_steps`` steps (default: all). The batches are
            read by index inside the scan, so a prefix is never copied.

        Example:
          >>> import jax.numpy as jnp
          >>> from gradhpo import Stacked
          >>> window = Stacked(jnp.arange(4.0))
          >>> float(window.scan(lambda c, b: (c + b, None), 0.0)[0])
          6.0
          >>> float(window.scan(lambda c, b: (c + b, None), 0.0, num_steps=3)[0])
          3.0
        """
        n = self.num_steps if num_steps is None else num_steps
        if self._repeat is not None:
            return jax.lax.scan(lambda c, _: body(c, self.batches), carry, None, length=n)
        if n == self.num_steps:
            return jax.lax.scan(body, carry, self.batches)
        at_t = lambda t: jax.tree.map(lambda x: x[t], self.batches)  # noqa: E731
        return jax.lax.scan(lambda c, t: body(c, at_t(t)), carry, jnp.arange(n))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Stacked is immutable")

    # Pickling and copying: the slots are read-only, so rebuild through the pytree protocol.
    def __reduce__(self):
        return Stacked.tree_unflatten, (self._repeat, (self.batches,))

    def __copy__(self) -> Stacked:
        return Stacked.tree_unflatten(self._repeat, (self.batches,))

    def __deepcopy__(self, memo: dict) -> Stacked:
        return Stacked.tree_unflatten(self._repeat, (copy.deepcopy(self.batches, memo),))

    def __repr__(self) -> str:
        if self._repeat is not None:
            return f"Stacked.repeat({self.batches!r}, {self._repeat})"
        return f"Stacked({self.batches!r})"

    def tree_flatten(self):
        return (self.batches,), self._repeat

    @classmethod
    def tree_unflatten(cls, aux: int | None, children: tuple) -> Stacked:
        # Bypasses __init__: JAX rebuilds the marker with tracers or placeholders as leaves.
        obj = object.__new__(cls)
        object.__setattr__(obj, "batches", children[0])
        object.__setattr__(obj, "_repeat", aux)
        return obj


def as_window(batch: PyTree | Stacked, num_steps: int | None = None) -> Stacked:
    """``batch`` as a window: a :class:`Stacked` as it is, anything else repeated.

    Args:
      batch: a :class:`Stacked` window, or one batch.
      num_steps: the window length a plain batch is repeated for (default 1).

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.core.batches import as_window
      >>> as_window(jnp.ones(2), 3).num_steps
      3
    """
    if isinstance(batch, Stacked):
        return batch
    return Stacked.repeat(batch, 1 if num_steps is None else num_steps)
