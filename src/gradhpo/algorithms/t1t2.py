"""T1-T2 with DARTS finite differences: the One-Step hypergradient without a second-order VJP.

After the inner step ``w_T = Φ(w_{T-1}, λ; D_T)`` the hypergradient is the One-Step target
(Luketina et al. 2016)::

    g = g_FO + α_T B_T,   g_FO = ∂L_val(w_T, λ)/∂λ,   α_T = ∇_w L_val(w_T, λ),
                          B_T = ∂Φ(w_{T-1}, λ)/∂λ

and ``α_T B_T`` is estimated in one of three ways (``fd``):

* ``"weights"`` — DARTS (Liu et al. 2019, Eq. 8). When Φ is an SGD step of size ξ on
  ``L_train``, ``Φ(w, λ) = w - ξ ∇_w L_train(w, λ)`` and ``α B = -ξ ∂_λ(α·∇_w L_train)``, a
  directional derivative of ``∇_λ L_train`` along α, taken by a central difference in the
  *weights*::

      α_T B_T ≈ -ξ [∇_λ L_train(w_{T-1} + εα_T, λ) - ∇_λ L_train(w_{T-1} - εα_T, λ)] / 2ε,
      ε = eps / ‖α_T‖₂   (eps = 0.01: the perturbation has norm 0.01)

  Two gradient evaluations whatever dim(λ); exact when ``∇_λ L_train`` is at most quadratic
  in w (per-parameter L2, for instance).
* ``"coordinates"`` — per coordinate: column i of ``B_T`` by a central difference of Φ in λ,
  ``(Φ(w, λ + h_i e_i) - Φ(w, λ - h_i e_i)) / 2h_i``, so element i of ``α_T B_T`` is
  ``α_T·`` that column. One pair of Φ evaluations per scalar of λ (batched with ``vmap`` in
  chunks), any Φ; exact when Φ is affine in λ.
* ``None`` — the exact VJP ``α_T B_T`` (the One-Step optimizer's computation).

References:
  Luketina, Berglund, Greff, Raiko. "Scalable Gradient-Based Tuning of Continuous
  Regularization Hyperparameters." ICML 2016 (T1-T2).
  Liu, Simonyan, Yang. "DARTS: Differentiable Architecture Search." ICLR 2019, Eq. 7-8.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from gradhpo.core._checks import positive_int
from gradhpo.core.base import Estimate, MemorylessOnlineOptimizer
from gradhpo.core.inner import validation_grads
from gradhpo.core.types import Batch, InnerOptimizer, LossFn, PyTree, UpdateFn
from gradhpo.utils.tree import tree_add, tree_dot, tree_norm, tree_scale

#: The finite-difference modes of :class:`T1T2Optimizer`.
FD_MODES = ("weights", "coordinates", None)
#: Default norm of the weight perturbation ``εα_T`` in weights mode (DARTS, Eq. 8).
DEFAULT_WEIGHTS_EPS = 0.01
#: Default number of coordinates of λ evaluated together (one ``vmap``) in coordinates mode.
DEFAULT_CHUNK_SIZE = 64

_OTHER_MODES = (
    'choose fd="coordinates" (a central difference of Φ per scalar of λ, any Φ, '
    "2·dim(λ) evaluations of Φ) or fd=None (the exact VJP, One-Step)"
)


def sgd_step_size(tx: optax.GradientTransformation) -> float | None:
    """The step size ξ if ``tx`` is plain SGD (``update(g) = -ξ g``), else ``None``.

    ``tx`` is probed with small concrete arrays, in float64: plain SGD keeps no array state
    (no momentum, no schedule counter) and maps two random gradients of very different
    scales, with random parameters, to ``-ξ`` times themselves with one and the same ξ (so
    it is linear, isotropic and ignores the parameters; clipping, weight decay and
    per-coordinate scaling are not plain SGD).

    Args:
      tx: an optax ``GradientTransformation``.

    Returns:
      ξ as a Python float, or ``None`` when ``tx`` is not recognisably plain SGD.

    Example:
      >>> import optax
      >>> from gradhpo.algorithms.t1t2 import sgd_step_size
      >>> sgd_step_size(optax.sgd(0.1)), sgd_step_size(optax.sgd(0.1, momentum=0.9))
      (0.1, None)

    References:
      Liu et al., ICLR 2019 (DARTS), Eq. 7: the virtual step ``w - ξ ∇_w L_train``.
    """
    rng = np.random.default_rng(0)
    shapes = {"a": (3,), "b": (2, 2)}
    with jax.enable_x64(True):
        try:
            w = {k: jnp.asarray(rng.normal(size=s)) for k, s in shapes.items()}
            state = tx.init(w)
            if jax.tree.leaves(state):
                return None
            xis = []
            for scale in (1e-3, 1e3):
                g = {k: jnp.asarray(scale * rng.normal(size=s)) for k, s in shapes.items()}
                u, _ = tx.update(g, state, w)
                if jax.tree.structure(u) != jax.tree.structure(g):
                    return None
                g_flat, u_flat = ravel_pytree(g)[0], ravel_pytree(u)[0]
                xi = -float(g_flat @ u_flat) / float(g_flat @ g_flat)
                if not np.allclose(np.asarray(u_flat), -xi * np.asarray(g_flat), rtol=1e-9, atol=0):
                    return None
                xis.append(xi)
        except Exception:  # a transformation that cannot run on the probe is not plain SGD
            return None
    if not math.isfinite(xis[0]) or not math.isclose(xis[0], xis[1], rel_tol=1e-9):
        return None
    return xis[0]


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    """``value`` as a finite float, > 0 (or >= 0); a ValueError that names ``name`` otherwise."""
    if isinstance(value, bool | str) or not hasattr(value, "__float__") or np.ndim(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return value


def _check_eps(eps: float, dtype) -> None:
    """``eps`` at least √(machine epsilon) of ``dtype``: below it round-off dominates."""
    smallest = float(jnp.finfo(dtype).eps) ** 0.5
    if eps < smallest:
        raise ValueError(
            f"eps = {eps:g} is below √(machine epsilon) of {jnp.dtype(dtype).name} "
            f"({smallest:.2g}): the finite difference would be mostly round-off (a "
            f"hypergradient orders of magnitude off); use eps in [{smallest:.2g}, 1]"
        )


class T1T2Optimizer(MemorylessOnlineOptimizer):
    """T1-T2 hypergradient ``g_FO + α_T B_T`` with ``α_T B_T`` by DARTS finite differences.

    One inner step ``w_T = Φ(w_{T-1}, λ; D_T)`` (T1), then one hyper-update with
    ``g = g_FO + α_T B_T`` (T2), where ``α_T = ∇_w L_val(w_T, λ)`` and ``B_T = ∂Φ/∂λ`` at the
    old weights with the inner optimizer state held fixed.
    ``fd`` chooses how ``α_T B_T`` is computed:

    * ``"weights"`` (default) — DARTS Eq. 8, a central difference of ``∇_λ L_train`` at
      ``w_{T-1} ± εα_T`` with ``ε = eps·max(1, RMS(w))/‖α_T‖`` (``eps = 0.01``)::

          α_T B_T ≈ -ξ [∇_λ L_train(w_{T-1} + εα_T) - ∇_λ L_train(w_{T-1} - εα_T)] / 2ε

      Two gradient evaluations (plus the normal inner step), whatever dim(λ). It needs the
      SGD step size ξ: inferred from a plain ``optax.sgd`` (see :func:`sgd_step_size`) or
      given as ``xi``; an ``update_fn`` must be ``w - ξ ∇_w L_train(w, λ; batch)`` and needs
      ``xi``. With ξ equal to Φ's step size the target is One-Step exactly. A different
      ``xi`` (allowed for any optax optimizer, as in DARTS, whose weights are trained with
      momentum SGD while the hypergradient uses a virtual plain SGD step of size ξ) targets
      ``g_FO + α_T ∂(w_{T-1} - ξ∇_w L_train)/∂λ``; ``xi=0`` is first-order DARTS
      (``g = g_FO``). An optimizer factory (λ inside the optimizer) or a stateful optax
      optimizer without ``xi`` is an error at construction.
    * ``"coordinates"`` — the per-coordinate formula: element i of ``α_T B_T`` is
      ``α_T·(Φ(w, s, λ + h_i e_i) - Φ(w, s, λ - h_i e_i)) / 2h_i`` with
      ``h_i = eps·max(1, |λ_i|)`` (``eps`` defaults to ``(machine epsilon)^(1/3)`` of λ's
      dtype: 6e-6 in float64, 5e-3 in float32, the step that balances truncation and
      round-off error). Any Φ (optax with state, factories, ``update_fn``); ``2·dim(λ)``
      evaluations of Φ, ``chunk_size`` coordinates at a time under one ``vmap`` (memory
      ``chunk_size`` inner steps), the chunks in a ``lax.map``.
    * ``None`` — the exact VJP, identical to
      :class:`~gradhpo.algorithms.baselines.OneStepOptimizer`.

    Args:
      inner_optimizer, outer_optimizer, update_fn: see
        :class:`~gradhpo.core.base.BilevelOptimizer`.
      fd: ``"weights"``, ``"coordinates"`` or ``None`` (see above).
      eps: weights mode: the norm of the weight perturbation ``εα_T`` (default 0.01, as
        in DARTS), relative to ``max(1, RMS(w))`` so that it cannot sink below the weights'
        round-off; coordinates mode: the relative step ``h_i / max(1, |λ_i|)`` (default
        ``cbrt(machine epsilon)``). Accepted range: ``[√(machine epsilon), 1]`` of the
        dtype (checked when the step is traced: ``[3.5e-4, 1]`` in float32,
        ``[1.5e-8, 1]`` in float64); not used by ``fd=None``.
      xi: weights mode only: the step size ξ of the SGD step the estimator differentiates
        (default: the step size of a plain ``optax.sgd`` inner optimizer). Required with
        ``update_fn``; must be >= 0.
      chunk_size: coordinates mode: how many coordinates of λ share one ``vmap`` (>= 1).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gradhpo import T1T2Optimizer
      >>> train = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(lam * w**2)
      >>> val = lambda w, lam, b: jnp.sum((w - b) ** 2)
      >>> opt = T1T2Optimizer(inner_optimizer=optax.sgd(0.1))  # DARTS, ξ = 0.1
      >>> state = opt.init(jnp.ones(2), jnp.ones(2))
      >>> opt.compute_hypergradient(state, jnp.ones(2), jnp.ones(2), train, val)
      Array([0.08, 0.08], dtype=float32)
      >>> T1T2Optimizer(optax.adam(1e-3))  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: fd="weights" (the default, ...) needs Φ to be a plain SGD step ...

    References:
      Luketina et al., ICML 2016 (T1-T2); Liu et al., ICLR 2019 (DARTS), Eq. 7-8.
    """

    def __init__(
        self,
        inner_optimizer: InnerOptimizer | None = None,
        outer_optimizer: optax.GradientTransformation | None = None,
        update_fn: UpdateFn | None = None,
        *,
        fd: str | None = "weights",
        eps: float | None = None,
        xi: float | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        super().__init__(inner_optimizer, outer_optimizer, update_fn)
        if fd not in FD_MODES:
            raise ValueError(f'fd must be "weights", "coordinates" or None, got {fd!r}')
        if eps is not None:
            eps = _positive("eps", eps)
            if eps > 1.0:
                raise ValueError(
                    f"eps must be in (0, 1] (a relative finite-difference step; above 1 the "
                    f"difference is no longer local), got {eps}"
                )
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer):
            raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
        chunk_size = positive_int("chunk_size", chunk_size)
        if xi is not None:
            if fd != "weights":
                raise ValueError(
                    f"xi (the SGD step size of DARTS' weight-space difference) applies to "
                    f'fd="weights" only; fd={fd!r} differentiates the actual inner step'
                )
            xi = _positive("xi", xi, allow_zero=True)
        self.fd = fd
        self._eps_given = eps is not None
        self.chunk_size = int(chunk_size)
        if fd == "weights":
            self.xi = self._weights_mode_xi(xi)
            self.eps = DEFAULT_WEIGHTS_EPS if eps is None else eps
        else:
            self.xi = None
            self.eps = eps

    def _weights_mode_xi(self, xi: float | None) -> float:
        """ξ for weights mode: inferred from plain ``optax.sgd`` or given; else a clear error."""
        kind = self.inner.kind
        if kind == "factory":
            raise ValueError(
                'fd="weights" (the default) cannot be used with an inner_optimizer factory '
                "(hyperparams -> GradientTransformation): λ enters Φ through the optimizer, "
                "which the weight-space difference of ∇_λ L_train cannot see; " + _OTHER_MODES
            )
        if xi is not None:
            return xi
        if kind == "update_fn":
            raise ValueError(
                'fd="weights" (the default) with an update_fn needs its SGD step size: pass '
                "xi=ξ when update_fn(w, λ, batch) = w - ξ ∇_w L_train(w, λ; batch); otherwise "
                + _OTHER_MODES
            )
        xi = sgd_step_size(self.inner_optimizer)
        if xi is None:
            raise ValueError(
                'fd="weights" (the default, DARTS Eq. 8) needs Φ to be a plain SGD step of '
                "known size ξ on L_train (optax.sgd without momentum or schedule, or an "
                "update_fn with xi=ξ), and this inner optimizer is not (it keeps state, or its "
                "update is not -ξ·gradient). Choose the mode explicitly: "
                + _OTHER_MODES
                + "; or keep the weight-space difference as DARTS does, through a virtual SGD "
                "step of size ξ while this optimizer trains the weights, by passing xi=ξ"
            )
        return xi

    def _estimate_step(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn):
        w, s, lam = state.params, state.inner_opt_state, state.hyperparams
        if self.fd is None:
            new, vjp_B = self.inner.step_and_vjp(w, s, lam, train_batch, train_loss_fn)
        else:
            new = self.inner(w, s, lam, train_batch, train_loss_fn)
        val_loss, alpha, g_fo = validation_grads(val_loss_fn, new.params, lam, val_batch)
        if self.fd is None:
            alpha_B = vjp_B(alpha)
        elif self.fd == "weights":
            alpha_B = self._alpha_B_weights(w, lam, train_batch, train_loss_fn, alpha)
        else:
            alpha_B = self._alpha_B_coordinates(w, s, lam, train_batch, train_loss_fn, alpha)
        hypergrad = tree_add(g_fo, alpha_B)
        return Estimate(hypergrad, new.params, new.inner_opt_state, new.train_loss, val_loss)

    def _alpha_B_weights(
        self, w: PyTree, lam: PyTree, batch: Batch, train_loss_fn: LossFn, alpha: PyTree
    ) -> PyTree:
        """DARTS Eq. 8: ``-ξ [∇_λ L_train(w + εα) - ∇_λ L_train(w - εα)] / 2ε``."""
        if self.xi == 0.0:  # first-order DARTS: no second-order term
            return jax.tree.map(jnp.zeros_like, lam)
        dtype = jnp.result_type(*jax.tree.leaves(w))
        base = self.eps
        if not self._eps_given:  # DARTS' 0.01, or cbrt(machine epsilon) where larger (f16)
            base = max(base, float(jnp.finfo(dtype).eps) ** (1 / 3))
        _check_eps(base, dtype)
        # The perturbation's norm: eps, or eps·RMS(w) where the weights are larger than 1,
        # so that it never sinks below the weights' round-off.
        size = sum(x.size for x in jax.tree.leaves(w))
        scale = jnp.maximum(1.0, tree_norm(w) / math.sqrt(max(size, 1)))
        norm_alpha = tree_norm(alpha)
        eps = base * scale / jnp.where(norm_alpha > 0, norm_alpha, 1)  # ε = 0.01 / ‖α_T‖
        w_plus = jax.tree.map(lambda x, a: (x + eps * a).astype(x.dtype), w, alpha)
        w_minus = jax.tree.map(lambda x, a: (x - eps * a).astype(x.dtype), w, alpha)

        def train_loss_difference(lam):  # its λ-gradient is the difference of ∇_λ L_train
            return train_loss_fn(w_plus, lam, batch) - train_loss_fn(w_minus, lam, batch)

        grad_difference = jax.grad(train_loss_difference)(lam)
        return tree_scale(-self.xi / (2 * eps), grad_difference)

    def _alpha_B_coordinates(
        self,
        w: PyTree,
        s: PyTree,
        lam: PyTree,
        batch: Batch,
        train_loss_fn: LossFn,
        alpha: PyTree,
    ) -> PyTree:
        """Element i: ``α·(Φ(w, s, λ + h_i e_i) - Φ(w, s, λ - h_i e_i)) / 2h_i``, chunked."""
        lam_flat, unravel = ravel_pytree(lam)
        n = lam_flat.size
        eps = self.eps
        if eps is None:  # balances truncation (∝ h²) and round-off (∝ machine eps / h)
            eps = float(jnp.finfo(lam_flat.dtype).eps) ** (1 / 3)
        _check_eps(eps, lam_flat.dtype)
        h = eps * jnp.maximum(1, jnp.abs(lam_flat))
        lam_plus, lam_minus = lam_flat + h, lam_flat - h
        two_h = lam_plus - lam_minus  # the step actually taken, exactly representable

        def phi(lam_i_flat):
            return self.inner(w, s, unravel(lam_i_flat), batch, train_loss_fn).params

        def alpha_B_i(i):
            phi_plus = phi(lam_flat.at[i].set(lam_plus[i]))
            phi_minus = phi(lam_flat.at[i].set(lam_minus[i]))
            return tree_dot(alpha, jax.tree.map(jnp.subtract, phi_plus, phi_minus)) / two_h[i]

        batch_size = min(self.chunk_size, n)
        alpha_B = jax.lax.map(alpha_B_i, jnp.arange(n), batch_size=batch_size)
        return unravel(alpha_B.astype(lam_flat.dtype))
