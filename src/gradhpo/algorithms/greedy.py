"""Generalized Greedy: a γ-discounted sum of one-step hypergradients over an unrolled horizon.

With ``w_t = Φ(w_{t-1}, λ; D_t)`` for ``t = 1..T``, ``α_t = ∇_w L_val(w_t, λ)`` and
``B_t = ∂Φ/∂λ`` at ``(w_{t-1}, λ; D_t)`` (the inner optimizer state held fixed), the Greedy
hypergradient (ICLR 2025 submission, Eq. 6) is::

    ĝ = ∇_λ L_val(w_T, λ) + Σ_{t=1..T} γ^{T-t} α_t B_t,       γ ∈ (0, 1],

computed online, in one ``lax.scan`` over the T unrolled steps::

    G_0 = 0,   G_t = γ G_{t-1} + α_t B_t,   ĝ = g_FO + G_T.

References:
  Anonymous. Generalized greedy gradient-based hyperparameter optimization. ICLR 2025
  submission (OpenReview), Eq. 6 and Proposition 4.1.
  Luketina, Berglund, Greff, Raiko. "Scalable Gradient-Based Tuning of Continuous
  Regularization Hyperparameters." ICML 2016 (the one-step hypergradient it generalizes).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gradhpo.core.base import BilevelOptimizer, Estimate
from gradhpo.core.inner import validation_grads
from gradhpo.core.state import BilevelState
from gradhpo.core.types import Batch, InnerOptimizer, LossFn, PyTree, UpdateFn
from gradhpo.utils.tree import leading_axis_length, stack_batches, tree_add, tree_scale


@jax.tree_util.register_pytree_node_class
class Stacked:
    """Marks a batch argument as one batch per unrolled step (a leading step axis of length T).

    :class:`GreedyOptimizer` reuses an unmarked batch for every unrolled step, whatever its
    shape, so a batch of T examples is never mistaken for T batches. Wrap the batches in
    ``Stacked`` to give step ``t`` its own batch ``D_t`` (or validation batch ``V_t``).

    Args:
      batches: a Python ``list`` of T same-shaped batches (stacked here, as
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

    References:
      Anonymous, generalized greedy HO, ICLR 2025 submission (one batch per unrolled step).
    """

    __slots__ = ("batches",)

    def __init__(self, batches: Sequence[PyTree] | PyTree):
        object.__setattr__(self, "batches", stack_batches(batches))
        _ = self.num_steps  # a leading axis shared by every leaf, checked now

    @property
    def num_steps(self) -> int:
        """The length of the leading step axis (a static int)."""
        return leading_axis_length(self.batches, "Stacked batches")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Stacked is immutable")

    def __repr__(self) -> str:
        return f"Stacked({self.batches!r})"

    def tree_flatten(self):
        return (self.batches,), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple) -> Stacked:
        # Bypasses __init__: JAX rebuilds the marker with tracers or placeholders as leaves.
        obj = object.__new__(cls)
        object.__setattr__(obj, "batches", children[0])
        return obj


def _check_gamma(gamma: Any) -> float:
    if (
        isinstance(gamma, bool)
        or not isinstance(gamma, numbers.Real)
        or not math.isfinite(gamma)
        or not 0.0 < gamma <= 1.0
    ):
        raise ValueError(
            f"gamma must be a number in (0, 1] (use a tiny gamma such as 1e-12 for the "
            f"One-Step limit), got {gamma!r}"
        )
    return float(gamma)


def _check_unroll_steps(unroll_steps: Any) -> int:
    if isinstance(unroll_steps, bool) or not isinstance(unroll_steps, numbers.Integral):
        raise ValueError(f"unroll_steps must be an int >= 1, got {unroll_steps!r}")
    if unroll_steps < 1:
        raise ValueError(f"unroll_steps must be an int >= 1, got {unroll_steps}")
    return int(unroll_steps)


class GreedyOptimizer(BilevelOptimizer):
    """Generalized Greedy: ``ĝ = g_FO + Σ_{t=1..T} γ^{T-t} α_t B_t`` over T unrolled steps.

    Each :meth:`step` takes ``T = unroll_steps`` inner steps ``w_t = Φ(w_{t-1}, λ; D_t)`` in one
    ``lax.scan`` and accumulates, online (Eq. 6),

    ``G_0 = 0``,  ``G_t = γ G_{t-1} + α_t B_t``  with ``α_t = ∇_w L_val(w_t, λ; V_t)``,

    ``B_t = ∂Φ(w_{t-1}, λ; D_t)/∂λ`` (one VJP; the inner optimizer state held fixed, SPEC
    Part 2 item 5), then makes one outer update with ``ĝ = g_FO + G_T``,
    ``g_FO = ∂L_val(w_T, λ; V_T)/∂λ``. Memory is O(P + H) — no trajectory is stored — and the
    compiled program is the same size for every T. ``γ = 1`` weights every step equally; as
    ``γ → 0⁺`` only the last term survives and Greedy becomes One-Step (Proposition 4.1);
    with ``T = 1`` it *is* One-Step for any γ.

    Batches: an ordinary batch is reused for every unrolled step; :class:`Stacked` batches
    give one batch per step (``Stacked(list_of_T_batches)``, or a pytree stacked along a
    leading axis of length T). Either argument may be stacked independently.

    Non-finite values: optax updates are additive (``w + u``), so a non-finite weight at any
    unrolled step stays non-finite through ``w_T``, and ``γ > 0`` carries a non-finite
    ``α_t B_t`` into ``G_T``. The shared guards therefore revert the whole outer step — the
    weights, the inner optimizer state and λ stay as they were — and count one skipped inner
    and one skipped hyper update (``metadata``); ``state.step`` still advances by T.

    Args:
      inner_optimizer: the inner optimizer, an ``optax.GradientTransformation`` or a function
        ``hyperparams -> GradientTransformation`` (to tune its learning rate, momentum, ...).
      outer_optimizer: the ``optax.GradientTransformation`` that updates λ from ``ĝ``;
        required (its learning rate or schedule sets the hyper step size, ``step`` has no
        ``lr_hyper``).
      unroll_steps: the horizon T ≥ 1 of inner steps per outer update.
      gamma: the discount γ ∈ (0, 1] of earlier steps' contributions.
      update_fn: instead of ``inner_optimizer``, a custom inner step
        ``update_fn(params, hyperparams, batch) -> new_params`` (keyword only).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gradhpo import GreedyOptimizer
      >>> train = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)
      >>> val = lambda w, lam, b: jnp.sum((w - b) ** 2)
      >>> opt = GreedyOptimizer(optax.sgd(0.1), optax.sgd(0.5), unroll_steps=5, gamma=0.9)
      >>> state = opt.init(jnp.zeros(2), jnp.zeros(2))
      >>> state = opt.step(state, jnp.ones(2), jnp.ones(2), train, val)
      >>> int(state.step), bool(jnp.all(state.hyperparams < 0))
      (5, True)

    References:
      Anonymous, generalized greedy gradient-based hyperparameter optimization, ICLR 2025
      submission, Eq. 6 and Proposition 4.1. Luketina et al., ICML 2016 (One-Step, T = 1).
    """

    def __init__(
        self,
        inner_optimizer: InnerOptimizer | None = None,
        outer_optimizer: optax.GradientTransformation | None = None,
        unroll_steps: int = 1,
        gamma: float = 0.9,
        *,
        update_fn: UpdateFn | None = None,
    ):
        if outer_optimizer is None:
            raise ValueError(
                "GreedyOptimizer needs an outer_optimizer (an optax GradientTransformation, "
                "e.g. optax.adam(1e-2)): its step() has no lr_hyper"
            )
        super().__init__(inner_optimizer, outer_optimizer, update_fn)
        self.unroll_steps = _check_unroll_steps(unroll_steps)
        self.gamma = _check_gamma(gamma)

    @partial(jax.jit, static_argnums=(0, 4, 5))
    def step(
        self,
        state: BilevelState,
        train_batch: Batch | Stacked,
        val_batch: Batch | Stacked,
        train_loss_fn: LossFn,
        val_loss_fn: LossFn,
    ) -> BilevelState:
        """``unroll_steps`` inner steps and one outer update of λ with the Greedy hypergradient.

        Jitted with ``self``, ``train_loss_fn`` and ``val_loss_fn`` static; one compilation
        serves every later call with same-shaped inputs, whatever the horizon.

        Args:
          state: the current state (from :meth:`init` or a previous ``step``).
          train_batch: one batch reused for every unrolled step, or :class:`Stacked` batches
            (a leading axis of length ``unroll_steps``, one per step).
          val_batch: the validation batch, likewise single or :class:`Stacked`.
          train_loss_fn: ``L_train(params, hyperparams, batch) -> scalar``.
          val_loss_fn: ``L_val(params, hyperparams, batch) -> scalar``.

        Returns:
          The new state: weights after T inner steps, λ after one ``outer_optimizer``
          update, ``step`` + T, and in ``metadata`` the last step's training loss, the
          validation loss at ``w_T`` and ``‖ĝ‖`` (``"hypergrad_norm"``).

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
        self._check_state(state)
        estimate = self._estimate(state, train_batch, val_batch, train_loss_fn, val_loss_fn)
        return self._apply(state, estimate, None)

    @property
    def steps_per_call(self) -> int:
        """Inner steps one call of :meth:`step` takes: ``unroll_steps``."""
        return self.unroll_steps

    def run_step(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn, lr_hyper=None):
        """:meth:`step` with the training loops' uniform signature; ``lr_hyper`` must be None.

        Args:
          state, train_batch, val_batch, train_loss_fn, val_loss_fn: as for :meth:`step`.
          lr_hyper: must be ``None``: the ``outer_optimizer`` sets the hyper step size.

        Returns:
          What :meth:`step` returns.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from gradhpo import GreedyOptimizer
          >>> opt = GreedyOptimizer(optax.sgd(0.1), optax.sgd(0.1), unroll_steps=4)
          >>> loss = lambda w, lam, b: jnp.sum((w - lam) ** 2)
          >>> state = opt.run_step(opt.init(jnp.zeros(1), jnp.ones(1)), None, None, loss, loss)
          >>> opt.steps_per_call, int(state.step)
          (4, 4)
        """
        if lr_hyper is not None:
            raise ValueError(
                "GreedyOptimizer takes no lr_hyper: its outer_optimizer (with its own learning "
                "rate or optax schedule) sets the hyper step size; pass lr_hyper=None"
            )
        return self.step(state, train_batch, val_batch, train_loss_fn, val_loss_fn)

    def _per_step(self, batch: Batch | Stacked, name: str) -> Batch | None:
        """The stacked batches of a :class:`Stacked` argument (length checked), else ``None``."""
        if not isinstance(batch, Stacked):
            return None
        if batch.num_steps != self.unroll_steps:
            raise ValueError(
                f"{name} is Stacked with a leading axis of length {batch.num_steps}, but "
                f"unroll_steps = {self.unroll_steps}: give one batch per unrolled step, or pass "
                "a single (unwrapped) batch to reuse it for every step"
            )
        return batch.batches

    def _estimate(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn) -> Estimate:
        lam, gamma = state.hyperparams, self.gamma
        xs = (self._per_step(train_batch, "train_batch"), self._per_step(val_batch, "val_batch"))
        loss_dtype = state.metadata["train_loss"].dtype

        def greedy_step(carry, xs_t):
            w, s, G, *_ = carry
            D_t = train_batch if xs_t[0] is None else xs_t[0]
            V_t = val_batch if xs_t[1] is None else xs_t[1]
            new, vjp_B_t = self.inner.step_and_vjp(w, s, lam, D_t, train_loss_fn)
            val_loss, alpha_t, g_FO = validation_grads(val_loss_fn, new.params, lam, V_t)
            G_t = tree_add(tree_scale(gamma, G), vjp_B_t(alpha_t))  # G_t = γ G_{t-1} + α_t B_t
            losses = (jnp.asarray(new.train_loss, loss_dtype), jnp.asarray(val_loss, loss_dtype))
            return (new.params, new.inner_opt_state, G_t, g_FO, *losses), None

        # g_FO and the metrics ride in the carry (O(H), not O(T·H)): the last step's are used.
        zeros = jax.tree.map(jnp.zeros_like, lam)
        carry = (state.params, state.inner_opt_state, zeros, zeros)
        carry += (state.metadata["train_loss"], state.metadata["val_loss"])
        (w_T, s_T, G_T, g_FO, train_loss, val_loss), _ = jax.lax.scan(
            greedy_step, carry, xs, length=self.unroll_steps
        )
        hypergrad = tree_add(g_FO, G_T)  # ĝ = g_FO + G_T
        return Estimate(hypergrad, w_T, s_T, train_loss, val_loss, num_steps=self.unroll_steps)
