"""The seam every estimator and loop meets at: one window of inner steps, one hyper-update.

An estimator implements one method, ``estimate(state, window, val_batch, tl, vl)``: the k
inner steps of the window with λ fixed and the hypergradient at its end, as an
:class:`Estimate`. Everything else is written once here: building Φ
(:class:`~gradhpo.core.inner.InnerStep`), :meth:`BilevelOptimizer.apply` (the guarded
inner and outer updates, counters, metrics), input validation, and the two families'
``step`` signatures:

* :class:`OnlineOptimizer` (FO, One-Step, T1-T2, HyperDistill): ``step(..., lr_hyper)`` is
  one inner step and one hyper-update; a window of k steps is k - 1 guarded
  :meth:`~OnlineOptimizer.inner_step` calls and then the estimator's own last step;
* :class:`WindowOptimizer` (Greedy, exact reverse mode): ``step(...)`` without
  ``lr_hyper`` covers the optimizer's ``unroll_steps`` in one compiled scan.

``step`` and ``compute_hypergradient`` are two views of one ``estimate``, so the
hypergradient ``compute_hypergradient`` returns is the one ``step`` applies.
"""

from __future__ import annotations

import abc
import inspect
import os
import sys
import warnings
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradhpo.core._checks import lr_hyper_rule, positive_int
from gradhpo.core.batches import Stacked, as_window
from gradhpo.core.inner import InnerStep, check_matches
from gradhpo.core.state import BilevelState, check_single
from gradhpo.core.types import Batch, InnerOptimizer, LossFn, PyTree, UpdateFn
from gradhpo.utils.dependence import leaves_used
from gradhpo.utils.tree import all_finite, tree_norm, tree_select

#: Metadata keys written by every optimizer's ``step``.
METRIC_KEYS = ("train_loss", "val_loss", "hypergrad_norm")
#: Counters of the non-finite guards: hyper-updates skipped (nothing of the step committed),
#: skipped steps whose new weights or inner state were non-finite (and skipped
#: ``inner_step`` calls), and hyper-updates skipped in a row since the last accepted one.
COUNTER_KEYS = ("skipped_hyper_updates", "skipped_inner_updates", "consecutive_skips")
#: Hyper-updates skipped in a row (0 after an accepted one): a stalled run keeps counting.
STALL_KEY = "consecutive_skips"
#: Inner steps accepted since the episode began (``new_episode`` sets it to 0).
EPISODE_KEY = "episode_step"
#: The safeguard's limits (``inf``: off) and its counter of the hyper-updates it skipped
#: (see :meth:`BilevelOptimizer.with_safeguard`).
SAFEGUARD_KEYS = ("max_hypergrad_norm", "max_loss")
SAFEGUARD_COUNTER = "safeguard_skips"

# Warnings already given, per optimizer (the optimizers themselves are never mutated).
_WARNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The loss functions' code objects seen per optimizer, with the last function of each.
_LOSS_CODES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Estimate(NamedTuple):
    """What an estimator hands to :meth:`BilevelOptimizer.apply`.

    Attributes:
      hypergrad: the hypergradient to apply (same pytree as the hyperparameters).
      params: the inner weights at the end of the window.
      inner_opt_state: the inner optimizer state at the end of the window.
      train_loss: the training loss of the window's last inner step, before it.
      val_loss: the validation loss at the new weights.
      metadata: algorithm-specific metadata values to store (keys created by ``init``);
        written only where the inner update is accepted.
      num_steps: the inner steps the estimate covers after ``origin`` (``state.step``
        advances by this).
      origin: the state the covered steps start from, when the estimator already took
        (guarded) inner steps before them; ``None`` means the state given to ``apply``.
        A non-finite update reverts to it.
    """

    hypergrad: PyTree
    params: PyTree
    inner_opt_state: PyTree
    train_loss: jax.Array
    val_loss: jax.Array
    metadata: dict[str, Any] | None = None
    num_steps: int = 1
    origin: BilevelState | None = None


class Refit(NamedTuple):
    """A declarative record of episodic work that needs fresh data (HyperDistill's θ).

    The training loops read it: at episodes 0, ``every``, 2·``every``, … (after the
    episode's restart), they draw ``num_batches`` training batches and one validation
    batch and replace the state with ``fn(state, train_batches, val_batch, tl, vl)``.
    The optimizer never reaches into the loop.

    Attributes:
      every: the period in episodes (≥ 1).
      num_batches: how many training batches ``fn`` takes (stacked along a leading axis).
      fn: ``fn(state, train_batches, val_batch, train_loss_fn, val_loss_fn) -> state``,
        traceable.
      failures: the metadata key of a counter ``fn`` increments when the refit fails and
        keeps the old values (the loops warn when it grows), or ``None``.
    """

    every: int
    num_batches: int
    fn: Callable[..., BilevelState]
    failures: str | None = None


class _ImmutableAfterInit(abc.ABCMeta):
    """Metaclass that freezes an instance once its ``__init__`` chain has finished.

    It also gives each class the signature of its ``__init__`` (``inspect.signature``,
    ``help`` and IDEs would otherwise see this metaclass's ``(*args, **kwargs)``).
    """

    def __init__(cls, name, bases, namespace, **kwargs):
        super().__init__(name, bases, namespace, **kwargs)
        init = inspect.signature(cls.__init__)
        parameters = list(init.parameters.values())[1:]  # without self
        cls.__signature__ = init.replace(
            parameters=parameters, return_annotation=inspect.Signature.empty
        )

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        object.__setattr__(obj, "_frozen", True)
        return obj


