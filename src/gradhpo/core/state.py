"""The immutable optimisation state shared by every bilevel optimizer."""

from __future__ import annotations

import copy
from typing import Any

import jax
import jax.numpy as jnp

from gradhpo.core.inner import check_matches
from gradhpo.core.types import PyTree

_FIELDS = ("params", "hyperparams", "inner_opt_state", "outer_opt_state", "step", "metadata")
# Fields whose pytree structure and leaf shapes are fixed once the state exists.
_STRUCTURED = ("params", "hyperparams")


class BilevelState:
    """Immutable state of a bilevel optimizer, registered as a JAX pytree.

    Attributes:
      params: the inner weights ``w`` (any pytree of float arrays).
      hyperparams: the hyperparameters ``λ`` (any pytree of float arrays).
      inner_opt_state: the inner optax optimizer state (``None`` for an ``update_fn``).
      outer_opt_state: the outer optax optimizer state (``None`` for plain gradient descent).
      step: number of inner steps taken so far, an ``int32`` scalar array. It is a pytree
        *leaf*, so a new step value never changes the treedef and never forces a recompile.
      metadata: a dict of arrays (metrics, counters, algorithm-specific state). Its keys are
        static structure, its values are leaves.

    All six fields are pytree children, so a state passes through ``jax.jit``, ``jax.vmap``
    (a batch of states with a leading axis on every leaf) and ``jax.tree.map``; it
    round-trips through ``pickle`` and ``copy.deepcopy``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo import BilevelState
      >>> s = BilevelState(params=jnp.zeros(3), hyperparams=jnp.ones(2))
      >>> int(s.step)
      0
      >>> s2 = s.update(step=s.step + 1, outer_opt_state=None)
      >>> int(s2.step), int(s.step)
      (1, 0)
      >>> jax.tree.map(lambda x: x * 2, s2).hyperparams
      Array([2., 2.], dtype=float32)
    """

    __slots__ = _FIELDS

    params: PyTree
    hyperparams: PyTree
    inner_opt_state: PyTree
    outer_opt_state: PyTree
    step: jax.Array
    metadata: dict[str, Any]

    def __init__(
        self,
        params: PyTree,
        hyperparams: PyTree,
        inner_opt_state: PyTree = None,
        outer_opt_state: PyTree = None,
        step: Any = 0,
        metadata: dict[str, Any] | None = None,
    ):
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
        if isinstance(step, int):
            step = jnp.asarray(step, dtype=jnp.int32)
        values = (params, hyperparams, inner_opt_state, outer_opt_state, step, dict(metadata))
        for name, value in zip(_FIELDS, values, strict=True):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"BilevelState is immutable; use state.update({name}=...) to get a new state"
        )

    def __delattr__(self, name: str) -> None:
        raise AttributeError("BilevelState is immutable")

    def update(self, **changes: Any) -> BilevelState:
        """Return a new state with the given fields replaced; ``self`` is unchanged.

        A field given as ``None`` is set to ``None`` on purpose (only fields named in
        ``changes`` are touched). ``params`` and ``hyperparams`` must keep their pytree
        structure and leaf shapes; anything else is a ``ValueError`` raised here.

        Args:
          **changes: new values for any of ``params``, ``hyperparams``, ``inner_opt_state``,
            ``outer_opt_state``, ``step``, ``metadata``.

        Returns:
          A new :class:`BilevelState`.

        Example:
          >>> import jax.numpy as jnp
          >>> from gradhpo import BilevelState
          >>> s = BilevelState(jnp.zeros(2), jnp.ones(2), outer_opt_state=())
          >>> s.update(outer_opt_state=None).outer_opt_state is None
          True
        """
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise TypeError(
                f"unknown BilevelState field(s) {sorted(unknown)}; fields are {list(_FIELDS)}"
            )
        for name in _STRUCTURED:
            if name in changes:
                old, new = getattr(self, name), changes[name]
                if old is not None and new is not None:
                    check_matches(name, old, new)
        values = {name: getattr(self, name) for name in _FIELDS}
        values.update(changes)
        return BilevelState(**values)

    replace = update

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in _FIELDS)
        return f"BilevelState({inner})"

    # -- pickling and copying (the fields are read-only, so the defaults cannot set them) --

    def __reduce__(self):
        return _rebuild, tuple(getattr(self, name) for name in _FIELDS)

    def __copy__(self) -> BilevelState:
        return _rebuild(*(getattr(self, name) for name in _FIELDS))

    def __deepcopy__(self, memo: dict) -> BilevelState:
        return _rebuild(*(copy.deepcopy(getattr(self, name), memo) for name in _FIELDS))

    # -- pytree protocol -------------------------------------------------------------------

    def _tree_flatten_with_keys(self):
        children = tuple((jax.tree_util.GetAttrKey(name), getattr(self, name)) for name in _FIELDS)
        return children, None

    @classmethod
    def _tree_unflatten(cls, aux: None, children: tuple) -> BilevelState:
        # Bypasses __init__: JAX may rebuild states with non-array placeholders as leaves.
        obj = object.__new__(cls)
        for name, value in zip(_FIELDS, children, strict=True):
            object.__setattr__(obj, name, value)
        return obj


def check_single(state: Any, population_remedy: str, name: str = "state") -> None:
    """``state`` is one :class:`BilevelState` (not a run's result, not a population).

    Args:
      state: the value given.
      population_remedy: what to do instead with a population (a leading axis on every
        leaf), for the message.
      name: the argument's name.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo.core.state import BilevelState, check_single
      >>> s = BilevelState(jnp.zeros(2), jnp.ones(2))
      >>> check_single(s, "use run_population")
      >>> pop = jax.tree.map(lambda x: jnp.stack([x, x]), s)
      >>> check_single(pop, "use run_population")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: state carries a leading population axis (state.step has shape (2,)): ...
    """
    if not isinstance(state, BilevelState):
        hint = " (a run's result: pass result.state)" if hasattr(state, "history") else ""
        raise TypeError(f"{name} must be a BilevelState, got {type(state).__name__}{hint}")
    if jnp.ndim(state.step) != 0:
        raise ValueError(
            f"{name} carries a leading population axis ({name}.step has shape "
            f"{jnp.shape(state.step)}): {population_remedy}"
        )


def _rebuild(*fields: Any) -> BilevelState:
    """A state from its six fields as stored (what unpickling and copying call)."""
    return BilevelState._tree_unflatten(None, fields)


jax.tree_util.register_pytree_with_keys(
    BilevelState,
    BilevelState._tree_flatten_with_keys,
    BilevelState._tree_unflatten,
    flatten_func=lambda s: (tuple(getattr(s, n) for n in _FIELDS), None),
)
