"""The First-Order (FO) and One-Step baselines.

References:
  Luketina, Berglund, Greff, Raiko. "Scalable Gradient-Based Tuning of Continuous
  Regularization Hyperparameters." ICML 2016 (the T1-T2 / One-Step hypergradient).
"""

from __future__ import annotations

from gradhpo.core.base import Estimate, MemorylessOnlineOptimizer
from gradhpo.core.inner import validation_grads
from gradhpo.utils.dependence import output_depends_on
from gradhpo.utils.tree import tree_add


class FOOptimizer(MemorylessOnlineOptimizer):
    """First-order hypergradient: ``g = g_FO = ∂L_val(w_t, λ)/∂λ``, ignoring the trajectory.

    After the inner step ``w_t = Φ(w_{t-1}, λ; D_t)``, λ moves along the *direct* gradient of
    the validation loss only. Where λ does not enter ``L_val`` (learning rates, example
    weights) this is exactly zero; the optimizer then warns once.

    Args:
      inner_optimizer, outer_optimizer, update_fn: see
        :class:`~gradhpo.core.base.BilevelOptimizer`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gradhpo import FOOptimizer
      >>> train = lambda w, lam, b: jnp.sum((w - b) ** 2)
      >>> val = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(lam**2)
      >>> opt = FOOptimizer(inner_optimizer=optax.sgd(0.1))
      >>> state = opt.step(opt.init(jnp.zeros(2), jnp.ones(2)), jnp.ones(2), jnp.ones(2),
      ...                  train, val, 0.25)
      >>> state.hyperparams
      Array([0.5, 0.5], dtype=float32)

    References:
      Luketina et al., ICML 2016; Lee et al., ICLR 2022 (the "FO" baseline).
    """

    differentiates_inner_step = False  # g_FO reads L_val only

    def _estimate_step(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn):
        w, s, lam = state.params, state.inner_opt_state, state.hyperparams
        new = self.inner(w, s, lam, train_batch, train_loss_fn)
        if not output_depends_on(val_loss_fn, 1, new.params, lam, val_batch):
            self._warn_once(
                f"fo-zero-{id(val_loss_fn)}",
                "the hyperparameters do not enter val_loss_fn, so the first-order "
                "hypergradient is identically zero and FOOptimizer will not change them; "
                "use a second-order method (OneStepOptimizer, GreedyOptimizer, ...)",
            )
        val_loss, _, g_fo = validation_grads(val_loss_fn, new.params, lam, val_batch)
        return Estimate(g_fo, new.params, new.inner_opt_state, new.train_loss, val_loss)


class OneStepOptimizer(MemorylessOnlineOptimizer):
    """One-Step hypergradient: ``g = g_FO + α_t B_t``.

    With ``w_t = Φ(w_{t-1}, λ; D_t)``, ``α_t = ∇_w L_val(w_t, λ)`` (the validation gradient at
    the *new* weights) and ``B_t = ∂Φ/∂λ`` at the *old* ones (the inner optimizer state held
    fixed), ``α_t B_t`` is one vector-Jacobian product. It equals the exact reverse-mode
    hypergradient of a one-step unroll, HyperDistill with ``γ = 0, θ = 1`` and Greedy with
    one unrolled step.

    Args:
      inner_optimizer, outer_optimizer, update_fn: the inner step and the outer update, as
        for :class:`~gradhpo.core.base.BilevelOptimizer`.

    Example:
      >>> import jax.numpy as jnp, optax, gradhpo
      >>> OneStepOptimizer = gradhpo.OneStepOptimizer
      >>> train = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(lam * w**2)
      >>> val = lambda w, lam, b: jnp.sum((w - b) ** 2)
      >>> opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
      >>> state = opt.init(jnp.ones(2), jnp.ones(2))
      >>> opt.compute_hypergradient(state, jnp.ones(2), jnp.ones(2), train, val)
      Array([0.08, 0.08], dtype=float32)

    References:
      Luketina et al., ICML 2016, Eq. 4 (T1-T2); Lee et al., ICLR 2022 (the "1-step" baseline).
    """

    def _estimate_step(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn):
        w, s, lam = state.params, state.inner_opt_state, state.hyperparams
        new, vjp_B = self.inner.step_and_vjp(w, s, lam, train_batch, train_loss_fn)
        val_loss, alpha, g_fo = validation_grads(val_loss_fn, new.params, lam, val_batch)
        hypergrad = tree_add(g_fo, vjp_B(alpha))
        return Estimate(hypergrad, new.params, new.inner_opt_state, new.train_loss, val_loss)