def _setting(value: Any) -> str:
    """A short text for a setting in an optimizer's repr."""
    if isinstance(value, optax.GradientTransformation):
        return "<optax transformation>"
    if callable(value):
        return getattr(value, "__qualname__", repr(value))
    return repr(value)


def _is_default(value: Any, default: Any) -> bool:
    if default is inspect.Parameter.empty:
        return False
    try:
        return bool(value == default) and type(value) is type(default)
    except Exception:  # arrays and other values without a plain truth value
        return False


_ARRAY_LIKE = (jax.Array, np.ndarray, np.generic, int, float)

# Where a warning is attributed: the first frame outside gradhpo and JAX (the user's call).
_INTERNAL = (
    os.path.dirname(os.path.abspath(jax.__file__)) + os.sep,
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
)


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside gradhpo and JAX, for ``warnings.warn``."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def _float_tree(name: str, tree: PyTree) -> PyTree:
    """Convert leaves to arrays and require floating dtypes (they are differentiated)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} must be a pytree with at least one array leaf, got {tree!r}")
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not isinstance(leaf, _ARRAY_LIKE) and not hasattr(leaf, "__jax_array__"):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not an array: "
                f"{name} must be a pytree of float arrays. For a model object holding "
                "functions or other state, split out its arrays first: with equinox, "
                "params, static = eqx.partition(model, eqx.is_inexact_array) (and "
                "eqx.combine(params, static) inside the losses); with flax nnx, "
                "graphdef, params = nnx.split(model) (and nnx.merge(graphdef, params))"
            )
    # Strong dtypes: a weak-typed leaf would change type after the first update and recompile.
    tree = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} must be a floating-point array (it is "
                f"differentiated), got dtype {leaf.dtype}"
            )
    return tree


def _check_like(name: str, expected: PyTree, got: PyTree, made_by: str) -> None:
    """``got`` has the structure, shapes and dtypes of ``expected`` (shape structs)."""
    if jax.tree.structure(expected) != jax.tree.structure(got):
        raise ValueError(
            f"{name} does not match this optimizer (pytree structure "
            f"{jax.tree.structure(got)}, expected {jax.tree.structure(expected)}): {made_by}"
        )
    for (path, e), g in zip(
        jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got), strict=True
    ):
        if jnp.shape(g) != e.shape or jnp.result_type(g) != e.dtype:
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} is {jnp.result_type(g)}{list(jnp.shape(g))}"
                f", expected {e.dtype}{list(e.shape)}: {made_by}"
            )


def _cast_like(old: PyTree, new: PyTree) -> PyTree:
    return jax.tree.map(lambda o, v: jnp.asarray(v, jnp.result_type(o)), old, new)


def _cast_metadata(metadata: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The new values of an algorithm's metadata keys, in the dtypes the state holds."""
    return {key: _cast_like(metadata[key], value) for key, value in new.items()}


def _val_of_last_step(val_batch: Batch | Stacked) -> Batch:
    return val_batch.last() if isinstance(val_batch, Stacked) else val_batch


