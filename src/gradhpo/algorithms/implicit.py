"""Implicit differentiation at an approximate inner optimum (IFT), by CG or a Neumann series.

At a stationary point ``∇_w L_train(w*, λ) = 0`` the implicit function theorem gives
``dw*/dλ = -H⁻¹ ∂_λ∇_w L_train`` with ``H = ∇²_w L_train(w*, λ)``, so::

    g = ∂L_val/∂λ - (∂_λ∇_w L_train)ᵀ v,     H v = α = ∇_w L_val(w*, λ).

``v`` comes from conjugate gradient on ``H v = α`` (H symmetric; positive definite at a
strict minimum), from the truncated Neumann series ``v ≈ η Σ_{j=0..K} (I - ηH)^j α``
(the papers' N.IFT(K); needs ``0 < η < 2/λ_max(H)``), or from a user's
``solve(matvec, b)``. Hessian-vector products are forward-over-reverse
(``jax.jvp`` of ``jax.grad``); the mixed term is one VJP of ``λ ↦ ∇_w L_train(w*, λ)``.
Memory O(P + H) for every solver.

It differentiates the optimum, not the optimizer: λ must enter ``L_train`` (a weight
decay, example weights), not the inner optimizer (a learning rate does not move ``w*``).

References:
  Pedregosa. "Hyperparameter optimization with approximate gradient." ICML 2016 (CG).
  Lorraine, Vicol, Duvenaud. "Optimizing Millions of Hyperparameters by Implicit
  Differentiation." AISTATS 2020 (Neumann series).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from gradhpo.core._checks import positive_int
from gradhpo.core.base import Estimate, WindowOptimizer
from gradhpo.core.inner import check_matches, scalar_loss, validation_grads
from gradhpo.core.types import Batch, InnerOptimizer, LossFn, PyTree, UpdateFn
from gradhpo.utils.tree import tree_add, tree_scale

__all__ = ["ImplicitOptimizer", "implicit_hypergradient"]

SOLVERS = ("cg", "neumann")


def _check_solver(solver: Any, solver_steps: Any, neumann_lr: Any, tol: Any):
    if not (solver in SOLVERS or callable(solver)):
        raise ValueError(
            f'solver must be "cg", "neumann" or a function solve(matvec, b) -> x, got {solver!r}'
        )
    solver_steps = positive_int("solver_steps", solver_steps)
    if solver == "neumann" and (
        neumann_lr is None
        or isinstance(neumann_lr, bool)
        or not isinstance(neumann_lr, numbers.Real)
        or not neumann_lr > 0
    ):
        raise ValueError(
            'solver="neumann" needs neumann_lr, the step η > 0 of the series '
            f"η Σ (I - ηH)^j (it converges for η < 2/λ_max(H)), got {neumann_lr!r}"
        )
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    return solver_steps


def _neumann(matvec: Callable, b: PyTree, steps: int, eta: float) -> PyTree:
    """``η Σ_{j=0..K} (I - ηH)^j b`` with K = ``steps`` Hessian-vector products."""

    def term(_, carry):
        p, total = carry
        p = jax.tree.map(lambda p_, Hp: p_ - eta * Hp, p, matvec(p))  # p ← (I - ηH) p
        return p, tree_add(total, p)

    _, total = jax.lax.fori_loop(0, steps, term, (b, b))
    return tree_scale(eta, total)


def implicit_hypergradient(
    params: PyTree,
    hyperparams: PyTree,
    train_batch: Batch,
    val_batch: Batch,
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    *,
    solver: str | Callable = "cg",
    solver_steps: int = 20,
    neumann_lr: float | None = None,
    tol: float = 1e-10,
) -> PyTree:
    """The implicit (IFT) hypergradient at ``params``, taken as the inner optimum ``w*``.

    ``g = ∂L_val/∂λ - (∂_λ∇_w L_train)ᵀ H⁻¹ ∇_w L_val`` at ``(w*, λ)``, with ``H⁻¹α`` by
    conjugate gradient, the Neumann series or ``solver``.

    Args:
      params: ``w*``, an (approximate) minimiser of ``L_train(·, λ)``.
      hyperparams: λ.
      train_batch: the batch of ``L_train`` (the whole training set for an exact optimum).
      val_batch: the batch of ``L_val``.
      train_loss_fn, val_loss_fn: ``loss(params, hyperparams, batch) -> scalar``.
      solver: ``"cg"`` (``jax.scipy.sparse.linalg.cg``: H must be positive definite),
        ``"neumann"`` (``η Σ_{j=0..K} (I - ηH)^j``), or ``solve(matvec, b) -> x``.
      solver_steps: K ≥ 1: CG iterations at most, or Neumann terms after the first.
      neumann_lr: η of the Neumann series (required with ``"neumann"``).
      tol: CG's relative residual tolerance.

    Returns:
      A pytree shaped like ``hyperparams``. Jittable (the configuration is static).

    Example:
      >>> import jax.numpy as jnp, gradhpo
      >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)  # w* = λ
      >>> val = lambda w, lam, b: 0.5 * jnp.sum((w - 2.0) ** 2)
      >>> lam = jnp.ones(2)
      >>> gradhpo.implicit_hypergradient(lam, lam, None, None, train, val)  # w* - 2
      Array([-1., -1.], dtype=float32)

    References:
      Pedregosa, ICML 2016; Lorraine, Vicol, Duvenaud, AISTATS 2020.
    """
    solver_steps = _check_solver(solver, solver_steps, neumann_lr, tol)
    hypergrad, _ = _implicit(
        params,
        hyperparams,
        train_batch,
        val_batch,
        train_loss_fn,
        val_loss_fn,
        solver,
        solver_steps,
        neumann_lr,
        tol,
    )
    return hypergrad


@partial(jax.jit, static_argnums=(4, 5, 6, 7, 8, 9))
def _implicit(w, lam, D, V, train_loss_fn, val_loss_fn, solver, steps, eta, tol):
    train_loss_fn = scalar_loss("train_loss_fn", train_loss_fn)
    val_loss, alpha, g_FO = validation_grads(val_loss_fn, w, lam, V)

    def grad_w(w, lam):  # ∇_w L_train(w, λ)
        return jax.grad(train_loss_fn)(w, lam, D)

    def hvp(v):  # H v, forward-over-reverse
        return jax.jvp(lambda w_: grad_w(w_, lam), (w,), (v,))[1]

    if solver == "cg":
        v, _ = jax.scipy.sparse.linalg.cg(hvp, alpha, maxiter=steps, tol=tol)
    elif solver == "neumann":
        v = _neumann(hvp, alpha, steps, eta)
    else:
        v = solver(hvp, alpha)
        check_matches("solver(matvec, b)", alpha, v)
    _, vjp_mixed = jax.vjp(lambda lam_: grad_w(w, lam_), lam)
    (mixed,) = vjp_mixed(v)  # (∂_λ∇_w L_train)ᵀ v
    return jax.tree.map(jnp.subtract, g_FO, mixed), val_loss


class ImplicitOptimizer(WindowOptimizer):
    """``unroll_steps`` inner steps towards ``w*``, then the implicit (IFT) hypergradient there.

    Each :meth:`step` takes T inner steps with λ fixed (nothing stored, nothing
    differentiated), takes ``w_T`` as the inner optimum and updates λ once with
    :func:`implicit_hypergradient` at ``w_T`` — on the window's last training batch and the
    validation batch. Memory O(P + H); cost T gradient evaluations and ``solver_steps``
    Hessian-vector products.

    Args:
      inner_optimizer: an ``optax.GradientTransformation`` (a factory
        ``hyperparams -> GradientTransformation`` is refused: the IFT differentiates the
        optimum, which the optimizer's hyperparameters do not move).
      outer_optimizer: the ``optax.GradientTransformation`` of λ (required).
      unroll_steps: the inner steps T ≥ 1 towards ``w*`` per hyper-update.
      solver: ``"cg"``, ``"neumann"`` or ``solve(matvec, b) -> x``.
      solver_steps: K ≥ 1, CG iterations or Neumann terms (N.IFT(K)).
      neumann_lr: η of the Neumann series (required with ``"neumann"``; the inner SGD
        learning rate is the papers' choice).
      tol: CG's relative residual tolerance.
      update_fn: instead of ``inner_optimizer``, a custom inner step (keyword only); λ
        should enter it only through ``L_train``.

    Example:
      >>> import jax.numpy as jnp, optax, gradhpo
      >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)
      >>> val = lambda w, lam, b: 0.5 * jnp.sum((w - 2.0) ** 2)
      >>> opt = gradhpo.ImplicitOptimizer(optax.sgd(0.5), optax.sgd(1.0), unroll_steps=30,
      ...                                 solver="neumann", solver_steps=40, neumann_lr=0.5)
      >>> state = opt.init(jnp.zeros(1), jnp.ones(1))
      >>> opt.compute_hypergradient(state, None, None, train, val)  # w* - 2 at w* = λ
      Array([-1.], dtype=float32)

    References:
      Pedregosa, ICML 2016 (CG); Lorraine, Vicol, Duvenaud, AISTATS 2020 (Neumann).
    """

    def __init__(
        self,
        inner_optimizer: InnerOptimizer | None = None,
        outer_optimizer: optax.GradientTransformation | None = None,
        unroll_steps: int = 1,
        solver: str | Callable = "cg",
        solver_steps: int = 20,
        *,
        neumann_lr: float | None = None,
        tol: float = 1e-10,
        update_fn: UpdateFn | None = None,
    ):
        super().__init__(inner_optimizer, outer_optimizer, unroll_steps, update_fn=update_fn)
        if self.inner.kind == "factory":
            raise ValueError(
                "ImplicitOptimizer differentiates the inner optimum w*(λ), so λ must enter "
                "L_train; a hyperparams -> GradientTransformation factory makes λ a "
                "hyperparameter of the optimizer (a learning rate does not move w*). Give an "
                "optax GradientTransformation, or use ReverseModeOptimizer for optimizer "
                "hyperparameters"
            )
        self.solver_steps = _check_solver(solver, solver_steps, neumann_lr, tol)
        self.solver, self.neumann_lr, self.tol = solver, neumann_lr, tol

    def _estimate_window(self, state, window, val_window, train_loss_fn, val_loss_fn):
        lam = state.hyperparams
        out, _ = self.inner.unroll(state.params, state.inner_opt_state, lam, window, train_loss_fn)
        hypergrad, val_loss = _implicit(
            out.params,
            lam,
            window.last(),
            val_window.last(),
            train_loss_fn,
            val_loss_fn,
            self.solver,
            self.solver_steps,
            self.neumann_lr,
            self.tol,
        )
        return Estimate(
            hypergrad,
            out.params,
            out.inner_opt_state,
            out.train_loss,
            val_loss,
            num_steps=self.unroll_steps,
        )
