"""Exact hypergradients through an unrolled inner loop: the ground truth for every estimator.

With ``w_t = Φ(w_{t-1}, λ; D_t)`` for ``t = 1..T`` (the inner optimizer state included) the
exact hypergradient of ``L_val(w_T(λ), λ)`` is (Lee et al. 2022, Eqs. 2-3)::

    dL/dλ = ∂L_val(w_T, λ)/∂λ + α_T Σ_t (A_T ··· A_{t+1}) B_t,   α_T = ∇_w L_val(w_T, λ)

:func:`reverse_hypergradient` computes it by reverse mode through a ``lax.scan`` of the T
steps (memory O(P·T), or O(P·(T/K + K)) with ``checkpoint_every=K``);
:func:`forward_hypergradient` by forward mode, one ``jax.jvp`` per scalar of λ (cheap for
small λ, equal to reverse mode to round-off). Both start from the given ``(w_0, s_0)`` and
treat them as constants.

References:
  Maclaurin, Duvenaud, Adams. "Gradient-based Hyperparameter Optimization through
  Reversible Learning." ICML 2015 (reverse mode). Franceschi, Donini, Frasconi, Pontil.
  "Forward and Reverse Gradient-Based Hyperparameter Optimization." ICML 2017.
"""

from __future__ import annotations

import numbers
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from gradhpo.core.batches import Stacked
from gradhpo.core.inner import InnerStep, scalar_loss
from gradhpo.core.types import Batch, InnerOptimizer, LossFn, PyTree, UpdateFn
from gradhpo.utils.tree import leading_axis_length, stack_batches

_STATIC = ("train_loss_fn", "val_loss_fn", "inner_optimizer", "update_fn", "checkpoint_every")


def _check_checkpoint(checkpoint_every: Any) -> None:
    if checkpoint_every is not None and (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, numbers.Integral)
        or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}")


@partial(jax.jit, static_argnames=_STATIC)
def unrolled_val_loss(
    hyperparams: PyTree,
    params: PyTree,
    train_batches: Batch,
    val_batch: Batch,
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    *,
    inner_optimizer: InnerOptimizer | None = None,
    update_fn: UpdateFn | None = None,
    inner_opt_state: PyTree = None,
    checkpoint_every: int | None = None,
) -> jax.Array:
    """``L_val(w_T(λ), λ)`` after T inner steps from ``params``: the objective all refer to.

    Args:
      hyperparams: λ (first, so ``jax.grad`` differentiates it by default).
      params: the initial weights ``w_0``.
      train_batches: one batch per step, stacked with a leading axis of length T (a list of
        batches is accepted and stacked).
      val_batch: the validation batch.
      train_loss_fn, val_loss_fn: ``loss(params, hyperparams, batch) -> scalar``.
      inner_optimizer, update_fn: the inner step, as for the optimizers.
      inner_opt_state: the inner optimizer state ``s_0`` (default: a fresh ``init``).
      checkpoint_every: rematerialise segments of this many steps (exact, less memory).

    Returns:
      The scalar validation loss after the unroll.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gradhpo.reference import unrolled_val_loss
      >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)
      >>> val = lambda w, lam, b: 0.5 * jnp.sum(w**2)
      >>> float(unrolled_val_loss(jnp.ones(1), jnp.zeros(1), jnp.zeros((3, 1)), None,
      ...     train, val, inner_optimizer=optax.sgd(0.5)))
      0.3828125
    """
    _check_checkpoint(checkpoint_every)
    phi = InnerStep(inner_optimizer, update_fn)
    batches = stack_batches(train_batches)
    leading_axis_length(batches, "train_batches")
    if inner_opt_state is None:
        inner_opt_state = phi.init(params, jax.lax.stop_gradient(hyperparams))
    out, _ = phi.unroll(
        params,
        inner_opt_state,
        hyperparams,
        Stacked(batches),
        train_loss_fn,
        checkpoint_every=checkpoint_every,
    )
    return scalar_loss("val_loss_fn", val_loss_fn)(out.params, hyperparams, val_batch)


def reverse_hypergradient(
    params: PyTree, hyperparams: PyTree, *args: Any, **options: Any
) -> PyTree:
    """The exact hypergradient ``dL_val(w_T)/dλ`` by reverse mode through T inner steps.

    Args:
      params: the initial weights ``w_0`` (held constant).
      hyperparams: λ.
      *args, **options: the rest of :func:`unrolled_val_loss`'s arguments, in its order:
        ``train_batches, val_batch, train_loss_fn, val_loss_fn`` and the keywords
        ``inner_optimizer`` or ``update_fn``, ``inner_opt_state``, ``checkpoint_every``
        (``K`` rematerialises K-step segments in the backward pass: memory O(P·(T/K + K))
        instead of O(P·T), about one extra forward pass, still exact; ``K ≈ √T`` minimises
        memory).

    Returns:
      A pytree shaped like ``hyperparams``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gradhpo.reference import reverse_hypergradient
      >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)
      >>> val = lambda w, lam, b: 0.5 * jnp.sum(w**2)
      >>> # w_T = (1 - 0.5**T) λ, so dL/dλ = (1 - 0.5**T)**2 λ = 0.765625 at T = 3
      >>> reverse_hypergradient(jnp.zeros(1), jnp.ones(1), jnp.zeros((3, 1)), None,
      ...                       train, val, inner_optimizer=optax.sgd(0.5))
      Array([0.765625], dtype=float32)

    References:
      Maclaurin et al., ICML 2015; Franceschi et al., ICML 2017 (reverse-mode HO).
    """
    return jax.grad(unrolled_val_loss)(hyperparams, params, *args, **options)


def forward_hypergradient(
    params: PyTree, hyperparams: PyTree, *args: Any, **options: Any
) -> PyTree:
    """The exact hypergradient by forward mode: one ``jax.jvp`` per scalar of λ.

    Propagates ``Z_t = A_t Z_{t-1} + B_t`` (real-time recurrent learning) along each basis
    direction of λ, all directions batched with ``vmap``; memory O(P·dim λ), no stored
    trajectory. Equals :func:`reverse_hypergradient` to round-off; use it for small λ.

    Args:
      params, hyperparams, *args, **options: as for :func:`reverse_hypergradient`
        (``checkpoint_every`` has no use here: forward mode stores no trajectory).

    Returns:
      A pytree shaped like ``hyperparams``.

    Example:
      >>> import jax.numpy as jnp, optax, gradhpo
      >>> def train(w, lam, b):
      ...     return 0.5 * jnp.sum((w - lam) ** 2)
      >>> def val(w, lam, b):
      ...     return 0.5 * jnp.sum(w**2)
      >>> batches = jnp.zeros((3, 1))  # three steps (the batches are unused)
      >>> gradhpo.forward_hypergradient(jnp.zeros(1), jnp.ones(1), batches, None, train, val,
      ...                               inner_optimizer=optax.sgd(0.5))
      Array([0.765625], dtype=float32)

    References:
      Williams & Zipser, 1989 (RTRL); Franceschi et al., ICML 2017 (forward-mode HO).
    """
    flat, unravel = ravel_pytree(hyperparams)

    def objective(flat_lam):
        return unrolled_val_loss(unravel(flat_lam), params, *args, **options)

    basis = jnp.eye(flat.size, dtype=flat.dtype)
    directional = jax.vmap(lambda u: jax.jvp(objective, (flat,), (u,))[1])(basis)
    return unravel(directional)