class BilevelOptimizer(metaclass=_ImmutableAfterInit):
    """Base class of every gradhpo algorithm: ``init`` / ``estimate`` / ``apply``.

    Args:
      inner_optimizer: the inner optimizer, an ``optax.GradientTransformation`` or a function
        ``hyperparams -> GradientTransformation`` (to tune its learning rate, momentum, ...).
      outer_optimizer: an optional ``optax.GradientTransformation`` that updates λ from the
        hypergradient. Without it, the update is plain gradient descent with ``lr_hyper``.
      update_fn: instead of ``inner_optimizer``, a custom inner step
        ``update_fn(params, hyperparams, batch) -> new_params``.

    Loss functions have the signature ``loss(params, hyperparams, batch) -> scalar``. They are
    static arguments of the jitted ``step``, hashed by identity: define them once, outside
    the training loop, or every call compiles anew (a warning, once, says so).

    Optimizers are immutable after construction: assigning an attribute raises, because a
    compiled ``step`` would silently keep the old value.
    """

    #: Episodic work the training loops run (HyperDistill: θ every ``estimation_period``).
    refit: Refit | None = None

    def __init__(
        self,
        inner_optimizer: InnerOptimizer | None = None,
        outer_optimizer: optax.GradientTransformation | None = None,
        update_fn: UpdateFn | None = None,
    ):
        if outer_optimizer is not None and not isinstance(
            outer_optimizer, optax.GradientTransformation
        ):
            raise TypeError(
                "outer_optimizer must be an optax GradientTransformation or None, got "
                f"{type(outer_optimizer).__name__}"
            )
        self.inner = InnerStep(inner_optimizer, update_fn)
        self.inner_optimizer = inner_optimizer
        self.update_fn = update_fn
        self.outer_optimizer = outer_optimizer

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(
                f"{type(self).__name__} is immutable after construction: it is a static jit "
                f"argument, so compiled steps would silently keep the old {name!r}. Build a "
                "new optimizer instead."
            )
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable after construction")

    def __repr__(self) -> str:
        """The class and every setting that differs from its default.

        Example:
          >>> import optax, gradhpo
          >>> gradhpo.OnlineHypergradientOptimizer(optax.sgd(0.1), gamma=0.9, T=5)
          OnlineHypergradientOptimizer(inner_optimizer=<optax transformation>, gamma=0.9, T=5)
        """
        parts = []
        for name, parameter in type(self).__signature__.parameters.items():
            if not hasattr(self, name) or name.startswith("_"):
                continue  # folded into another setting (checkpoint_every into checkpoint)
            value = getattr(self, name)
            if not _is_default(value, parameter.default):
                parts.append(f"{name}={_setting(value)}")
        return f"{type(self).__name__}({', '.join(parts)})"

    # -- initialisation -------------------------------------------------------------------

    def init(self, params: PyTree, hyperparams: PyTree) -> BilevelState:
        """Create the state: inner and outer optimizer states, step 0, every metadata key.

        Args:
          params: initial inner weights ``w_0`` (pytree of float arrays).
          hyperparams: initial hyperparameters ``λ_0`` (pytree of float arrays).

        Returns:
          A :class:`~gradhpo.core.state.BilevelState`.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from gradhpo import OneStepOptimizer
          >>> opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
          >>> state = opt.init(jnp.zeros(3), jnp.ones(3))
          >>> int(state.step), sorted(state.metadata)[:3]
          (0, ['consecutive_skips', 'episode_step', 'hypergrad_norm'])
        """
        params = _float_tree("params", params)
        hyperparams = _float_tree("hyperparams", hyperparams)
        dtype = jnp.result_type(*jax.tree.leaves(params))
        metadata = {key: jnp.full((), jnp.nan, dtype) for key in METRIC_KEYS}
        metadata.update({key: jnp.full((), jnp.inf, dtype) for key in SAFEGUARD_KEYS})
        counters = (*COUNTER_KEYS, SAFEGUARD_COUNTER, EPISODE_KEY)
        metadata.update({key: jnp.zeros((), jnp.int32) for key in counters})
        metadata.update(self._init_metadata(params, hyperparams))
        outer_state = None
        if self.outer_optimizer is not None:
            outer_state = self.outer_optimizer.init(hyperparams)
        return BilevelState(
            params=params,
            hyperparams=hyperparams,
            inner_opt_state=self.inner.init(params, hyperparams),
            outer_opt_state=outer_state,
            step=jnp.zeros((), jnp.int32),
            metadata=metadata,
        )

    def _init_metadata(self, params: PyTree, hyperparams: PyTree) -> dict[str, Any]:
        """Algorithm-specific metadata entries (every key ``step`` will write)."""
        return {}

    @partial(jax.jit, static_argnums=0)
    def new_episode(self, state: BilevelState, params: PyTree | None = None) -> BilevelState:
        """Start an episode: weights ``φ``, a fresh inner optimizer state, ``episode_step`` 0.

        λ, the outer optimizer state, the other metadata and the global ``state.step``
        carry over (jitted).

        Args:
          state: a state of this optimizer.
          params: the episode's initial weights ``w_0 = φ`` (for instance the Reptile
            meta-initialisation); default: continue from ``state.params``.

        Returns:
          A new :class:`~gradhpo.core.state.BilevelState`.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from gradhpo import OneStepOptimizer
          >>> opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1, momentum=0.9))
          >>> state = opt.new_episode(opt.init(jnp.zeros(2), jnp.zeros(2)), jnp.ones(2))
          >>> state.params, int(state.metadata["episode_step"])
          (Array([1., 1.], dtype=float32), 0)
        """
        if params is None:
            params = state.params
        check_matches("params", state.params, params)
        params = _cast_like(state.params, params)
        metadata = {**state.metadata, EPISODE_KEY: jnp.zeros((), jnp.int32)}
        return state.update(
            params=params,
            inner_opt_state=self.inner.init(params, state.hyperparams),
            metadata=metadata,
        )

    @staticmethod
    def with_safeguard(
        state: BilevelState,
        *,
        max_hypergrad_norm: float | None = None,
        max_loss: float | None = None,
    ) -> BilevelState:
        """The state with the safeguard against finite blow-ups set (``None``: that limit off).

        The non-finite guard of :meth:`apply` cannot see a blow-up that stays finite: a
        hypergradient of 1e17 passes it and then dominates an adaptive outer optimizer's
        moment estimates (Adam's second moment) for thousands of steps. With a limit set,
        a hyper-update whose hypergradient norm exceeds ``max_hypergrad_norm``, or whose
        training or validation loss exceeds ``max_loss``, is skipped whole exactly like a
        non-finite one (weights, inner state, λ and outer state kept) and counted in
        ``metadata["safeguard_skips"]`` (and in ``"skipped_hyper_updates"`` and
        ``"consecutive_skips"``, so that a run stuck behind the limit is reported as
        stalled). The limits live in the state (``metadata["max_hypergrad_norm"]``,
        ``metadata["max_loss"]``, ``inf`` when off), so changing them never recompiles and
        they are saved with checkpoints. Off by default.

        Args:
          state: a state of any optimizer.
          max_hypergrad_norm: the largest accepted global norm of the hypergradient, > 0,
            or ``None`` (no limit).
          max_loss: the largest accepted training or validation loss of the step, or
            ``None`` (no limit).

        Returns:
          A new :class:`~gradhpo.core.state.BilevelState`.

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> opt = gradhpo.OneStepOptimizer(optax.sgd(0.1))
          >>> train = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)
          >>> val = lambda w, lam, b: 1e6 * jnp.sum((w - b) ** 2)
          >>> state = opt.with_safeguard(opt.init(jnp.ones(2), jnp.zeros(2)),
          ...                            max_hypergrad_norm=10.0)
          >>> new = opt.step(state, jnp.zeros(2), jnp.zeros(2), train, val, 0.1)
          >>> bool(jnp.all(new.hyperparams == 0)), int(new.metadata["safeguard_skips"])
          (True, 1)
        """
        metadata = dict(state.metadata)
        for name, value in (("max_hypergrad_norm", max_hypergrad_norm), ("max_loss", max_loss)):
            if name not in metadata:
                raise ValueError(f"state.metadata lacks {name!r}: create the state with init")
            if value is None:
                value = jnp.inf
            elif isinstance(value, bool) or not isinstance(value, _ARRAY_LIKE) or jnp.ndim(value):
                raise TypeError(f"{name} must be a number or None, got {value!r}")
            elif name == "max_hypergrad_norm" and not float(value) > 0:
                raise ValueError(f"max_hypergrad_norm must be > 0 (or None), got {value!r}")
            elif jnp.isnan(value):
                raise ValueError(f"{name} must not be NaN")
            metadata[name] = jnp.full_like(metadata[name], value)
        return state.update(metadata=metadata)

    # -- the seam -------------------------------------------------------------------------

    @abc.abstractmethod
    def estimate(
        self,
        state: BilevelState,
        window: Stacked | Batch,
        val_batch: Batch | Stacked,
        train_loss_fn: LossFn,
        val_loss_fn: LossFn,
    ) -> Estimate:
        """The inner steps of ``window`` with λ fixed, and the hypergradient at its end.

        Pure and traceable (call it inside ``jax.jit``). ``window`` is a
        :class:`~gradhpo.Stacked` window (one batch per inner step) or one batch, which is
        a window of one step for an online optimizer and of ``unroll_steps`` steps (the
        batch reused) for a window optimizer.
        """

    def apply(
        self, state: BilevelState, estimate: Estimate, lr_hyper: float | jax.Array | None
    ) -> BilevelState:
        """Apply an :class:`Estimate`: guarded inner and outer updates, counters, metrics.

        The new state is committed whole or not at all: a non-finite value anywhere in the
        new weights, inner optimizer state, hypergradient (or its squared norm), λ, outer
        optimizer state or the algorithm's metadata (HyperDistill's ``w*``, ``D*``, ``S_t``)
        keeps all of them, and the episode counter, as they were. The skip is counted:
        ``"skipped_hyper_updates"`` + 1, ``"consecutive_skips"`` + 1 (reset to 0 by the next
        accepted update), and ``"skipped_inner_updates"`` + 1 where the new weights or
        inner state were the non-finite part. The safeguard (:meth:`with_safeguard`, off by
        default) skips a finite update the same way when the hypergradient's norm or a loss
        exceeds its limit, and counts it in ``"safeguard_skips"`` as well. The metrics
        (``"train_loss"``, ``"val_loss"``, ``"hypergrad_norm"``) are written either way, so a
        skip shows.
        ``state.step`` advances either way (it counts the inner steps attempted).
        Traceable.

        Args:
          state: the state ``estimate`` was computed from.
          estimate: what :meth:`estimate` returned.
          lr_hyper: step size of gradient descent on λ; ``None`` when the optimizer has an
            ``outer_optimizer`` (which then makes the update).

        Returns:
          The new state.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from gradhpo import OneStepOptimizer
          >>> def train(w, lam, b):
          ...     return jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)
          >>> def val(w, lam, b):
          ...     return jnp.sum((w - b) ** 2)
          >>> opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
          >>> state = opt.init(jnp.zeros(2), jnp.zeros(2))
          >>> est = opt.estimate(state, jnp.ones(2), jnp.ones(2), train, val)
          >>> new = opt.apply(state, est, 0.5)
          >>> bool(jnp.all(new.hyperparams == state.hyperparams - 0.5 * est.hypergrad))
          True
        """
        base = state if estimate.origin is None else estimate.origin
        check_matches("the hypergradient", base.hyperparams, estimate.hypergrad)
        check_matches("the new params", base.params, estimate.params)
        new_hyper, new_outer = self._outer_update(base, estimate.hypergrad, lr_hyper)
        hypergrad_norm = tree_norm(estimate.hypergrad)
        algorithm = _cast_metadata(base.metadata, estimate.metadata or {})
        inner_ok = all_finite((estimate.params, estimate.inner_opt_state))
        # All or nothing: λ, the outer state, the weights, the inner state and the
        # algorithm's metadata are committed together. The squared norm of the hypergradient
        # must be representable too, so that no second-moment estimate can overflow.
        ok = inner_ok & all_finite((estimate.hypergrad, hypergrad_norm, new_hyper, new_outer))
        ok = ok & all_finite(algorithm)
        # The safeguard: finite blow-ups past the state's limits (inf: off) are skipped too.
        md = base.metadata
        blown = hypergrad_norm > md["max_hypergrad_norm"]
        losses = jnp.maximum(estimate.train_loss, estimate.val_loss)
        blown = blown | (losses > md["max_loss"])
        guarded = ok & blown
        ok = ok & ~blown
        params = tree_select(ok, estimate.params, base.params)
        inner_state = tree_select(ok, estimate.inner_opt_state, base.inner_opt_state)
        hyperparams = tree_select(ok, new_hyper, base.hyperparams)
        outer_state = tree_select(ok, new_outer, base.outer_opt_state)

        metadata = dict(base.metadata)
        for key, value in algorithm.items():
            metadata[key] = tree_select(ok, value, metadata[key])
        metrics = {
            "train_loss": estimate.train_loss,
            "val_loss": estimate.val_loss,
            "hypergrad_norm": hypergrad_norm,
        }
        for key, value in metrics.items():
            metadata[key] = jnp.asarray(value, metadata[key].dtype)
        metadata["skipped_hyper_updates"] = metadata["skipped_hyper_updates"] + (~ok)
        metadata["skipped_inner_updates"] = metadata["skipped_inner_updates"] + (~inner_ok)
        metadata[SAFEGUARD_COUNTER] = metadata[SAFEGUARD_COUNTER] + guarded
        metadata[STALL_KEY] = jnp.where(ok, 0, metadata[STALL_KEY] + 1).astype(jnp.int32)
        steps = jnp.asarray(estimate.num_steps, jnp.int32)
        metadata[EPISODE_KEY] = metadata[EPISODE_KEY] + jnp.where(ok, steps, 0)
        return BilevelState(
            params=params,
            hyperparams=hyperparams,
            inner_opt_state=inner_state,
            outer_opt_state=outer_state,
            step=(base.step + steps).astype(jnp.int32),
            metadata=metadata,
        )

    @partial(jax.jit, static_argnums=(0, 4, 5))
    def compute_hypergradient(
        self,
        state: BilevelState,
        train_batch: Batch | Stacked,
        val_batch: Batch | Stacked,
        train_loss_fn: LossFn,
        val_loss_fn: LossFn,
    ) -> PyTree:
        """The hypergradient that ``step`` applies from ``state`` with the same batches.

        ``estimate(...).hypergrad``, jitted.

        Args:
          state, train_batch, val_batch, train_loss_fn, val_loss_fn: as for ``step``
            (``train_batch`` may be a :class:`~gradhpo.Stacked` window).

        Returns:
          A pytree shaped like ``state.hyperparams``.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from gradhpo import FOOptimizer
          >>> opt = FOOptimizer(inner_optimizer=optax.sgd(0.1))
          >>> state = opt.init(jnp.ones(2), jnp.ones(2))
          >>> opt.compute_hypergradient(state, None, None,
          ...     lambda w, lam, b: jnp.sum(w**2), lambda w, lam, b: jnp.sum(lam * w))
          Array([0.8, 0.8], dtype=float32)
        """
        self._check_state(state, outer=False)
        return self.estimate(state, train_batch, val_batch, train_loss_fn, val_loss_fn).hypergrad

    # -- shared machinery -----------------------------------------------------------------

    def _step(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn, lr_hyper):
        """``apply(estimate(...))`` after the state check: the body of both families' ``step``."""
        self._check_state(state)
        estimate = self.estimate(state, train_batch, val_batch, train_loss_fn, val_loss_fn)
        return self.apply(state, estimate, lr_hyper)

    def _check_state(self, state: BilevelState, *, outer: bool = True) -> None:
        """Trace-time validation that ``state`` belongs to this optimizer.

        ``outer=False`` leaves the outer optimizer state unchecked (a hypergradient does not
        read it, so a state of another optimizer on the same problem may be compared).
        """
        check_single(
            state,
            "map the call over the members with jax.vmap(opt.step, ...), or use "
            "gradhpo.training.run_population",
        )
        made_by = f"create the state with this optimizer's init ({type(self).__name__}.init)"
        for name in ("params", "hyperparams"):
            for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(state, name)):
                if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
                    raise TypeError(
                        f"state.{name}{jax.tree_util.keystr(path)} must be a floating-point "
                        f"array, got {type(leaf).__name__} of dtype {jnp.result_type(leaf)}"
                    )
        expected = self.init_metadata_keys(state.params, state.hyperparams)
        missing = expected - set(state.metadata)
        if missing:
            raise ValueError(f"state.metadata lacks {sorted(missing)}: {made_by}")
        expected_inner = jax.eval_shape(self.inner.init, state.params, state.hyperparams)
        _check_like("state.inner_opt_state", expected_inner, state.inner_opt_state, made_by)
        if not outer:
            return
        expected_outer = None
        if self.outer_optimizer is not None:
            expected_outer = jax.eval_shape(self.outer_optimizer.init, state.hyperparams)
        _check_like("state.outer_opt_state", expected_outer, state.outer_opt_state, made_by)

    def init_metadata_keys(self, params: PyTree, hyperparams: PyTree) -> set[str]:
        """Every metadata key this optimizer's ``init`` creates."""
        shapes = jax.eval_shape(self._init_metadata, params, hyperparams)
        return {
            *METRIC_KEYS,
            *COUNTER_KEYS,
            *SAFEGUARD_KEYS,
            SAFEGUARD_COUNTER,
            EPISODE_KEY,
            *shapes,
        }

    def _outer_update(
        self, state: BilevelState, hypergrad: PyTree, lr_hyper: Any
    ) -> tuple[PyTree, PyTree]:
        """λ and outer optimizer state after one update with ``hypergrad``."""
        lr_hyper_rule(self.outer_optimizer is not None, lr_hyper)
        if self.outer_optimizer is None:
            new_hyper = jax.tree.map(
                lambda h, g: (h - lr_hyper * g).astype(h.dtype), state.hyperparams, hypergrad
            )
            return new_hyper, state.outer_opt_state
        updates, outer_state = self.outer_optimizer.update(
            hypergrad, state.outer_opt_state, state.hyperparams
        )
        return optax.apply_updates(state.hyperparams, updates), outer_state

    def note_loss_functions(self, train_loss_fn: LossFn, val_loss_fn: LossFn) -> None:
        """Warn, once per argument, when a loss function is a new object with old code.

        The loss functions are static arguments of the compiled programs, hashed by
        identity: a lambda or closure made anew for every call (inside a training loop)
        compiles the program again every time. Called by ``step`` and the training loops.

        Example:
          >>> import warnings, jax.numpy as jnp, optax, gradhpo
          >>> opt = gradhpo.FOOptimizer(optax.sgd(0.1))
          >>> with warnings.catch_warnings(record=True) as caught:
          ...     warnings.simplefilter("always")
          ...     for _ in range(2):
          ...         opt.note_loss_functions(lambda w, l, b: 0.0, len)
          >>> "new function object" in str(caught[0].message)
          True
        """
        seen = _LOSS_CODES.setdefault(self, {})
        for name, fn in (("train_loss_fn", train_loss_fn), ("val_loss_fn", val_loss_fn)):
            code = getattr(fn, "__code__", None)
            if code is None:
                continue
            # A weak reference, not an id: a freed lambda's id is often reused by the next.
            last = seen.get((name, code))
            seen[name, code] = weakref.ref(fn)
            if last is not None and last() is not fn:
                self._warn_once(
                    f"new {name}",
                    f"{name} is a new function object with the code of one given before "
                    f"({getattr(fn, '__qualname__', 'a function')}, defined at "
                    f"{code.co_filename}:{code.co_firstlineno}): loss functions are static "
                    "arguments hashed by identity, so every new object compiles the program "
                    "again. Define the loss functions once, outside the loop, and pass the "
                    "same objects",
                )

    #: Whether the hypergradient differentiates through the inner optimizer's update.
    differentiates_inner_step: bool = True

    def _trace_time_checks(
        self, state: BilevelState, train_batch, val_batch, train_loss_fn, val_loss_fn
    ) -> None:
        """Warnings decided on the traced program, each at most once.

        * An inner optimizer whose update has an infinite derivative at a zero gradient
          (``optax.adam`` without ``eps_root``), for the estimators that differentiate it
          (:meth:`~gradhpo.core.inner.InnerStep.singular_at_zero_gradient`).
        * Per pair of losses, the λ leaves on which neither one inner step Φ (weights and
          inner optimizer state) nor ``L_val`` after it depends: their hypergradient is
          zero under every estimator and they never move — e.g. a learning rate given to
          ``optax.inject_hyperparams`` outside a factory, or a λ entry the losses forgot.
        """
        warned = _WARNED.get(self, set())  # each check is skipped once its warning is out
        if (
            self.differentiates_inner_step
            and "singular-inner" not in warned
            and self.inner.singular_at_zero_gradient(state.params, state.hyperparams)
        ):
            self._warn_once(
                "singular-inner",
                f"{type(self).__name__} differentiates through the inner optimizer's update, "
                "whose derivative is infinite where a gradient entry is exactly zero (optax.adam "
                "and its relatives divide by sqrt(ν), and sqrt'(0) = ∞): the hypergradient is "
                "NaN there (dead ReLUs, unused weights), and the guard then skips every "
                "hyper-update. Pass eps_root, e.g. optax.adam(lr, eps_root=1e-12)",
            )
        key = f"unused-{id(train_loss_fn)}-{id(val_loss_fn)}"
        if key in warned:
            return

        def outputs(lam):  # its own trace: nothing is added to the caller's program
            last = lambda b: b.last() if isinstance(b, Stacked) else b  # noqa: E731
            new = self.inner(
                state.params, state.inner_opt_state, lam, last(train_batch), train_loss_fn
            )
            return new.params, new.inner_opt_state, val_loss_fn(new.params, lam, last(val_batch))

        used = leaves_used(outputs, 0, state.hyperparams)
        paths = jax.tree_util.tree_leaves_with_path(state.hyperparams)
        unused = [
            "hyperparams" + jax.tree_util.keystr(path)
            for (path, _), is_used in zip(paths, used, strict=True)
            if not is_used
        ]
        if unused:
            self._warn_once(
                key,
                f"{type(self).__name__}: neither the inner step nor val_loss_fn depends on "
                f"{', '.join(unused)}, so the hypergradient there is zero and it will not "
                "change. Check that the loss functions (or the inner_optimizer factory) read "
                "it; an optax hyperparameter to be tuned must be built from λ in a factory, "
                "e.g. inner_optimizer=lambda lam: optax.sgd(jnp.exp(lam['log_lr']))",
            )

    def _warn_once(self, key: str, message: str) -> None:
        """Emit ``message`` as a warning the first time ``key`` is seen for this optimizer."""
        seen = _WARNED.setdefault(self, set())
        if key not in seen:
            seen.add(key)
            warnings.warn(message, stacklevel=_caller_level())


