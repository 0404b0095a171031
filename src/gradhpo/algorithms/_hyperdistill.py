"""HyperDistill's building blocks: the EMA coefficients, the distilled batch, Algorithm 4.

Both passes of HyperDistill weight the points of an episode with powers of γ. With the
normaliser kept as the running sum ``S_t = γ S_{t-1} + 1`` (``S_0 = 0``, so
``S_t = (1-γ^t)/(1-γ)``, and ``S_t = t`` at γ = 1) both mixing coefficients are ratios of
consecutive sums, valid for every γ ∈ [0, 1] without a special case or a ``0^0``:

* forward (Algorithm 3, Eq. 13): ``p_t = (γ - γ^t)/(1 - γ^t) = γ S_{t-1} / S_t``;
* backward (Algorithm 4, Eq. 17): ``p_s = (1 - γ^{s-1})/(1 - γ^s) = S_{s-1} / S_s``.

References:
  Lee, Lee, Hwang. "Online Hyperparameter Meta-Learning with Hypergradient Distillation."
  ICLR 2022 (Algorithms 3 and 4, Eqs. 13, 14 and 17).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gradhpo.core.batches import Stacked
from gradhpo.core.inner import InnerStep, check_matches, validation_grads
from gradhpo.core.types import Batch, LossFn, PyTree
from gradhpo.utils.tree import (
    leading_axis_length,
    tree_add,
    tree_dot,
    tree_lerp,
    tree_norm,
)


class ThetaFit(NamedTuple):
    """What Algorithm 4 (LinearEstimation) computes.

    Attributes:
      theta: the fitted scale ``θ = (x·y)/(x·x)`` (a scalar array).
      x: ``x_s = ‖v_s‖ S_s`` for horizons ``s = 1..T`` (shape ``(T,)``).
      y: ``y_s = (v_s/‖v_s‖)·g_SO(s)`` for ``s = 1..T`` (0 where ``v_s = 0``).
      hypergrad: ``g_FO + g_SO(T)``, the backward pass's own hypergradient over the whole
        episode: DrMAD's estimate with interpolated points, the exact reverse-mode
        hypergradient with the stored trajectory.
    """

    theta: jax.Array
    x: jax.Array
    y: jax.Array
    hypergrad: PyTree


def ema_weights(gamma: float, S_prev: jax.Array, *, backward: bool = False):
    """``(S, p)``: the next normaliser ``S = γ S_prev + 1`` and the weight ``p`` of the old EMA.

    Forward (Eq. 13), ``p_t = γ S_{t-1}/S_t = (γ - γ^t)/(1 - γ^t)``; backward (Eq. 17),
    ``p_s = S_{s-1}/S_s = (1 - γ^{s-1})/(1 - γ^s)``. Both give ``p = 0`` at the first step
    (``S_0 = 0``) and ``(t-1)/t`` at γ = 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.algorithms._hyperdistill import ema_weights
      >>> S_t, p_t = ema_weights(0.5, jnp.asarray(1.5))  # t = 3: S_2 = 1.5, S_3 = 1.75
      >>> float(S_t), round(float(p_t), 6)  # p_3 = (γ - γ³)/(1 - γ³) = 0.375/0.875
      (1.75, 0.428571)
      >>> round(float(ema_weights(0.5, jnp.asarray(1.5), backward=True)[1]), 6)  # 0.75/0.875
      0.857143
    """
    S = gamma * S_prev + 1
    return S, (S_prev if backward else gamma * S_prev) / S


def num_examples(batch: Batch, name: str) -> int:
    """The number of examples of ``batch``: the leading axis, shared by every leaf.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.algorithms._hyperdistill import num_examples
      >>> num_examples({"x": jnp.zeros((8, 3)), "y": jnp.zeros(8)}, "batch")
      8
    """
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"with distill_batch=True, every leaf of {name} must hold the examples along one "
            f"shared leading axis (they are mixed per example); got leading sizes "
            f"{sorted(sizes, key=str)}"
        )
    return sizes.pop()


def mix_batches(key: jax.Array, p: jax.Array, old: Batch, new: Batch) -> Batch:
    """Eq. 14: keep each example of ``old`` with probability ``p``, else take it from ``new``.

    Examples are indexed by the leading axis, shared by every leaf; the shape is fixed, so
    the mixing stays inside ``jit``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo.algorithms._hyperdistill import mix_batches
      >>> out = mix_batches(jax.random.PRNGKey(0), 0.0, {"x": jnp.zeros(4)}, {"x": jnp.ones(4)})
      >>> out["x"]
      Array([1., 1., 1., 1.], dtype=float32)
    """
    check_matches("train_batch (the distilled batch D* keeps its shape)", old, new)
    n = num_examples(new, "train_batch")
    keep = jax.random.bernoulli(key, p, (n,))

    def mix(a, b):
        mask = keep.reshape((n,) + (1,) * (jnp.ndim(a) - 1))
        return jnp.where(mask, a, b).astype(jnp.result_type(a))

    return jax.tree.map(mix, old, new)


def linear_estimation(
    inner: InnerStep,
    gamma: float,
    params: PyTree,
    inner_opt_state: PyTree,
    hyperparams: PyTree,
    train_batches: Batch,
    val_batch: Batch,
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    *,
    stored: bool,
    key: jax.Array | None,
    through_state: bool = True,
) -> ThetaFit:
    """Algorithm 4 (LinearEstimation) with λ frozen: forward and backward ``lax.scan``.

    Forward: ``(w_t, s_t) = Φ(w_{t-1}, s_{t-1}, λ; D_t)`` from ``(w_0, s_0)``, t = 1..T.
    Backward, t = T..1, ``s = T - t + 1``, at the point ``(ŵ_{t-1}, ŝ_{t-1})`` (DrMAD's
    interpolation ``ŵ_{t-1} = (1 - (t-1)/T) w_0 + ((t-1)/T) w_T``, or the stored trajectory
    when ``stored``)::

        g_SO += α B̂_t;  α ← α Â_t              (adjoint through the full (w, s) state)
        w*_s = p_s w*_{s-1} + (1 - p_s) ŵ_{t-1}   (Eq. 17, p_s = S_{s-1}/S_s)
        D*_s = D_T, or the mix of D*_{s-1} and D_t with probability p_s (Eq. 14)
        v_s = α_T ∂Φ(w*_s, ŝ_{T-1}, λ; D*_s)/∂λ,  x_s = ‖v_s‖ S_s,  y_s = (v_s/‖v_s‖)·g_SO

    and ``θ = (x·y)/(x·x)``. With ``through_state=False`` the adjoint skips the optimizer
    state: each step's Jacobian is taken with its state held fixed (``α ← α ∂w'/∂w``, the
    view the online step takes of ``∂Φ/∂λ``; for SGD with momentum, plain SGD's
    ``I - lr H``), so the momentum buffer's memory of earlier steps is left out of
    ``g_SO``. Each sample is what the online estimator of Algorithm 3 gives at
    the end of a window of ``s`` steps: the inner state and (undistilled) batch of the last
    step, ``s_{T-1}`` and ``D_T``. Where every ``v_s`` is zero the fit is undefined and
    ``theta`` is NaN (0/0; the caller decides).

    Cost: T steps forward, 2T VJPs backward (about 3T VJPs). Memory O(P) with interpolated
    points, O(T·P) with the stored trajectory.

    Returns:
      A :class:`ThetaFit`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gradhpo.core.inner import InnerStep
      >>> from gradhpo.algorithms._hyperdistill import linear_estimation
      >>> phi = InnerStep(optax.sgd(0.5))
      >>> train = lambda w, lam, b: 0.5 * jnp.sum(w**2) - jnp.sum(lam * w)
      >>> val = lambda w, lam, b: 0.5 * jnp.sum((w - 1.0) ** 2)
      >>> w0, lam = jnp.zeros(2), jnp.ones(2)
      >>> fit = linear_estimation(phi, 0.5, w0, phi.init(w0, lam), lam, jnp.zeros(3),
      ...     None, train, val, stored=False, key=None)
      >>> round(float(fit.theta), 6)  # A = γI: θ = 1 exactly
      1.0
    """
    T = leading_axis_length(train_batches, "train_batches")
    lam = hyperparams

    window = Stacked(train_batches)
    out, trajectory = inner.unroll(
        params, inner_opt_state, lam, window, train_loss_fn, trajectory=stored
    )
    w_T, s_T = out.params, out.inner_opt_state
    _, alpha_T, g_fo = validation_grads(val_loss_fn, w_T, lam, val_batch)

    def point(t, stored_point):  # (w_{t-1}, s_{t-1}) of step t
        if stored:
            return stored_point
        frac = (t - 1) / T  # DrMAD interpolation
        return tree_lerp(1 - frac, (params, inner_opt_state), (w_T, s_T))

    last = window.last()  # D_T
    s_last = point(T, jax.tree.map(lambda x: x[T - 1], trajectory))[1]  # ŝ_{T-1}
    dtype = jnp.result_type(*jax.tree.leaves(params))

    def backward(carry, xs):
        alpha_w, alpha_s, g_so, w_star, S_prev, D_star = carry
        t, batch, stored_point, subkey = xs
        w_prev, s_prev = point(t, stored_point)
        alpha_w, alpha_s, alpha_B = inner.state_vjp(
            w_prev, s_prev, lam, batch, train_loss_fn, alpha_w, alpha_s
        )
        if not through_state:  # the state held fixed: no adjoint flows through it
            alpha_s = jax.tree.map(jnp.zeros_like, alpha_s)
        g_so = tree_add(g_so, alpha_B)  # g_SO now covers the last s steps
        S_s, p_s = ema_weights(gamma, S_prev, backward=True)  # Eq. 17
        w_star = tree_lerp(p_s, w_star, w_prev)
        if key is not None:
            D_star = mix_batches(subkey, p_s, D_star, batch)
        v_s = inner.step_and_vjp(w_star, s_last, lam, D_star, train_loss_fn)[1](alpha_T)
        norm_v = tree_norm(v_s)
        x_s = norm_v * S_s
        y_s = jnp.where(norm_v > 0, tree_dot(v_s, g_so) / jnp.where(norm_v > 0, norm_v, 1), 0)
        carry = (alpha_w, alpha_s, g_so, w_star, S_s, D_star)
        return carry, (x_s.astype(dtype), y_s.astype(dtype))

    alpha_s0 = inner.zero_state_adjoint(s_T)
    g_so0 = jax.tree.map(jnp.zeros_like, lam)
    carry0 = (alpha_T, alpha_s0, g_so0, params, jnp.zeros((), dtype), last)
    keys = jax.random.split(key, T) if key is not None else jnp.zeros((T,))
    xs = (jnp.arange(1, T + 1), train_batches, trajectory, keys)
    carry, (x, y) = jax.lax.scan(backward, carry0, xs, reverse=True)
    x, y = x[::-1], y[::-1]  # order by horizon s = 1..T
    theta = jnp.dot(x, y) / jnp.dot(x, x)  # least squares through the origin
    return ThetaFit(theta, x, y, tree_add(g_fo, carry[2]))
