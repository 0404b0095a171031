"""The inner step Φ, built once from an optax optimizer, a factory or an ``update_fn``.

Every algorithm and every exact reference advances the weights through :class:`InnerStep`,
so they all see the same Φ: ``(w_{t-1}, s_{t-1}) ↦ (w_t, s_t)`` with one evaluation of the
training gradient per step, the optax state advanced exactly as a plain optax loop would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradhpo.core.batches import Stacked
from gradhpo.core.checkpoint import (
    MIXED_MODE_NEEDS_OPTIMIZER,
    Checkpoint,
    check_checkpoint,
    mixed_value_and_grad,
    remat_scan,
)
from gradhpo.core.types import Batch, InnerOptimizer, LossFn, PyTree, UpdateFn
from gradhpo.utils.tree import all_finite, is_inexact


def check_scalar(name: str, value: Any) -> None:
    """Raise unless ``value`` is a real floating-point scalar (checked at trace time).

    A ``(loss, aux)`` pair, an integer, boolean or complex loss, or an array of another
    shape is a clear error naming ``name``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.core.inner import check_scalar
      >>> check_scalar("val_loss_fn", jnp.float32(1.0))
      >>> check_scalar("val_loss_fn", (jnp.float32(1.0), {}))  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      TypeError: val_loss_fn must return a scalar loss, got a tuple ...
    """
    if isinstance(value, tuple | list | dict):
        raise TypeError(
            f"{name} must return a scalar loss, got a {type(value).__name__} (a (loss, aux) "
            "pair? return the loss alone and compute auxiliary values outside)"
        )
    try:
        dtype = jnp.result_type(value)
    except TypeError:
        raise TypeError(
            f"{name} must return a scalar loss (a float array), got {type(value).__name__}"
        ) from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{name} must return a real floating-point loss (it is differentiated), got "
            f"dtype {dtype}"
        )
    if jnp.shape(value) != ():
        raise ValueError(
            f"{name} must return a scalar loss, got an array of shape {jnp.shape(value)}"
        )


def scalar_loss(name: str, loss_fn: LossFn) -> LossFn:
    """Wrap ``loss_fn`` so a non-scalar result is a ValueError naming ``name`` (at trace time)."""

    def checked(params, hyperparams, batch):
        loss = loss_fn(params, hyperparams, batch)
        check_scalar(name, loss)
        return loss

    return checked


def check_matches(name: str, expected: PyTree, got: PyTree) -> None:
    """Raise a ValueError unless ``got`` has the structure and leaf shapes of ``expected``."""
    expected_def, got_def = jax.tree.structure(expected), jax.tree.structure(got)
    if expected_def != got_def:
        raise ValueError(f"{name} must have the pytree structure {expected_def}, got {got_def}")
    for (path, e), g in zip(
        jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got), strict=True
    ):
        if jnp.shape(e) != jnp.shape(g):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} must have shape {jnp.shape(e)}, "
                f"got {jnp.shape(g)}"
            )


_INJECTED = tuple(
    getattr(optax, name)
    for name in ("InjectHyperparamsState", "InjectStatefulHyperparamsState")
    if hasattr(optax, name)
)


def _is_injected(node: Any) -> bool:
    return isinstance(node, _INJECTED)


def injected(state: PyTree, tx: optax.GradientTransformation, params: PyTree) -> PyTree:
    """``state`` with the hyperparameters of every ``optax.inject_hyperparams`` node renewed.

    ``optax.inject_hyperparams`` reads its numeric hyperparameters from its state, set once
    by ``init``; a factory ``λ -> optimizer`` rebuilt at every step would otherwise change
    nothing (and give a zero hypergradient). The values are taken from ``tx.init`` of the
    optimizer just built from λ, so they are the factory's, differentiably; schedules
    inside are still evaluated by optax from the step count.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gradhpo.core.inner import injected
      >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
      >>> state = tx.init(jnp.zeros(2))
      >>> new = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
      >>> float(injected(state, new, jnp.zeros(2)).hyperparams["learning_rate"])
      0.5
    """
    if not any(_is_injected(n) for n in jax.tree.leaves(state, is_leaf=_is_injected)):
        return state
    fresh = tx.init(params)
    return jax.tree.map(
        lambda old, new: old._replace(hyperparams=new.hyperparams) if _is_injected(old) else old,
        state,
        fresh,
        is_leaf=_is_injected,
    )


class InnerResult(NamedTuple):
    """What one inner step returns."""

    params: PyTree
    inner_opt_state: PyTree
    train_loss: jax.Array


class InnerStep:
    """The inner step Φ(w, s, λ; D) of a bilevel problem.

    Built from exactly one of:

    * ``inner_optimizer`` an ``optax.GradientTransformation``: ``g = ∇_w L_train(w, λ; D)``,
      ``(u, s') = tx.update(g, s, w)``, ``w' = w + u``; λ enters through ``L_train`` only;
    * ``inner_optimizer`` a function ``hyperparams -> GradientTransformation``: the same, with
      the optimizer rebuilt from λ at every step, so its learning rate, momentum or weight
      decay are differentiable hyperparameters;
    * ``update_fn(w, λ, batch) -> w'``: any custom step (no optimizer state).

    Args:
      inner_optimizer: an optax transformation or a factory of one.
      update_fn: a custom inner step.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from gradhpo.core.inner import InnerStep
      >>> phi = InnerStep(optax.sgd(0.5))
      >>> loss = lambda w, lam, batch: 0.5 * jnp.sum(lam * w**2)
      >>> w = jnp.ones(2); lam = jnp.array([1.0, 2.0])
      >>> phi(w, phi.init(w, lam), lam, None, loss).params
      Array([0.5, 0. ], dtype=float32)
    """

    def __init__(
        self,
        inner_optimizer: InnerOptimizer | None = None,
        update_fn: UpdateFn | None = None,
    ):
        if inner_optimizer is None and update_fn is None:
            raise ValueError(
                "give the inner step: inner_optimizer (an optax GradientTransformation, or a "
                "function hyperparams -> GradientTransformation) or update_fn(params, "
                "hyperparams, batch) -> new_params; got neither"
            )
        if inner_optimizer is not None and update_fn is not None:
            raise ValueError("give either inner_optimizer or update_fn, not both")
        if isinstance(inner_optimizer, optax.GradientTransformation):
            self.kind = "optax"
        elif inner_optimizer is not None:
            if not callable(inner_optimizer):
                raise TypeError(
                    "inner_optimizer must be an optax GradientTransformation or a function "
                    f"hyperparams -> GradientTransformation, got {type(inner_optimizer).__name__}"
                )
            self.kind = "factory"
        else:
            if not callable(update_fn):
                raise TypeError(f"update_fn must be callable, got {type(update_fn).__name__}")
            self.kind = "update_fn"
        self.inner_optimizer = inner_optimizer
        self.update_fn = update_fn
        self._probed: dict = {}  # singular_at_zero_gradient's verdicts, by problem shape

    def transformation(self, hyperparams: PyTree) -> optax.GradientTransformation:
        """The optax transformation in use for ``hyperparams`` (not for ``update_fn``)."""
        if self.kind == "optax":
            return self.inner_optimizer
        tx = self.inner_optimizer(hyperparams)
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                "inner_optimizer(hyperparams) must return an optax GradientTransformation, "
                f"got {type(tx).__name__}"
            )
        return tx

    def init(self, params: PyTree, hyperparams: PyTree) -> PyTree:
        """The initial inner optimizer state (``None`` for an ``update_fn``)."""
        if self.kind == "update_fn":
            return None
        return self.transformation(hyperparams).init(params)

    def singular_at_zero_gradient(self, params: PyTree, hyperparams: PyTree) -> bool:
        """Whether the optimizer's update has an infinite derivative at a zero gradient.

        ``optax.adam`` (and every optimizer dividing by ``sqrt(ν)``) with ``eps_root=0``
        does: ``sqrt'(0)`` is infinite, so a hypergradient that differentiates through
        the update is NaN wherever a gradient entry is exactly zero (dead ReLUs, unused
        weights, the first step from zero). Probed concretely (at trace time too) on zeros
        shaped like ``params`` (at most 2 per axis) with λ = 0: one forward-mode
        derivative of ``update``, compiled once per problem shape as the small program
        ``_singularity_probe``.

        Example:
          >>> import jax.numpy as jnp, optax
          >>> from gradhpo.core.inner import InnerStep
          >>> InnerStep(optax.adam(0.1)).singular_at_zero_gradient(jnp.ones(3), None)
          True
          >>> InnerStep(optax.adam(0.1, eps_root=1e-12)).singular_at_zero_gradient(
          ...     jnp.ones(3), None)
          False
        """
        if self.kind == "update_fn":
            return False

        def zeros(tree, shrink):
            def leaf(x):
                shape = tuple(min(d, 2) for d in jnp.shape(x)) if shrink else jnp.shape(x)
                return np.zeros(shape, jnp.result_type(x))

            return jax.tree.map(leaf, tree)

        w, lam = zeros(params, True), zeros(hyperparams, False)
        key = tuple((x.shape, x.dtype) for x in jax.tree.leaves((w, lam)))
        key = (jax.tree.structure((w, lam)), key)
        if key not in self._probed:  # once per problem shape: one small program

            def _singularity_probe(w, lam):
                tx = self.transformation(lam)
                state = tx.init(w)
                ones = jax.tree.map(jnp.ones_like, w)
                _, tangent = jax.jvp(lambda g: tx.update(g, state, w)[0], (w,), (ones,))
                return jnp.logical_not(all_finite(tangent))

            try:  # compiled and run directly: nothing joins a program being traced
                compiled = jax.jit(_singularity_probe).lower(w, lam).compile()
                self._probed[key] = bool(compiled(w, lam))
            except Exception:  # an optimizer that needs more (extra arguments): no verdict
                self._probed[key] = False
        return self._probed[key]

    def __call__(
        self, params, inner_opt_state, hyperparams, batch, train_loss_fn, *, mixed_mode=False
    ) -> InnerResult:
        """One inner step: ``(w_t, s_t, L_train(w_{t-1}, λ; D_t))``.

        With ``mixed_mode=True`` the training gradient is differentiated in mixed mode
        (:func:`~gradhpo.core.checkpoint.mixed_value_and_grad`): the same values, a
        backward pass that stores less.
        """
        if self.kind == "update_fn":
            if mixed_mode:
                raise ValueError(MIXED_MODE_NEEDS_OPTIMIZER)
            loss = train_loss_fn(params, hyperparams, batch)
            check_scalar("train_loss_fn", loss)
            new_params = self.update_fn(params, hyperparams, batch)
            check_matches("update_fn(params, hyperparams, batch)", params, new_params)
            return InnerResult(new_params, inner_opt_state, loss)
        loss_fn = scalar_loss("train_loss_fn", train_loss_fn)
        if mixed_mode:
            loss, grads = mixed_value_and_grad(loss_fn, params, hyperparams, batch)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(params, hyperparams, batch)
        tx = self.transformation(hyperparams)
        if self.kind == "factory":
            inner_opt_state = injected(inner_opt_state, tx, params)
        updates, new_state = tx.update(grads, inner_opt_state, params)
        return InnerResult(optax.apply_updates(params, updates), new_state, loss)

    def unroll(
        self,
        params: PyTree,
        inner_opt_state: PyTree,
        hyperparams: PyTree,
        window: Stacked | Batch,
        train_loss_fn: LossFn,
        *,
        checkpoint: Checkpoint = None,
        checkpoint_every: int | None = None,
        mixed_mode: bool = False,
        trajectory: bool = False,
    ) -> tuple[InnerResult, PyTree]:
        """The k steps of a window, ``(w_t, s_t) = Φ(w_{t-1}, s_{t-1}, λ; D_t)``, in one scan.

        The one unrolled loop of Φ in gradhpo: exact and truncated reverse mode
        (:class:`~gradhpo.ReverseModeOptimizer`, :func:`~gradhpo.reverse_hypergradient`)
        differentiate through it, HyperDistill's θ estimation and DrMAD run their forward
        pass on it.

        Args:
          params, inner_opt_state, hyperparams: ``(w_0, s_0, λ)``.
          window: a :class:`~gradhpo.Stacked` window (one batch per step, or a repeat);
            a plain pytree is read as batches already stacked along a leading step axis.
          train_loss_fn: ``L_train(params, hyperparams, batch) -> scalar``.
          checkpoint: the memory strategy of reverse mode through the scan: ``None``
            (store everything), ``"step"``, ``"sqrt"``, ``"binomial"`` or a segment
            length K (:mod:`gradhpo.core.checkpoint`); the values and derivatives are the
            same for every strategy.
          checkpoint_every: the older spelling of ``checkpoint=K``.
          mixed_mode: differentiate each step's training gradient in mixed mode
            (forward-over-reverse Hessian-vector products; combines with ``checkpoint``).
          trajectory: also return the points ``(w_{t-1}, s_{t-1})`` of every step, stacked
            (only with ``checkpoint=None``).

        Returns:
          ``(InnerResult(w_k, s_k, L_train of the last step), points or None)``.

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> phi = gradhpo.InnerStep(optax.sgd(0.5))
          >>> def loss(w, lam, batch):
          ...     return 0.5 * jnp.sum((w - lam) ** 2)
          >>> w0, lam = jnp.zeros(1), jnp.ones(1)
          >>> out, _ = phi.unroll(w0, phi.init(w0, lam), lam, gradhpo.Stacked.repeat(None, 3),
          ...                     loss, checkpoint="sqrt")
          >>> out.params  # 1 - 0.5**3
          Array([0.875], dtype=float32)
        """
        if not isinstance(window, Stacked):
            window = Stacked(window)
        checkpoint = check_checkpoint(checkpoint, checkpoint_every)
        if checkpoint is not None and trajectory:
            raise ValueError("checkpoint and trajectory exclude each other")

        def body(carry, batch):
            w, s, _ = carry
            out = self(w, s, hyperparams, batch, train_loss_fn, mixed_mode=mixed_mode)
            loss = jnp.asarray(out.train_loss, carry[2].dtype)
            return (out.params, out.inner_opt_state, loss), (w, s) if trajectory else None

        dtype = jnp.result_type(*jax.tree.leaves(params))
        carry = (params, inner_opt_state, jnp.full((), jnp.nan, dtype))
        if trajectory:
            carry, points = window.scan(body, carry)
            return InnerResult(*carry), points
        return InnerResult(*remat_scan(body, carry, window, checkpoint)), None

    def state_vjp(
        self,
        params: PyTree,
        inner_opt_state: PyTree,
        hyperparams: PyTree,
        batch: Batch,
        train_loss_fn: LossFn,
        alpha_w: PyTree,
        alpha_s: list,
    ) -> tuple[PyTree, list, PyTree]:
        """One adjoint step through the full state: ``(α_w, α_s) ↦ (α A^w, α A^s, α B)``.

        One VJP of ``(w, s, λ) ↦ (w', s')`` at ``(params, inner_opt_state, hyperparams)``.
        Only the floating-point leaves of the optimizer state carry an adjoint (integer step
        counters depend on neither w nor λ); ``alpha_s`` is the list of their adjoints, as
        :meth:`zero_state_adjoint` makes it.

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> phi = gradhpo.InnerStep(optax.sgd(0.5))
          >>> loss = lambda w, lam, b: 0.5 * jnp.sum(lam * w**2)
          >>> w, lam = jnp.ones(2), jnp.array([1.0, 2.0])
          >>> s = phi.init(w, lam)
          >>> a_w, _, a_B = phi.state_vjp(w, s, lam, None, loss, jnp.ones(2),
          ...                             phi.zero_state_adjoint(s))
          >>> a_w, a_B  # A = 1 - 0.5 λ, B = -0.5 w
          (Array([0.5, 0. ], dtype=float32), Array([-0.5, -0.5], dtype=float32))
        """
        s_float, rebuild = self.split_state(inner_opt_state)

        def phi(w, s_float, lam):
            out = self(w, rebuild(s_float), lam, batch, train_loss_fn)
            return out.params, self.split_state(out.inner_opt_state)[0]

        _, vjp_fn = jax.vjp(phi, params, s_float, hyperparams)
        return vjp_fn((alpha_w, alpha_s))

    @staticmethod
    def split_state(inner_opt_state: PyTree) -> tuple[list, Callable[[list], PyTree]]:
        """The floating-point leaves of an optimizer state, and the state rebuilt from new ones.

        Derivatives flow through the float leaves only; integer leaves (step counters) are
        kept as they are in ``inner_opt_state``.

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> s = optax.adam(0.1).init(jnp.ones(2))
          >>> floats, rebuild = gradhpo.InnerStep.split_state(s)
          >>> len(floats), int(rebuild(floats)[0].count)  # mu, nu; the counter is kept
          (2, 0)
        """
        leaves, treedef = jax.tree.flatten(inner_opt_state)

        def rebuild(new_floats: list) -> PyTree:
            it = iter(new_floats)
            return treedef.unflatten([next(it) if is_inexact(x) else x for x in leaves])

        return [x for x in leaves if is_inexact(x)], rebuild

    @staticmethod
    def zero_state_adjoint(inner_opt_state: PyTree) -> list:
        """The zero adjoint of the floating-point leaves of an optimizer state (a list).

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> gradhpo.InnerStep.zero_state_adjoint(optax.sgd(0.1, momentum=0.9).init(jnp.ones(3)))
          [Array([0., 0., 0.], dtype=float32)]
        """
        return [jnp.zeros_like(x) for x in InnerStep.split_state(inner_opt_state)[0]]

    def step_and_vjp(
        self,
        params: PyTree,
        inner_opt_state: PyTree,
        hyperparams: PyTree,
        batch: Batch,
        train_loss_fn: LossFn,
    ) -> tuple[InnerResult, Callable[[PyTree], PyTree]]:
        """One inner step and the VJP ``α ↦ α B_t`` with ``B_t = ∂w_t/∂λ`` at fixed ``(w, s)``.

        The training gradient is evaluated once: the step is the forward pass of the VJP.

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> phi = gradhpo.InnerStep(optax.sgd(0.5))
          >>> def loss(w, lam, batch):
          ...     return 0.5 * jnp.sum(lam * w**2)
          >>> w, lam = jnp.ones(2), jnp.array([1.0, 2.0])
          >>> out, vjp_B = phi.step_and_vjp(w, phi.init(w, lam), lam, None, loss)
          >>> vjp_B(jnp.ones(2))  # ∂w'/∂λ_i = -0.5 w_i
          Array([-0.5, -0.5], dtype=float32)
        """

        def phi_of_lambda(lam):
            out = self(params, inner_opt_state, lam, batch, train_loss_fn)
            return out.params, (out.inner_opt_state, out.train_loss)

        new_params, vjp_fn, (new_state, loss) = jax.vjp(phi_of_lambda, hyperparams, has_aux=True)
        return InnerResult(new_params, new_state, loss), lambda alpha: vjp_fn(alpha)[0]


def validation_grads(
    val_loss_fn: LossFn, params: PyTree, hyperparams: PyTree, batch: Batch
) -> tuple[jax.Array, PyTree, PyTree]:
    """``(L_val, α = ∇_w L_val, g_FO = ∂L_val/∂λ)`` at ``(params, hyperparams)`` in one pass.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.core.inner import validation_grads
      >>> loss, alpha, g_fo = validation_grads(
      ...     lambda w, lam, b: jnp.sum(w * lam), jnp.ones(2), jnp.full(2, 3.0), None)
      >>> float(loss), alpha.tolist(), g_fo.tolist()
      (6.0, [3.0, 3.0], [1.0, 1.0])
    """
    loss_fn = scalar_loss("val_loss_fn", val_loss_fn)
    loss, (alpha, g_fo) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, hyperparams, batch)
    return loss, alpha, g_fo