class OnlineOptimizer(BilevelOptimizer):
    """An online estimator: λ may be updated after every inner step (FO, One-Step, T1-T2, …).

    A concrete online optimizer implements ``_estimate_step`` (one inner step and its
    hypergradient) and ``_track`` (the algorithm state an inner step advances, e.g.
    HyperDistill's EMA point). A window of k steps is written once, here: k - 1 guarded
    :meth:`inner_step` calls, then the estimator's last step.
    """

    def step(
        self,
        state: BilevelState,
        train_batch: Batch | Stacked,
        val_batch: Batch,
        train_loss_fn: LossFn,
        val_loss_fn: LossFn,
        lr_hyper: float | jax.Array | None,
    ) -> BilevelState:
        """One inner step of the weights and one hyper-update of λ: ``apply(estimate(...))``.

        Jitted with ``self``, ``train_loss_fn`` and ``val_loss_fn`` static; ``lr_hyper`` is
        traced, so a new value (a decaying schedule) never recompiles. A concrete
        ``lr_hyper`` is checked before the call (a finite number >= 0).

        Args:
          state: the current state (from :meth:`init` or a previous ``step``).
          train_batch: the batch ``D_t`` of the inner step (a :class:`~gradhpo.Stacked`
            window of k batches takes k inner steps and one hyper-update).
          val_batch: the validation batch.
          train_loss_fn: ``L_train(params, hyperparams, batch) -> scalar``.
          val_loss_fn: ``L_val(params, hyperparams, batch) -> scalar``.
          lr_hyper: step size of gradient descent on λ; must be ``None`` when the optimizer
            has an ``outer_optimizer`` (which then makes the update).

        Returns:
          The new state: weights and λ updated, ``step`` + 1, metrics in ``metadata``. A
          step with anything non-finite is not committed at all (see :meth:`apply`) and is
          counted in ``metadata["skipped_hyper_updates"]``.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from gradhpo import OneStepOptimizer
          >>> train = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)
          >>> val = lambda w, lam, b: jnp.sum((w - b) ** 2)
          >>> opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
          >>> state = opt.init(jnp.zeros(2), jnp.zeros(2))
          >>> for _ in range(3):
          ...     state = opt.step(state, jnp.ones(2), jnp.ones(2), train, val, 0.5)
          >>> int(state.step), bool(jnp.all(state.hyperparams < 0))
          (3, True)
        """
        lr_hyper_rule(self.outer_optimizer is not None, lr_hyper)
        self.note_loss_functions(train_loss_fn, val_loss_fn)
        return self._jit_step(state, train_batch, val_batch, train_loss_fn, val_loss_fn, lr_hyper)

    @partial(jax.jit, static_argnums=(0, 4, 5))
    def _jit_step(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn, lr_hyper):
        return self._step(state, train_batch, val_batch, train_loss_fn, val_loss_fn, lr_hyper)

    def estimate(self, state, window, val_batch, train_loss_fn, val_loss_fn) -> Estimate:
        """k - 1 guarded :meth:`inner_step` calls, then the estimator's last step.

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> opt = gradhpo.OneStepOptimizer(inner_optimizer=optax.sgd(0.5))
          >>> loss = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)
          >>> est = opt.estimate(opt.init(jnp.zeros(1), jnp.ones(1)),
          ...                    gradhpo.Stacked.repeat(None, 3), None, loss, loss)
          >>> est.params, est.num_steps, int(est.origin.step)
          (Array([0.875], dtype=float32), 1, 2)
        """
        window = as_window(window, 1)
        val_batch = _val_of_last_step(val_batch)
        k, last = window.num_steps, window.last()
        self._trace_time_checks(state, last, val_batch, train_loss_fn, val_loss_fn)
        if k == 1:
            return self._estimate_step(state, last, val_batch, train_loss_fn, val_loss_fn)
        inner = lambda s, b: (self._inner_step(s, b, train_loss_fn), None)  # noqa: E731
        state = window.scan(inner, state, num_steps=k - 1)[0]
        estimate = self._estimate_step(state, last, val_batch, train_loss_fn, val_loss_fn)
        return estimate._replace(origin=state)

    @partial(jax.jit, static_argnums=(0, 3))
    def inner_step(
        self, state: BilevelState, train_batch: Batch, train_loss_fn: LossFn
    ) -> BilevelState:
        """One inner step Φ with λ left as it is: no hypergradient, no hyper-update (jitted).

        The inner steps of a window before its last one. The non-finite guard applies;
        ``metadata["train_loss"]`` is updated, the validation metrics keep their last
        values, and the algorithm's own per-step state (HyperDistill's ``w*_t``) advances.

        Args:
          state: the current state.
          train_batch: the batch of the inner step.
          train_loss_fn: ``L_train(params, hyperparams, batch) -> scalar``.

        Returns:
          The new state, ``step`` + 1.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from gradhpo import OneStepOptimizer
          >>> opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.5))
          >>> state = opt.init(jnp.ones(2), jnp.zeros(2))
          >>> state = opt.inner_step(state, None, lambda w, lam, b: jnp.sum(w**2))
          >>> state.params, int(state.step)
          (Array([0., 0.], dtype=float32), 1)
        """
        self._check_state(state)
        return self._inner_step(state, train_batch, train_loss_fn)

    def _inner_step(self, state: BilevelState, train_batch: Batch, train_loss_fn: LossFn):
        new = self.inner(
            state.params, state.inner_opt_state, state.hyperparams, train_batch, train_loss_fn
        )
        tracked = _cast_metadata(state.metadata, self._track(state, train_batch))
        ok = all_finite((new.params, new.inner_opt_state, tracked))  # all or nothing
        metadata = dict(state.metadata)
        for key, value in tracked.items():
            metadata[key] = tree_select(ok, value, metadata[key])
        metadata["train_loss"] = jnp.asarray(new.train_loss, metadata["train_loss"].dtype)
        metadata["skipped_inner_updates"] = metadata["skipped_inner_updates"] + (~ok)
        metadata[EPISODE_KEY] = metadata[EPISODE_KEY] + ok.astype(jnp.int32)
        return state.update(
            params=tree_select(ok, new.params, state.params),
            inner_opt_state=tree_select(ok, new.inner_opt_state, state.inner_opt_state),
            step=(state.step + 1).astype(jnp.int32),
            metadata=metadata,
        )

    @abc.abstractmethod
    def _estimate_step(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn):
        """One inner step from ``state`` and the hypergradient after it (an ``Estimate``)."""

    @abc.abstractmethod
    def _track(self, state: BilevelState, train_batch: Batch) -> dict[str, Any]:
        """The algorithm metadata an inner step from ``state`` on ``train_batch`` advances."""


