"""``BilevelOptimizer``: the interface of every algorithm and the machinery they share.

An algorithm supplies one method, :meth:`BilevelOptimizer._estimate`, which takes an inner
step and returns the hypergradient it would apply. Everything else is written once here:
building Φ (:class:`~gradhpo.core.inner.InnerStep`), the outer update (plain gradient
descent with a traced ``lr_hyper``, or an optax ``outer_optimizer``), the non-finite guards
and their counters, the per-step metrics, and input validation.
"""

from __future__ import annotations

import abc
import warnings
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradhpo.core.inner import InnerStep, check_matches
from gradhpo.core.state import BilevelState
from gradhpo.core.types import Batch, InnerOptimizer, LossFn, PyTree, UpdateFn
from gradhpo.utils.tree import all_finite, tree_norm, tree_select

#: Metadata keys written by every optimizer's ``step``.
METRIC_KEYS = ("train_loss", "val_loss", "hypergrad_norm")
#: Counters of updates skipped by the non-finite guards.
COUNTER_KEYS = ("skipped_hyper_updates", "skipped_inner_updates")


class Estimate(NamedTuple):
    """What an algorithm's estimator hands to the shared update.

    Attributes:
      hypergrad: the hypergradient to apply (same pytree as the hyperparameters).
      params: the inner weights after the step(s).
      inner_opt_state: the inner optimizer state after the step(s).
      train_loss: the training loss of the (last) inner step, before it.
      val_loss: the validation loss at the new weights.
      metadata: algorithm-specific metadata values to store (keys created by ``init``).
      num_steps: how many inner steps were taken (``state.step`` advances by this).
    """

    hypergrad: PyTree
    params: PyTree
    inner_opt_state: PyTree
    train_loss: jax.Array
    val_loss: jax.Array
    metadata: dict[str, Any] | None = None
    num_steps: int = 1


class _ImmutableAfterInit(abc.ABCMeta):
    """Metaclass that freezes an instance once its ``__init__`` chain has finished."""

    def __call__(cls, *args, **kwargs):
        obj = super().__call__(*args, **kwargs)
        object.__setattr__(obj, "_frozen", True)
        return obj


