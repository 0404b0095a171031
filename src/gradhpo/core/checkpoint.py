"""Memory strategies for reverse mode through a scan of Φ, and the mixed-mode gradient step.

Reverse mode through T inner steps stores what the backward pass needs of every step. The
strategies trade that memory for recomputation and all give the same hypergradient (to
round-off):

* ``None``: store everything (memory O(T·(P + activations)), one forward pass);
* ``"step"``: rematerialise each step (``jax.checkpoint`` on the step): only the T carries
  ``(w_t, s_t)`` are stored, each step's gradient is recomputed in the backward pass;
* ``"sqrt"`` or an int K: rematerialise K-step segments (K = ⌈√T⌉ for ``"sqrt"``): T/K
  carries stored, memory O(P·(T/K + K)), about one more forward pass;
* ``"binomial"``: binomial (treeverse) checkpointing with ⌈log₂T⌉ stored carries and
  O(log T) recomputation (Griewank & Walther), through equinox's checkpointed scan (the
  ``equinox`` extra).

Mixed mode (MixFlow-MG, Kemaev et al. 2025) changes how one step is differentiated: the
training gradient ``g = ∇_w L_train(w, λ; D)`` gets a custom VJP that computes
``ḡ ↦ (H_ww ḡ, H_λw ḡ)`` as one forward-over-reverse Hessian-vector product of the joint
Hessian of ``L_train`` in ``(w, λ)`` (it is symmetric), instead of reverse-over-reverse. The
backward pass then keeps only ``(w, λ, D)`` per step, not the inner gradient's activations.
It combines with every strategy above.

References:
  Griewank, Walther. "Algorithm 799: revolve." ACM TOMS 2000 (binomial checkpointing).
  Chen, Xu, Zhang, Guestrin. "Training Deep Nets with Sublinear Memory Cost." 2016 (√T).
  Kemaev, Calian, Zintgraf, et al. "Scalable Meta-Learning via Mixed-Mode Differentiation."
  ICML 2025 (MixFlow-MG).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradhpo.core.batches import Stacked
from gradhpo.core.types import Batch, LossFn, PyTree
from gradhpo.utils.tree import is_inexact

#: Why mixed mode needs an optax inner optimizer (raised by every place that is asked for it).
MIXED_MODE_NEEDS_OPTIMIZER = (
    "mixed_mode needs an inner_optimizer: it differentiates the training gradient, which a "
    "custom update_fn computes out of sight"
)

#: The named memory strategies (an int K ≥ 1 is also accepted: K-step segments).
STRATEGIES = (None, "step", "sqrt", "binomial")

Checkpoint = str | int | None


def check_checkpoint(checkpoint: Any, checkpoint_every: Any = None) -> Checkpoint:
    """The memory strategy from ``checkpoint`` and the older ``checkpoint_every=K`` spelling.

    Raises a ValueError naming the argument and the accepted values otherwise.

    Example:
      >>> from gradhpo.core.checkpoint import check_checkpoint
      >>> check_checkpoint("sqrt"), check_checkpoint(None, checkpoint_every=4)
      ('sqrt', 4)
    """
    if checkpoint_every is not None:
        if checkpoint is not None:
            raise ValueError("give checkpoint or checkpoint_every (the older spelling), not both")
        if (
            isinstance(checkpoint_every, bool)
            or not isinstance(checkpoint_every, numbers.Integral)
            or checkpoint_every < 1
        ):
            raise ValueError(
                f"checkpoint_every must be None or an int >= 1, got {checkpoint_every!r}"
            )
        return int(checkpoint_every)
    if isinstance(checkpoint, numbers.Integral) and not isinstance(checkpoint, bool):
        if checkpoint < 1:
            raise ValueError(f"checkpoint as a segment length must be >= 1, got {checkpoint}")
        return int(checkpoint)
    if checkpoint not in STRATEGIES:
        raise ValueError(
            'checkpoint must be None, "step", "sqrt", "binomial" or a segment length K >= 1, '
            f"got {checkpoint!r}"
        )
    return checkpoint


def binomial_checkpoints(num_steps: int) -> int:
    """The number of stored carries of ``"binomial"``: ⌈log₂T⌉ (at least 1).

    Example:
      >>> from gradhpo.core.checkpoint import binomial_checkpoints
      >>> binomial_checkpoints(400), binomial_checkpoints(1)
      (9, 1)
    """
    return max(1, math.ceil(math.log2(num_steps)))


def remat_scan(
    body: Callable[[Any, Batch], tuple[Any, None]],
    carry: Any,
    window: Stacked,
    checkpoint: Checkpoint,
) -> Any:
    """``window.scan(body, carry)[0]`` with the memory strategy ``checkpoint`` for reverse mode.

    Args:
      body: ``body(carry, batch_t) -> (carry, None)``, one inner step.
      carry: the initial carry.
      window: the window's batches.
      checkpoint: a strategy of :data:`STRATEGIES` or a segment length K (checked with
        :func:`check_checkpoint`).

    Returns:
      The final carry; every strategy computes the same value and the same derivatives.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo import Stacked
      >>> from gradhpo.core.checkpoint import remat_scan
      >>> body = lambda w, b: (jnp.sin(w) + b, None)
      >>> window = Stacked(jnp.ones((6, 2)))
      >>> f = lambda w, c: jnp.sum(remat_scan(body, w, window, c))
      >>> grads = [jax.grad(f)(jnp.zeros(2), c) for c in (None, "step", "sqrt", 4)]
      >>> all(bool(jnp.allclose(g, grads[0])) for g in grads)
      True
    """
    T = window.num_steps
    if checkpoint is None:
        return window.scan(body, carry)[0]
    if checkpoint == "step":
        return window.scan(jax.checkpoint(body), carry)[0]
    if checkpoint == "binomial":
        return _binomial_scan(body, carry, window)
    K = math.ceil(math.sqrt(T)) if checkpoint == "sqrt" else checkpoint
    xs = window.scan_xs
    n_seg, rem = divmod(T, K)

    def segment(carry, seg_xs, length):  # one rematerialised run of `length` steps
        steps = jax.lax.scan(lambda c, x: body(c, window.at(x)), carry, seg_xs, length=length)
        return steps[0]

    segment = jax.checkpoint(segment, static_argnums=2)
    if n_seg:
        head = None
        if xs is not None:
            head = jax.tree.map(lambda x: x[: n_seg * K].reshape((n_seg, K, *x.shape[1:])), xs)
        carry = jax.lax.scan(lambda c, h: (segment(c, h, K), None), carry, head, length=n_seg)[0]
    if rem:
        tail = None if xs is None else jax.tree.map(lambda x: x[n_seg * K :], xs)
        carry = segment(carry, tail, rem)
    return carry


def _binomial_scan(body, carry, window: Stacked):
    try:
        import equinox.internal as eqxi
    except ImportError as err:  # pragma: no cover - the extra is part of the test install
        raise ImportError(
            'checkpoint="binomial" uses equinox\'s checkpointed scan: '
            'pip install "gradhpo-jax[equinox]"'
        ) from err
    T = window.num_steps
    return eqxi.scan(
        lambda c, x: body(c, window.at(x)),
        carry,
        window.scan_xs,
        length=T,
        kind="checkpointed",
        checkpoints=binomial_checkpoints(T),
    )[0]


def _zero_cotangent(x: Any) -> Any:
    x = jnp.asarray(x)
    if is_inexact(x):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixed_value_and_grad(
    loss_fn: LossFn, params: PyTree, hyperparams: PyTree, batch: Batch
) -> tuple[jax.Array, PyTree]:
    """``(L, ∇_w L)`` at ``(params, hyperparams, batch)``, differentiated in mixed mode.

    The value is ``jax.value_and_grad(loss_fn)(params, hyperparams, batch)``; its VJP is
    one forward-over-reverse product with the joint Hessian of ``L`` in ``(w, λ)``::

        (l̄, ḡ) ↦ (l̄ ∇_w L + H_ww ḡ,  l̄ ∇_λ L + H_λw ḡ)

    and zero for the batch, which is never differentiated. Memory of the backward pass:
    the step's inputs, not the activations of the inner reverse pass.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo.core.checkpoint import mixed_value_and_grad
      >>> loss = lambda w, lam, b: jnp.sum(lam * w**3)
      >>> f = lambda w, lam, v: jnp.sum(mixed_value_and_grad(loss, w, lam, None)[1] * v)
      >>> w, lam, v = jnp.ones(2), jnp.full(2, 2.0), jnp.ones(2)
      >>> jax.grad(f, argnums=(0, 1))(w, lam, v)  # ∇ of Σ 3λw² v: (6λw v, 3w² v)
      (Array([12., 12.], dtype=float32), Array([3., 3.], dtype=float32))

    References:
      Kemaev et al., "Scalable Meta-Learning via Mixed-Mode Differentiation", ICML 2025.
    """
    return jax.value_and_grad(loss_fn)(params, hyperparams, batch)


def _mixed_fwd(loss_fn, params, hyperparams, batch):
    return mixed_value_and_grad(loss_fn, params, hyperparams, batch), (params, hyperparams, batch)


def _mixed_bwd(loss_fn, residuals, cotangents):
    params, hyperparams, batch = residuals
    l_bar, g_bar = cotangents
    g_bar = jax.tree.map(lambda c, w: jnp.asarray(c, jnp.result_type(w)), g_bar, params)

    def joint_grad(w, lam):
        return jax.grad(loss_fn, argnums=(0, 1))(w, lam, batch)

    zero_lam = jax.tree.map(jnp.zeros_like, hyperparams)
    (g_w, g_lam), (Hg_w, Hg_lam) = jax.jvp(joint_grad, (params, hyperparams), (g_bar, zero_lam))
    d_w = jax.tree.map(lambda h, g: h + l_bar * g, Hg_w, g_w)
    d_lam = jax.tree.map(lambda h, g: h + l_bar * g, Hg_lam, g_lam)
    return d_w, d_lam, jax.tree.map(_zero_cotangent, batch)


mixed_value_and_grad.defvjp(_mixed_fwd, _mixed_bwd)