class MemorylessOnlineOptimizer(OnlineOptimizer):
    """An online optimizer whose estimate depends on the current step only (FO, One-Step, T1-T2).

    Abstract: its inner steps advance no algorithm state.
    """

    def _track(self, state: BilevelState, train_batch: Batch) -> dict[str, Any]:
        return {}


class WindowOptimizer(BilevelOptimizer):
    """A window estimator: each ``step`` unrolls ``unroll_steps`` inner steps with λ fixed.

    Greedy and exact reverse mode (and every long-horizon estimator) are window
    optimizers: ``step(state, train_batch, val_batch, tl, vl)`` has no ``lr_hyper`` (the
    ``outer_optimizer``, required, sets the hyper step size). A concrete window optimizer
    implements ``_estimate_window`` over a checked window.

    Args:
      inner_optimizer: the inner optimizer, an ``optax.GradientTransformation`` or a function
        ``hyperparams -> GradientTransformation``.
      outer_optimizer: the ``optax.GradientTransformation`` that updates λ; required.
      unroll_steps: the window T ≥ 1 of inner steps per hyper-update.
      update_fn: instead of ``inner_optimizer``, a custom inner step (keyword only).
    """

    def __init__(
        self,
        inner_optimizer: InnerOptimizer | None = None,
        outer_optimizer: optax.GradientTransformation | None = None,
        unroll_steps: int = 1,
        *,
        update_fn: UpdateFn | None = None,
    ):
        if outer_optimizer is None:
            raise ValueError(
                f"{type(self).__name__} needs an outer_optimizer (an optax "
                "GradientTransformation, e.g. optax.adam(1e-2)): its step() has no lr_hyper"
            )
        super().__init__(inner_optimizer, outer_optimizer, update_fn)
        self.unroll_steps = positive_int("unroll_steps", unroll_steps)

    def step(
        self,
        state: BilevelState,
        train_batch: Batch | Stacked,
        val_batch: Batch | Stacked,
        train_loss_fn: LossFn,
        val_loss_fn: LossFn,
        lr_hyper: None = None,
    ) -> BilevelState:
        """``unroll_steps`` inner steps and one outer update of λ: ``apply(estimate(...))``.

        Jitted with ``self``, ``train_loss_fn`` and ``val_loss_fn`` static; one compilation
        serves every later call with same-shaped inputs, whatever the horizon.

        Args:
          state: the current state (from :meth:`init` or a previous ``step``).
          train_batch: one batch reused for every unrolled step, or :class:`~gradhpo.Stacked`
            batches (a leading axis of length ``unroll_steps``, one per step).
          val_batch: the validation batch, likewise single or :class:`~gradhpo.Stacked`.
          train_loss_fn: ``L_train(params, hyperparams, batch) -> scalar``.
          val_loss_fn: ``L_val(params, hyperparams, batch) -> scalar``.
          lr_hyper: must stay ``None``: the ``outer_optimizer`` sets the hyper step size.

        Returns:
          The new state: weights after T inner steps, λ after one ``outer_optimizer``
          update, ``step`` + T, and in ``metadata`` the last step's training loss, the
          validation loss at ``w_T`` and the hypergradient's norm (``"hypergrad_norm"``).

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from gradhpo import GreedyOptimizer, Stacked
          >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam - b) ** 2)
          >>> val = lambda w, lam, b: 0.5 * jnp.sum(w**2)
          >>> opt = GreedyOptimizer(optax.sgd(0.5), optax.sgd(1.0), unroll_steps=3, gamma=1.0)
          >>> state = opt.init(jnp.zeros(1), jnp.ones(1))
          >>> batches = Stacked(jnp.zeros((3, 1)))  # one (here zero) shift per step
          >>> # w_t = 0.5, 0.75, 0.875 and B_t = 0.5, so ĝ = 0.5 (0.5 + 0.75 + 0.875)
          >>> opt.step(state, batches, None, train, val).hyperparams
          Array([-0.0625], dtype=float32)
        """
        if lr_hyper is not None:
            raise ValueError(
                f"{type(self).__name__}.step takes no lr_hyper: its outer_optimizer sets the "
                "hyper step size (an optax learning rate or schedule); drop the argument"
            )
        self.note_loss_functions(train_loss_fn, val_loss_fn)
        return self._jit_step(state, train_batch, val_batch, train_loss_fn, val_loss_fn)

    @partial(jax.jit, static_argnums=(0, 4, 5))
    def _jit_step(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn):
        return self._step(state, train_batch, val_batch, train_loss_fn, val_loss_fn, None)

    def estimate(self, state, window, val_batch, train_loss_fn, val_loss_fn) -> Estimate:
        """The window's checked batches (a plain batch is reused), then the estimator.

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> opt = gradhpo.GreedyOptimizer(optax.sgd(0.1), optax.sgd(0.1), unroll_steps=4)
          >>> loss = lambda w, lam, b: jnp.sum((w - lam) ** 2)
          >>> opt.estimate(opt.init(jnp.zeros(1), jnp.ones(1)), None, None, loss, loss).num_steps
          4
        """
        window = self._checked(window, "train_batch")
        val_window = self._checked(val_batch, "val_batch")
        self._trace_time_checks(state, window, val_window, train_loss_fn, val_loss_fn)
        return self._estimate_window(state, window, val_window, train_loss_fn, val_loss_fn)

    def _checked(self, batch: Batch | Stacked, name: str) -> Stacked:
        if isinstance(batch, Stacked) and batch.num_steps != self.unroll_steps:
            raise ValueError(
                f"{name} is Stacked with a leading axis of length {batch.num_steps}, but "
                f"unroll_steps = {self.unroll_steps}: give one batch per unrolled step, or pass "
                "a single (unwrapped) batch to reuse it for every step"
            )
        return as_window(batch, self.unroll_steps)

    @abc.abstractmethod
    def _estimate_window(
        self,
        state: BilevelState,
        window: Stacked,
        val_window: Stacked,
        train_loss_fn: LossFn,
        val_loss_fn: LossFn,
    ) -> Estimate:
        """The ``unroll_steps`` inner steps of ``window`` and the hypergradient at its end."""
