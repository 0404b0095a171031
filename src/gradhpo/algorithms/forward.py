"""Forward mode (real-time recurrent learning): ``Z_t = dw_t/dλ`` carried in the state.

With ``(w_t, s_t) = Φ(w_{t-1}, s_{t-1}, λ; D_t)`` the tangent of the full inner state along
each coordinate of λ follows the recursion (Franceschi et al. 2017, Eq. 12)::

    Z_t = A_t Z_{t-1} + B_t,   Z_0 = 0,      g = ∂L_val(w_t, λ)/∂λ + α_t Z_t,

one ``jax.jvp`` of Φ per coordinate of λ (batched with ``vmap``; the primal step is shared).
``Z`` lives in the state, so the hypergradient is available after any step without
re-unrolling: a hyper-update every ``unroll_steps`` steps continues the same ``Z`` (the
online RTRL approximation once λ has moved), and a new episode (``episode_step`` 0) starts
from ``Z = 0``. Memory and time grow with dim λ: ``Z`` holds P·dim λ numbers.

References:
  Williams, Zipser. "A Learning Algorithm for Continually Running Fully Recurrent Neural
  Networks." Neural Computation 1989 (RTRL). Franceschi, Donini, Frasconi, Pontil. "Forward
  and Reverse Gradient-Based Hyperparameter Optimization." ICML 2017.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from gradhpo.core._checks import positive_int
from gradhpo.core.base import EPISODE_KEY, Estimate, WindowOptimizer
from gradhpo.core.inner import validation_grads
from gradhpo.core.types import InnerOptimizer, PyTree, UpdateFn
from gradhpo.utils.tree import tree_select

__all__ = ["ForwardModeOptimizer"]


def _size(tree: PyTree) -> int:
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))


class ForwardModeOptimizer(WindowOptimizer):
    """Exact forward-mode hypergradient (RTRL), with ``dw/dλ`` carried in the state.

    Each :meth:`step` takes ``unroll_steps`` inner steps, propagating
    ``Z_t = A_t Z_{t-1} + B_t`` for the weights and the inner optimizer state alongside,
    and updates λ with ``g = g_FO + α_T Z_T``. From a fresh episode the hypergradient is the
    exact one of the window (equal to :class:`~gradhpo.ReverseModeOptimizer`'s to
    round-off); later windows of the episode continue ``Z`` online, without re-unrolling,
    so ``unroll_steps=1`` gives a hyper-update after every inner step.

    Cost: each inner step is one JVP of Φ per coordinate of λ; ``Z`` takes
    ``(P + P_s)·dim λ`` numbers of the state (``P_s``: the float leaves of the inner
    optimizer state). ``init`` refuses more than ``max_hyperparams`` coordinates.

    Args:
      inner_optimizer: the inner optimizer, an ``optax.GradientTransformation`` or a function
        ``hyperparams -> GradientTransformation``.
      outer_optimizer: the ``optax.GradientTransformation`` of λ (required).
      unroll_steps: the inner steps k ≥ 1 between hyper-updates.
      max_hyperparams: the largest dim λ accepted (default 1024).
      update_fn: instead of ``inner_optimizer``, a custom inner step (keyword only).

    Example:
      >>> import jax.numpy as jnp, optax, gradhpo
      >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)
      >>> val = lambda w, lam, b: 0.5 * jnp.sum(w**2)
      >>> opt = gradhpo.ForwardModeOptimizer(optax.sgd(0.5), optax.sgd(1.0), unroll_steps=3)
      >>> state = opt.init(jnp.zeros(1), jnp.ones(1))
      >>> opt.compute_hypergradient(state, None, None, train, val)  # (1 - 0.5**3)**2
      Array([0.765625], dtype=float32)

    References:
      Williams & Zipser, 1989 (RTRL); Franceschi et al., ICML 2017 (forward-mode HO).
    """

    def __init__(
        self,
        inner_optimizer: InnerOptimizer | None = None,
        outer_optimizer: optax.GradientTransformation | None = None,
        unroll_steps: int = 1,
        *,
        max_hyperparams: int = 1024,
        update_fn: UpdateFn | None = None,
    ):
        super().__init__(inner_optimizer, outer_optimizer, unroll_steps, update_fn=update_fn)
        self.max_hyperparams = positive_int("max_hyperparams", max_hyperparams)

    def _init_metadata(self, params: PyTree, hyperparams: PyTree) -> dict[str, Any]:
        n = _size(hyperparams)
        if n > self.max_hyperparams:
            P = _size(params)
            raise ValueError(
                f"ForwardModeOptimizer carries dw/dλ, P·dim λ = {P}·{n} numbers, and takes "
                f"dim λ JVPs per inner step: dim λ must be <= max_hyperparams = "
                f"{self.max_hyperparams}, got {n}. Raise max_hyperparams, or use a reverse-mode "
                "estimator (ReverseModeOptimizer, whose cost does not grow with dim λ)"
            )
        s0 = self.inner.init(params, hyperparams)
        zeros = lambda x: jnp.zeros((n, *jnp.shape(x)), jnp.result_type(x))  # noqa: E731
        Z_s = [zeros(x) for x in self.inner.split_state(s0)[0]]
        return {"Z_w": jax.tree.map(zeros, params), "Z_s": Z_s}

    def _estimate_window(self, state, window, val_window, train_loss_fn, val_loss_fn):
        lam = state.hyperparams
        flat_lam, unravel = ravel_pytree(lam)
        basis = jnp.eye(flat_lam.size, dtype=flat_lam.dtype)  # one tangent direction per λ_i
        fresh = state.metadata[EPISODE_KEY] == 0  # a new episode starts from Z_0 = 0
        Z = jax.tree.map(jnp.zeros_like, (state.metadata["Z_w"], state.metadata["Z_s"]))
        Z = tree_select(fresh, Z, (state.metadata["Z_w"], state.metadata["Z_s"]))

        def rtrl_step(carry, batch):  # (w_t, s_t, Z_t) with Z_t = A_t Z_{t-1} + B_t
            w, s, Z_w, Z_s, _ = carry
            s_float, rebuild = self.inner.split_state(s)

            def phi(w, s_float, flat):
                out = self.inner(w, rebuild(s_float), unravel(flat), batch, train_loss_fn)
                new_float = self.inner.split_state(out.inner_opt_state)[0]
                return (out.params, new_float), (out.inner_opt_state, out.train_loss)

            def tangent(Z_w_i, Z_s_i, e_i):
                return jax.jvp(phi, (w, s_float, flat_lam), (Z_w_i, Z_s_i, e_i), has_aux=True)

            (w_new, _), (Z_w, Z_s), (new_s, loss) = jax.vmap(tangent, out_axes=(None, 0, None))(
                Z_w, Z_s, basis
            )
            loss = jnp.asarray(loss, carry[4].dtype)
            return (w_new, new_s, Z_w, Z_s, loss), None

        carry = (state.params, state.inner_opt_state, *Z, state.metadata["train_loss"])
        (w_T, s_T, Z_w, Z_s, train_loss), _ = window.scan(rtrl_step, carry)
        val_loss, alpha_T, g_FO = validation_grads(val_loss_fn, w_T, lam, val_window.last())
        # g = g_FO + α_T Z_T: contract α_T with each coordinate's tangent of the weights.
        alpha_Z = sum(
            jnp.tensordot(z, a, axes=a.ndim)
            for z, a in zip(jax.tree.leaves(Z_w), jax.tree.leaves(alpha_T), strict=True)
        )
        hypergrad = jax.tree.map(jnp.add, g_FO, unravel(alpha_Z.astype(flat_lam.dtype)))
        metadata = {"Z_w": Z_w, "Z_s": Z_s}
        return Estimate(
            hypergrad, w_T, s_T, train_loss, val_loss, metadata, num_steps=self.unroll_steps
        )
