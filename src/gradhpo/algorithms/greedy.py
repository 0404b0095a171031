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

import jax
import jax.numpy as jnp
import optax

from gradhpo.core._checks import real_in
from gradhpo.core.base import Estimate, WindowOptimizer
from gradhpo.core.batches import Stacked
from gradhpo.core.inner import validation_grads
from gradhpo.core.types import InnerOptimizer, UpdateFn
from gradhpo.utils.tree import tree_add, tree_scale

__all__ = ["GreedyOptimizer", "Stacked"]


class GreedyOptimizer(WindowOptimizer):
    """Generalized Greedy: ``ĝ = g_FO + Σ_{t=1..T} γ^{T-t} α_t B_t`` over T unrolled steps.

    Each :meth:`step` takes ``T = unroll_steps`` inner steps ``w_t = Φ(w_{t-1}, λ; D_t)`` in one
    ``lax.scan`` and accumulates, online (Eq. 6),

    ``G_0 = 0``,  ``G_t = γ G_{t-1} + α_t B_t``  with ``α_t = ∇_w L_val(w_t, λ; V_t)``,

    ``B_t = ∂Φ(w_{t-1}, λ; D_t)/∂λ`` (one VJP; the inner optimizer state held fixed), then
    makes one outer update with ``ĝ = g_FO + G_T``,
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
        super().__init__(inner_optimizer, outer_optimizer, unroll_steps, update_fn=update_fn)
        # (0, 1]: use a tiny γ such as 1e-12 for the One-Step limit.
        self.gamma = real_in("gamma", gamma, 0.0, 1.0, low_open=True)

    def _estimate_window(self, state, window, val_window, train_loss_fn, val_loss_fn):
        lam, gamma = state.hyperparams, self.gamma
        xs = (window.scan_xs, val_window.scan_xs)
        loss_dtype = state.metadata["train_loss"].dtype

        def greedy_step(carry, xs_t):
            w, s, G, *_ = carry
            D_t, V_t = window.at(xs_t[0]), val_window.at(xs_t[1])
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
