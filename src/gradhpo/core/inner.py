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
import optax

from gradhpo.core.batches import Stacked
from gradhpo.core.types import Batch, InnerOptimizer, LossFn, PyTree, UpdateFn


def check_scalar(name: str, value: Any) -> None:
    """Raise a ValueError unless ``value`` is a scalar (checked on shapes, at trace time)."""
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

    def __call__(self, params, inner_opt_state, hyperparams, batch, train_loss_fn) -> InnerResult:
        """One inner step: ``(w_t, s_t, L_train(w_{t-1}, λ; D_t))``."""
        if self.kind == "update_fn":
            loss = train_loss_fn(params, hyperparams, batch)
            check_scalar("train_loss_fn", loss)
            new_params = self.update_fn(params, hyperparams, batch)
            check_matches("update_fn(params, hyperparams, batch)", params, new_params)
            return InnerResult(new_params, inner_opt_state, loss)
        loss_fn = scalar_loss("train_loss_fn", train_loss_fn)
        loss, grads = jax.value_and_grad(loss_fn)(params, hyperparams, batch)
        updates, new_state = self.transformation(hyperparams).update(grads, inner_opt_state, params)
        return InnerResult(optax.apply_updates(params, updates), new_state, loss)

    def unroll(
        self,
        params: PyTree,
        inner_opt_state: PyTree,
        hyperparams: PyTree,
        window: Stacked | Batch,
        train_loss_fn: LossFn,
        *,
        checkpoint_every: int | None = None,
        trajectory: bool = False,
    ) -> tuple[InnerResult, PyTree]:
        """The k steps of a window, ``(w_t, s_t) = Φ(w_{t-1}, s_{t-1}, λ; D_t)``, in one scan.

        The one unrolled loop of Φ in gradhpo: exact reverse mode
        (:class:`~gradhpo.ReverseModeOptimizer`, :func:`~gradhpo.reverse_hypergradient`)
        differentiates through it, HyperDistill's θ estimation runs its forward pass on it.

        Args:
          params, inner_opt_state, hyperparams: ``(w_0, s_0, λ)``.
          window: a :class:`~gradhpo.Stacked` window (one batch per step, or a repeat);
            a plain pytree is read as batches already stacked along a leading step axis.
          train_loss_fn: ``L_train(params, hyperparams, batch) -> scalar``.
          checkpoint_every: rematerialise segments of this many steps in the backward pass
            (``jax.checkpoint``; exact, memory O(P·(k/K + K)) instead of O(P·k)).
          trajectory: also return the points ``(w_{t-1}, s_{t-1})`` of every step, stacked.

        Returns:
          ``(InnerResult(w_k, s_k, L_train of the last step), points or None)``.

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> phi = gradhpo.InnerStep(optax.sgd(0.5))
          >>> def loss(w, lam, batch):
          ...     return 0.5 * jnp.sum((w - lam) ** 2)
          >>> w0, lam = jnp.zeros(1), jnp.ones(1)
          >>> out, _ = phi.unroll(w0, phi.init(w0, lam), lam, gradhpo.Stacked.repeat(None, 3),
          ...                     loss)
          >>> out.params  # 1 - 0.5**3
          Array([0.875], dtype=float32)
        """
        if not isinstance(window, Stacked):
            window = Stacked(window)
        if checkpoint_every is not None and trajectory:
            raise ValueError("checkpoint_every and trajectory exclude each other")

        def body(carry, batch):
            w, s, _ = carry
            out = self(w, s, hyperparams, batch, train_loss_fn)
            loss = jnp.asarray(out.train_loss, carry[2].dtype)
            return (out.params, out.inner_opt_state, loss), (w, s) if trajectory else None

        dtype = jnp.result_type(*jax.tree.leaves(params))
        carry = (params, inner_opt_state, jnp.full((), jnp.nan, dtype))
        if checkpoint_every is None:
            carry, points = window.scan(body, carry)
            return InnerResult(*carry), points

        K, xs = checkpoint_every, window.scan_xs
        n_seg, rem = divmod(window.num_steps, K)

        def segment(carry, seg_xs, length):  # one rematerialised run of `length` steps
            steps = jax.lax.scan(lambda c, x: body(c, window.at(x)), carry, seg_xs, length=length)
            return steps[0]

        segment = jax.checkpoint(segment, static_argnums=2)
        if n_seg:
            head = None
            if xs is not None:
                head = jax.tree.map(lambda x: x[: n_seg * K].reshape((n_seg, K, *x.shape[1:])), xs)
            carry = jax.lax.scan(lambda c, h: (segment(c, h, K), None), carry, head, length=n_seg)[
                0
            ]
        if rem:
            tail = None if xs is None else jax.tree.map(lambda x: x[n_seg * K :], xs)
            carry = segment(carry, tail, rem)
        return InnerResult(*carry), None

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