def _float_tree(name: str, tree: PyTree) -> PyTree:
    """Convert leaves to arrays and require floating dtypes (they are differentiated)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} must be a pytree with at least one array leaf, got {tree!r}")
    # Strong dtypes: a weak-typed leaf would change type after the first update and recompile.
    tree = jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} must be a floating-point array (it is "
                f"differentiated), got dtype {leaf.dtype}"
            )
    return tree


def _metric_dtype(params: PyTree):
    return jnp.result_type(*jax.tree.leaves(params))


class BilevelOptimizer(metaclass=_ImmutableAfterInit):
    """Base class of every gradhpo algorithm: ``init`` / ``step`` / ``compute_hypergradient``.

    Args:
      inner_optimizer: the inner optimizer, an ``optax.GradientTransformation`` or a function
        ``hyperparams -> GradientTransformation`` (to tune its learning rate, momentum, ...).
      outer_optimizer: an optional ``optax.GradientTransformation`` that updates λ from the
        hypergradient. Without it, ``step`` does plain gradient descent with ``lr_hyper``.
      update_fn: instead of ``inner_optimizer``, a custom inner step
        ``update_fn(params, hyperparams, batch) -> new_params``.

    Loss functions have the signature ``loss(params, hyperparams, batch) -> scalar``. They are
    static arguments of the jitted ``step``, hashed by identity: define them once, outside
    the training loop, or every call compiles anew.

    Optimizers are immutable after construction: assigning an attribute raises, because a
    compiled ``step`` would silently keep the old value.
    """

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
        self._warned: set[str] = set()

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
          (0, ['hypergrad_norm', 'skipped_hyper_updates', 'skipped_inner_updates'])
        """
        params = _float_tree("params", params)
        hyperparams = _float_tree("hyperparams", hyperparams)
        dtype = _metric_dtype(params)
        metadata = {key: jnp.full((), jnp.nan, dtype) for key in METRIC_KEYS}
        metadata.update({key: jnp.zeros((), jnp.int32) for key in COUNTER_KEYS})
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

    # -- the public step ------------------------------------------------------------------

    @partial(jax.jit, static_argnums=(0, 4, 5))
    def step(
        self,
        state: BilevelState,
        train_batch: Batch,
        val_batch: Batch,
        train_loss_fn: LossFn,
        val_loss_fn: LossFn,
        lr_hyper: float | jax.Array | None,
    ) -> BilevelState:
        """One inner step of the weights and one hyper-update of λ.

        Jitted with ``self``, ``train_loss_fn`` and ``val_loss_fn`` static; ``lr_hyper`` is
        traced, so a new value (a decaying schedule) never recompiles.

        Args:
          state: the current state (from :meth:`init` or a previous ``step``).
          train_batch: the batch ``D_t`` of the inner step.
          val_batch: the validation batch.
          train_loss_fn: ``L_train(params, hyperparams, batch) -> scalar``.
          val_loss_fn: ``L_val(params, hyperparams, batch) -> scalar``.
          lr_hyper: step size of gradient descent on λ; must be ``None`` when the optimizer
            has an ``outer_optimizer`` (which then makes the update).

        Returns:
          The new state: weights and λ updated, ``step`` + 1, metrics in ``metadata``. A
          non-finite hypergradient (or inner update) is skipped and counted in
          ``metadata["skipped_hyper_updates"]`` (``"skipped_inner_updates"``).

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
        self._check_state(state)
        estimate = self._estimate(state, train_batch, val_batch, train_loss_fn, val_loss_fn)
        return self._apply(state, estimate, lr_hyper)

    @partial(jax.jit, static_argnums=(0, 4, 5))
    def compute_hypergradient(
        self, state: BilevelState, train_batch, val_batch, train_loss_fn, val_loss_fn
    ) -> PyTree:
        """The hypergradient that ``step`` would apply from ``state`` with the same batches.

        Args:
          state, train_batch, val_batch, train_loss_fn, val_loss_fn: as for :meth:`step`.

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
        self._check_state(state)
        return self._estimate(state, train_batch, val_batch, train_loss_fn, val_loss_fn).hypergrad

    @abc.abstractmethod
    def _estimate(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn) -> Estimate:
        """Take the inner step(s) and return the hypergradient ``step`` applies."""

    # -- hooks used by the training loops (gradhpo.training) --------------------------------

    #: Inner steps one call of ``step`` takes (GreedyOptimizer: ``unroll_steps``).
    steps_per_call: int = 1
    #: The default episode length in ``step`` calls (HyperDistill: its ``T``), or None.
    default_episode_length: int | None = None
    #: Run :meth:`episode_setup` at episodes 0, P, 2P, ... (HyperDistill: θ estimation).
    episode_setup_period: int | None = None

    @partial(jax.jit, static_argnums=0)
    def new_episode(self, state: BilevelState, params: PyTree | None = None) -> BilevelState:
        """Start an episode: weights ``φ`` and a fresh inner optimizer state (jitted).

        λ, the outer optimizer state, metadata and the global ``state.step`` carry over.

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
          >>> state.params
          Array([1., 1.], dtype=float32)
        """
        if params is None:
            params = state.params
        check_matches("params", state.params, params)
        params = jax.tree.map(lambda p, old: jnp.asarray(p, old.dtype), params, state.params)
        return state.update(
            params=params, inner_opt_state=self.inner.init(params, state.hyperparams)
        )

    def begin_window(self, state: BilevelState) -> BilevelState:
        """Start a new estimation window with the weights carrying on (default: no change).

        HyperDistill restarts its step index, ``S_t`` and EMA point here, so that its horizon
        stays T in a long run without weight restarts. Traceable.

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> opt = gradhpo.FOOptimizer(inner_optimizer=optax.sgd(0.1))
          >>> state = opt.init(jnp.zeros(2), jnp.zeros(2))
          >>> opt.begin_window(state) is state
          True
        """
        return state

    @partial(jax.jit, static_argnums=(0, 3))
    def inner_step(
        self, state: BilevelState, train_batch: Batch, train_loss_fn: LossFn
    ) -> BilevelState:
        """One inner step Φ with λ left as it is: no hypergradient, no hyper-update (jitted).

        Used between hyper-updates when they are made only every k inner steps. The
        non-finite guard applies; ``metadata["train_loss"]`` is updated, the validation
        metrics keep their last values.

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
        new = self.inner(
            state.params, state.inner_opt_state, state.hyperparams, train_batch, train_loss_fn
        )
        ok = all_finite((new.params, new.inner_opt_state))
        metadata = dict(state.metadata)
        metadata["train_loss"] = jnp.asarray(new.train_loss, metadata["train_loss"].dtype)
        metadata["skipped_inner_updates"] = metadata["skipped_inner_updates"] + (~ok)
        return state.update(
            params=tree_select(ok, new.params, state.params),
            inner_opt_state=tree_select(ok, new.inner_opt_state, state.inner_opt_state),
            step=(state.step + 1).astype(jnp.int32),
            metadata=metadata,
        )

    def run(self, state: BilevelState, train_data, val_data, train_loss_fn, val_loss_fn, **options):
        """Train for whole episodes: ``gradhpo.training.run(self, state, ...)``.

        Same arguments and options (``num_episodes``, ``episode_length``, ``lr_hyper``,
        ``hyper_update_every``, ``lr_reptile``, ``key``, ``callback``, ``progress``) for every
        algorithm; see :func:`gradhpo.training.run`.

        Returns:
          A :class:`gradhpo.training.RunResult`.

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> def val(w, lam, b):
          ...     return jnp.sum((w - b) ** 2)
          >>> def train(w, lam, b):
          ...     return val(w, lam, b) + jnp.sum(jnp.exp(lam) * w**2)
          >>> opt = gradhpo.OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
          >>> out = opt.run(opt.init(jnp.zeros(2), jnp.zeros(2)), jnp.ones(2), jnp.ones(2),
          ...               train, val, episode_length=50, lr_hyper=0.5, progress=False)
          >>> int(out.state.step)
          50
        """
        from gradhpo.training.loop import run

        return run(self, state, train_data, val_data, train_loss_fn, val_loss_fn, **options)

    def run_step(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn, lr_hyper):
        """``step`` with the uniform signature the training loops use (see GreedyOptimizer)."""
        return self.step(state, train_batch, val_batch, train_loss_fn, val_loss_fn, lr_hyper)

    def episode_setup(self, state, train_batches, val_batch, train_loss_fn, val_loss_fn):
        """Work done at the start of every ``episode_setup_period``-th episode (default: none).

        ``train_batches`` holds ``default_episode_length`` batches stacked along a leading
        axis. HyperDistill re-estimates θ here (Algorithm 3, line 1).
        """
        return state

    # -- shared machinery -----------------------------------------------------------------

    def _check_state(self, state: BilevelState) -> None:
        """Trace-time validation that ``state`` belongs to this optimizer."""
        if not isinstance(state, BilevelState):
            raise TypeError(f"state must be a BilevelState, got {type(state).__name__}")
        expected = self.init_metadata_keys(state.params, state.hyperparams)
        missing = expected - set(state.metadata)
        if missing:
            raise ValueError(
                f"state.metadata lacks {sorted(missing)}: create the state with this "
                f"optimizer's init ({type(self).__name__}.init)"
            )
        expected_inner = jax.eval_shape(self.inner.init, state.params, state.hyperparams)
        if jax.tree.structure(expected_inner) != jax.tree.structure(state.inner_opt_state):
            raise ValueError(
                "state.inner_opt_state does not match this optimizer's inner optimizer: create "
                f"the state with {type(self).__name__}.init"
            )

    def init_metadata_keys(self, params: PyTree, hyperparams: PyTree) -> set[str]:
        """Every metadata key this optimizer's ``init`` creates."""
        shapes = jax.eval_shape(self._init_metadata, params, hyperparams)
        return set(METRIC_KEYS) | set(COUNTER_KEYS) | set(shapes)

    def _outer_update(
        self, state: BilevelState, hypergrad: PyTree, lr_hyper: Any
    ) -> tuple[PyTree, PyTree]:
        """λ and outer optimizer state after one update with ``hypergrad``."""
        if self.outer_optimizer is None:
            if lr_hyper is None:
                raise ValueError(
                    "lr_hyper is required (a float or scalar array, the step size of gradient "
                    "descent on the hyperparameters) when the optimizer has no outer_optimizer"
                )
            if jnp.shape(lr_hyper) != ():
                raise ValueError(f"lr_hyper must be a scalar, got shape {jnp.shape(lr_hyper)}")
            new_hyper = jax.tree.map(
                lambda h, g: (h - lr_hyper * g).astype(h.dtype), state.hyperparams, hypergrad
            )
            return new_hyper, state.outer_opt_state
        if lr_hyper is not None:
            raise ValueError(
                "lr_hyper must be None when the optimizer has an outer_optimizer (its own "
                "learning rate or optax schedule sets the step size); got a value"
            )
        updates, outer_state = self.outer_optimizer.update(
            hypergrad, state.outer_opt_state, state.hyperparams
        )
        return optax.apply_updates(state.hyperparams, updates), outer_state

    def _apply(self, state: BilevelState, estimate: Estimate, lr_hyper: Any) -> BilevelState:
        """Apply an estimate: guarded inner and outer updates, counters, metrics, step."""
        check_matches("the hypergradient", state.hyperparams, estimate.hypergrad)
        check_matches("the new params", state.params, estimate.params)
        inner_ok = all_finite((estimate.params, estimate.inner_opt_state))
        params = tree_select(inner_ok, estimate.params, state.params)
        inner_state = tree_select(inner_ok, estimate.inner_opt_state, state.inner_opt_state)

        new_hyper, new_outer = self._outer_update(state, estimate.hypergrad, lr_hyper)
        hyper_ok = all_finite(estimate.hypergrad) & all_finite(new_hyper)
        hyperparams = tree_select(hyper_ok, new_hyper, state.hyperparams)
        outer_state = tree_select(hyper_ok, new_outer, state.outer_opt_state)

        metadata = dict(state.metadata)
        for key, value in (estimate.metadata or {}).items():
            old = metadata[key]
            metadata[key] = jax.tree.map(lambda o, v: jnp.asarray(v, o.dtype), old, value)
        metrics = {
            "train_loss": estimate.train_loss,
            "val_loss": estimate.val_loss,
            "hypergrad_norm": tree_norm(estimate.hypergrad),
        }
        for key, value in metrics.items():
            metadata[key] = jnp.asarray(value, metadata[key].dtype)
        metadata["skipped_hyper_updates"] = metadata["skipped_hyper_updates"] + (~hyper_ok)
        metadata["skipped_inner_updates"] = metadata["skipped_inner_updates"] + (~inner_ok)
        return BilevelState(
            params=params,
            hyperparams=hyperparams,
            inner_opt_state=inner_state,
            outer_opt_state=outer_state,
            step=(state.step + estimate.num_steps).astype(jnp.int32),
            metadata=metadata,
        )

    def _warn_once(self, key: str, message: str) -> None:
        """Emit ``message`` as a warning the first time ``key`` is seen by this optimizer."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)
