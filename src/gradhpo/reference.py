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

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from gradhpo.core.batches import Stacked
from gradhpo.core.checkpoint import Checkpoint, check_checkpoint
from gradhpo.core.inner import InnerStep, scalar_loss
from gradhpo.core.memory import cached_plan, parse_budget
from gradhpo.core.types import Batch, InnerOptimizer, LossFn, PyTree, UpdateFn
from gradhpo.utils.tree import leading_axis_length, stack_batches

_STATIC = (
    "train_loss_fn",
    "val_loss_fn",
    "inner_optimizer",
    "update_fn",
    "checkpoint",
    "checkpoint_every",
    "mixed_mode",
)


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
    checkpoint: Checkpoint = None,
    checkpoint_every: int | None = None,
    mixed_mode: bool = False,
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
      checkpoint: the memory strategy of reverse mode through the unroll: ``None``,
        ``"step"``, ``"sqrt"``, ``"binomial"`` or a segment length K (exact, less memory).
      checkpoint_every: the older spelling of ``checkpoint=K``.
      mixed_mode: differentiate each step's training gradient forward-over-reverse.

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
    checkpoint = check_checkpoint(checkpoint, checkpoint_every)
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
        checkpoint=checkpoint,
        mixed_mode=mixed_mode,
    )
    return scalar_loss("val_loss_fn", val_loss_fn)(out.params, hyperparams, val_batch)


def reverse_hypergradient(
    params: PyTree,
    hyperparams: PyTree,
    *args: Any,
    memory_budget: int | str | None = None,
    **options: Any,
) -> PyTree:
    """The exact hypergradient ``dL_val(w_T)/dλ`` by reverse mode through T inner steps.

    Args:
      params: the initial weights ``w_0`` (held constant).
      hyperparams: λ.
      args, options: (positional and keyword) the rest of :func:`unrolled_val_loss`'s
        arguments, in its order:
        ``train_batches, val_batch, train_loss_fn, val_loss_fn`` and the keywords
        ``inner_optimizer`` or ``update_fn``, ``inner_opt_state``, and the memory strategy
        ``checkpoint`` (``None``: store every step; ``"step"``; ``"sqrt"``: ⌈√T⌉-step
        segments, memory O(P·√T), about one extra forward pass; ``"binomial"``: ⌈log₂T⌉
        stored carries; or a segment length K, also spelled ``checkpoint_every=K``) and
        ``mixed_mode`` (forward-over-reverse differentiation of each step's gradient). All
        give the same hypergradient.
      memory_budget: instead of ``checkpoint``/``mixed_mode``, a ceiling on the compiled
        temporary memory (bytes, or a string such as ``"64 MiB"``): the fastest strategy
        that fits is compiled and used (the choice is logged, logger ``"gradhpo"``).

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
    if memory_budget is not None:
        if {"checkpoint", "checkpoint_every", "mixed_mode"} & set(options):
            raise ValueError("give memory_budget or checkpoint/mixed_mode, not both")

        data, fns = args[:2], args[2:]  # the batches are traced, the loss functions static
        state = options.pop("inner_opt_state", None)

        def make(checkpoint, mixed):
            def hypergrad(hyperparams, params, data, state):
                return jax.grad(unrolled_val_loss)(
                    hyperparams,
                    params,
                    *data,
                    *fns,
                    inner_opt_state=state,
                    checkpoint=checkpoint,
                    mixed_mode=mixed,
                    **options,
                )

            return hypergrad

        # One plan per loss functions, inner step and input shapes (not one per call).
        tag = (
            "reverse_hypergradient",
            fns,
            options.get("inner_optimizer"),
            options.get("update_fn"),
        )
        plan = cached_plan(
            fns[0],
            tag,
            make,
            (hyperparams, params, data, state),
            parse_budget(memory_budget),
            allow_mixed=options.get("update_fn") is None,
        )
        options["inner_opt_state"] = state
        options = {**options, "checkpoint": plan.checkpoint, "mixed_mode": plan.mixed_mode}
    return jax.grad(unrolled_val_loss)(hyperparams, params, *args, **options)


def forward_hypergradient(
    params: PyTree, hyperparams: PyTree, *args: Any, **options: Any
) -> PyTree:
    """The exact hypergradient by forward mode: one ``jax.jvp`` per scalar of λ.

    Propagates ``Z_t = A_t Z_{t-1} + B_t`` (real-time recurrent learning) along each basis
    direction of λ, all directions batched with ``vmap``; memory O(P·dim λ), no stored
    trajectory. Equals :func:`reverse_hypergradient` to round-off; use it for small λ.

    Args:
      params, hyperparams, args, options: as for :func:`reverse_hypergradient`
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
