"""Exact reverse mode through the window, as an optimizer: the step every estimator approximates.

With ``(w_t, s_t) = Φ(w_{t-1}, s_{t-1}, λ; D_t)`` for the ``T = unroll_steps`` steps of a
window, the hypergradient is the exact derivative of ``L_val(w_T(λ), λ)`` (the inner
optimizer state included)::

    dL/dλ = ∂L_val(w_T, λ)/∂λ + α_T Σ_t (A_T ··· A_{t+1}) B_t,   α_T = ∇_w L_val(w_T, λ),

by ``jax.value_and_grad`` through one ``lax.scan`` of Φ
(:meth:`~gradhpo.core.inner.InnerStep.unroll`, the same scan as
:func:`gradhpo.reverse_hypergradient`). Memory O(P·T), or O(P·(T/K + K)) with
``checkpoint_every=K``.

References:
  Maclaurin, Duvenaud, Adams. "Gradient-based Hyperparameter Optimization through
  Reversible Learning." ICML 2015. Franceschi, Donini, Frasconi, Pontil. "Forward and
  Reverse Gradient-Based Hyperparameter Optimization." ICML 2017.
"""

from __future__ import annotations

import jax
import optax

from gradhpo.core._checks import positive_int
from gradhpo.core.base import Estimate, WindowOptimizer
from gradhpo.core.inner import scalar_loss
from gradhpo.core.types import InnerOptimizer, UpdateFn

__all__ = ["ReverseModeOptimizer"]


class ReverseModeOptimizer(WindowOptimizer):
    """Exact reverse-mode hypergradient through ``unroll_steps`` inner steps, as an optimizer.

    One :meth:`step` takes T inner steps from ``(w_0, s_0)`` and updates λ once with
    ``dL_val(w_T(λ), λ)/dλ``, differentiated through every step and the inner optimizer
    state: the number :func:`gradhpo.reverse_hypergradient` gives over the same batches,
    and what :class:`~gradhpo.GreedyOptimizer` approximates. The validation loss is taken
    at ``w_T`` (with :class:`~gradhpo.Stacked` validation batches, the last one).

    Args:
      inner_optimizer: the inner optimizer, an ``optax.GradientTransformation`` or a function
        ``hyperparams -> GradientTransformation``.
      outer_optimizer: the ``optax.GradientTransformation`` of λ (required; ``step`` has no
        ``lr_hyper``).
      unroll_steps: the window T ≥ 1.
      checkpoint_every: ``None`` (store every step, memory O(P·T)) or K ≥ 1: rematerialise
        K-step segments in the backward pass (memory O(P·(T/K + K)), about one more
        forward pass, still exact; K ≈ √T minimises memory).
      update_fn: instead of ``inner_optimizer``, a custom inner step (keyword only).

    Example:
      >>> import jax.numpy as jnp, optax, gradhpo
      >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)
      >>> val = lambda w, lam, b: 0.5 * jnp.sum(w**2)
      >>> opt = gradhpo.ReverseModeOptimizer(optax.sgd(0.5), optax.sgd(1.0), unroll_steps=3)
      >>> state = opt.init(jnp.zeros(1), jnp.ones(1))
      >>> opt.compute_hypergradient(state, None, None, train, val)  # (1 - 0.5**3)**2
      Array([0.765625], dtype=float32)

    References:
      Maclaurin et al., ICML 2015; Franceschi et al., ICML 2017 (reverse-mode HO).
    """

    def __init__(
        self,
        inner_optimizer: InnerOptimizer | None = None,
        outer_optimizer: optax.GradientTransformation | None = None,
        unroll_steps: int = 1,
        *,
        checkpoint_every: int | None = None,
        update_fn: UpdateFn | None = None,
    ):
        super().__init__(inner_optimizer, outer_optimizer, unroll_steps, update_fn=update_fn)
        if checkpoint_every is not None:
            checkpoint_every = positive_int("checkpoint_every", checkpoint_every)
        self.checkpoint_every = checkpoint_every

    def _estimate_window(self, state, window, val_window, train_loss_fn, val_loss_fn):
        val_loss_fn = scalar_loss("val_loss_fn", val_loss_fn)
        V_T = val_window.last()

        def objective(lam):  # L_val(w_T(λ), λ) through the whole window
            out, _ = self.inner.unroll(
                state.params,
                state.inner_opt_state,
                lam,
                window,
                train_loss_fn,
                checkpoint_every=self.checkpoint_every,
            )
            return val_loss_fn(out.params, lam, V_T), out

        (val_loss, out), hypergrad = jax.value_and_grad(objective, has_aux=True)(state.hyperparams)
        return Estimate(
            hypergrad,
            out.params,
            out.inner_opt_state,
            out.train_loss,
            val_loss,
            num_steps=self.unroll_steps,
        )
