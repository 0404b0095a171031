"""DrMAD: reverse mode along the straight line from ``w_0`` to ``w_T``, in constant memory.

The forward pass keeps only ``(w_0, s_0)`` and ``(w_T, s_T)``. The backward pass, for
t = T..1, replaces the unknown point ``(w_{t-1}, s_{t-1})`` by the interpolation::

    ŵ_{t-1} = (1 - (t-1)/T) w_0 + ((t-1)/T) w_T      (ŝ_{t-1} likewise)

and runs the reverse-mode recursion there::

    α ← α_T = ∇_w L_val(w_T),  g ← g_FO;  for t = T..1:  g += α B̂_t,  α ← α Â_t,

through the full inner state (the optimizer state's adjoint included). It is exact when
``A_t`` and ``B_t`` do not depend on w (linear dynamics), and on the isotropic quadratic.

References:
  Fu, Gong, Luo, Lin, Li. "DrMAD: Distilling Reverse-Mode Automatic Differentiation for
  Optimizing Hyperparameters of Deep Neural Networks." IJCAI 2016.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradhpo.core.base import Estimate, WindowOptimizer
from gradhpo.core.inner import validation_grads
from gradhpo.utils.tree import tree_add, tree_lerp

__all__ = ["DrMADOptimizer"]


class DrMADOptimizer(WindowOptimizer):
    """DrMAD's hypergradient through ``unroll_steps`` steps, storing only ``w_0`` and ``w_T``.

    Each :meth:`step` takes T inner steps forward (λ fixed, nothing stored), then runs
    reverse mode backward along the linear interpolation ``ŵ_{t-1}`` of ``w_0`` and
    ``w_T`` (and of the inner optimizer states; integer counters are rounded, so they are
    exact), one VJP of Φ per step, and updates λ once with ``g_FO + Σ_t α̂_t B̂_t``. Memory
    O(P + H) whatever T; cost T gradient evaluations forward and T VJPs backward.

    Args:
      inner_optimizer: the inner optimizer, an ``optax.GradientTransformation`` or a function
        ``hyperparams -> GradientTransformation``.
      outer_optimizer: the ``optax.GradientTransformation`` of λ (required).
      unroll_steps: the window T ≥ 1.
      update_fn: instead of ``inner_optimizer``, a custom inner step (keyword only).

    Example:
      >>> import jax.numpy as jnp, optax, gradhpo
      >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)  # A = 0.5, B = 0.5
      >>> val = lambda w, lam, b: 0.5 * jnp.sum(w**2)
      >>> opt = gradhpo.DrMADOptimizer(optax.sgd(0.5), optax.sgd(1.0), unroll_steps=3)
      >>> state = opt.init(jnp.zeros(1), jnp.ones(1))
      >>> opt.compute_hypergradient(state, None, None, train, val)  # exact: (1 - 0.5**3)**2
      Array([0.765625], dtype=float32)

    References:
      Fu et al., "DrMAD: Distilling Reverse-Mode Automatic Differentiation for Optimizing
      Hyperparameters of Deep Neural Networks", IJCAI 2016.
    """

    def _estimate_window(self, state, window, val_window, train_loss_fn, val_loss_fn):
        T, lam = self.unroll_steps, state.hyperparams
        start = (state.params, state.inner_opt_state)
        out, _ = self.inner.unroll(*start, lam, window, train_loss_fn)
        end = (out.params, out.inner_opt_state)
        val_loss, alpha_T, g_FO = validation_grads(val_loss_fn, out.params, lam, val_window.last())

        def backward(carry, xs):  # t = T..1
            alpha_w, alpha_s, g = carry
            t, xs_t = xs
            w_hat, s_hat = tree_lerp(1 - (t - 1) / T, start, end)  # ŵ_{t-1}, ŝ_{t-1}
            alpha_w, alpha_s, alpha_B = self.inner.state_vjp(
                w_hat, s_hat, lam, window.at(xs_t), train_loss_fn, alpha_w, alpha_s
            )
            return (alpha_w, alpha_s, tree_add(g, alpha_B)), None  # g += α B̂_t; α ← α Â_t

        carry = (alpha_T, self.inner.zero_state_adjoint(out.inner_opt_state), g_FO)
        xs = (jnp.arange(1, T + 1), window.scan_xs)
        (_, _, hypergrad), _ = jax.lax.scan(backward, carry, xs, length=T, reverse=True)
        return Estimate(hypergrad, *end, out.train_loss, val_loss, num_steps=T)
