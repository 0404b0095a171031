"""Reverse mode through the window, exact or truncated, with any memory strategy.

With ``(w_t, s_t) = Φ(w_{t-1}, s_{t-1}, λ; D_t)`` for the ``T = unroll_steps`` steps of a
window, the hypergradient is the exact derivative of ``L_val(w_T(λ), λ)`` (the inner
optimizer state included)::

    dL/dλ = ∂L_val(w_T, λ)/∂λ + α_T Σ_t (A_T ··· A_{t+1}) B_t,   α_T = ∇_w L_val(w_T, λ),

by ``jax.value_and_grad`` through one scan of Φ
(:meth:`~gradhpo.core.inner.InnerStep.unroll`, the same scan as
:func:`gradhpo.reverse_hypergradient`). Truncated reverse mode keeps only the terms
``t > T - K`` of the sum: the first ``T - K`` steps run with λ held constant.

Memory strategies (:mod:`gradhpo.core.checkpoint`): ``checkpoint=None`` stores everything
(O(P·T) plus each step's activations), ``"step"`` rematerialises each step, ``"sqrt"``
√T-long segments, ``"binomial"`` keeps ⌈log₂T⌉ carries (treeverse); ``mixed_mode=True``
differentiates each step's gradient forward-over-reverse. ``memory_budget`` picks the
fastest that fits (:mod:`gradhpo.core.memory`). All give the same hypergradient.

References:
  Maclaurin, Duvenaud, Adams. "Gradient-based Hyperparameter Optimization through
  Reversible Learning." ICML 2015. Franceschi, Donini, Frasconi, Pontil. "Forward and
  Reverse Gradient-Based Hyperparameter Optimization." ICML 2017. Shaban, Cheng, Hatch,
  Boots. "Truncated Back-propagation for Bilevel Optimization." AISTATS 2019.
"""

from __future__ import annotations

import jax
import optax

from gradhpo.core._checks import flag, positive_int
from gradhpo.core.base import Estimate, WindowOptimizer
from gradhpo.core.batches import Stacked
from gradhpo.core.checkpoint import MIXED_MODE_NEEDS_OPTIMIZER, Checkpoint, check_checkpoint
from gradhpo.core.inner import InnerStep, scalar_loss
from gradhpo.core.memory import MemoryPlan, cached_plan, parse_budget
from gradhpo.core.state import BilevelState
from gradhpo.core.types import Batch, InnerOptimizer, LossFn, UpdateFn

__all__ = ["ReverseModeOptimizer", "TruncatedReverseOptimizer"]


def reverse_window(
    inner: InnerStep,
    state: BilevelState,
    window: Stacked,
    val_batch: Batch,
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    *,
    truncation: int | None = None,
    checkpoint: Checkpoint = None,
    mixed_mode: bool = False,
) -> Estimate:
    """Reverse mode through the last ``truncation`` steps of ``window`` (``None``: all, exact).

    The first ``T - truncation`` steps run with λ held constant; ``L_val(w_T, λ)`` is
    differentiated through the rest with the given memory strategy.

    Example:
      >>> import jax.numpy as jnp, optax, gradhpo
      >>> from gradhpo.algorithms.exact import reverse_window
      >>> opt = gradhpo.ReverseModeOptimizer(optax.sgd(0.5), optax.sgd(1.0), unroll_steps=3)
      >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)
      >>> val = lambda w, lam, b: 0.5 * jnp.sum(w**2)
      >>> state = opt.init(jnp.zeros(1), jnp.ones(1))
      >>> reverse_window(opt.inner, state, gradhpo.Stacked.repeat(None, 3), None, train, val,
      ...                truncation=1).hypergrad  # w_3 ∂w_3/∂λ of the last step: 0.875 · 0.5
      Array([0.4375], dtype=float32)
    """
    val_loss_fn = scalar_loss("val_loss_fn", val_loss_fn)
    T, lam = window.num_steps, state.hyperparams
    w, s = state.params, state.inner_opt_state
    if truncation is not None and truncation < T:
        head, window = window.split(T - truncation)
        out, _ = inner.unroll(w, s, jax.lax.stop_gradient(lam), head, train_loss_fn)
        w, s = out.params, out.inner_opt_state

    def objective(lam):  # L_val(w_T(λ), λ) through the differentiated steps
        out, _ = inner.unroll(
            w, s, lam, window, train_loss_fn, checkpoint=checkpoint, mixed_mode=mixed_mode
        )
        return val_loss_fn(out.params, lam, val_batch), out

    (val_loss, out), hypergrad = jax.value_and_grad(objective, has_aux=True)(lam)
    return Estimate(
        hypergrad, out.params, out.inner_opt_state, out.train_loss, val_loss, num_steps=T
    )


class _ReverseMode(WindowOptimizer):
    """Reverse mode through a window (abstract): memory options and their budget.

    Args:
      inner_optimizer, outer_optimizer, unroll_steps, update_fn: as for every window
        optimizer.
      truncation: the number K of last steps differentiated (``None``: all).
      checkpoint, checkpoint_every, mixed_mode, memory_budget: the memory strategy.
    """

    def __init__(
        self,
        inner_optimizer: InnerOptimizer | None,
        outer_optimizer: optax.GradientTransformation | None,
        unroll_steps: int,
        truncation: int | None,
        checkpoint: Checkpoint,
        checkpoint_every: int | None,
        mixed_mode: bool,
        memory_budget: int | str | None,
        update_fn: UpdateFn | None,
    ):
        super().__init__(inner_optimizer, outer_optimizer, unroll_steps, update_fn=update_fn)
        if truncation is not None:
            truncation = positive_int("truncation", truncation)
            if truncation > self.unroll_steps:
                raise ValueError(
                    f"truncation must be in [1, unroll_steps = {self.unroll_steps}], "
                    f"got {truncation}"
                )
        self.truncation = truncation
        self.checkpoint = check_checkpoint(checkpoint, checkpoint_every)
        mixed_mode = flag("mixed_mode", mixed_mode)
        if mixed_mode and self.inner.kind == "update_fn":
            raise ValueError(MIXED_MODE_NEEDS_OPTIMIZER)
        self.mixed_mode = mixed_mode
        self.memory_budget = parse_budget(memory_budget)
        if self.memory_budget is not None and (self.checkpoint is not None or mixed_mode):
            raise ValueError(
                "memory_budget chooses checkpoint and mixed_mode itself: give either "
                "memory_budget or checkpoint/mixed_mode"
            )

    def memory_plan(
        self,
        state: BilevelState,
        train_batch: Batch | Stacked,
        val_batch: Batch | Stacked,
        train_loss_fn: LossFn,
        val_loss_fn: LossFn,
    ) -> MemoryPlan:
        """The strategy ``memory_budget`` picks for these inputs, and every candidate's memory.

        Compiles the candidates for the shapes of the arguments (nothing is run) and returns
        the first, fastest first, whose temporary memory fits; the choice is cached and
        logged (logger ``"gradhpo"``, INFO).

        Example:
          >>> import jax.numpy as jnp, optax, gradhpo
          >>> opt = gradhpo.ReverseModeOptimizer(optax.sgd(0.1), optax.sgd(0.1),
          ...                                    unroll_steps=8, memory_budget="1 GiB")
          >>> loss = lambda w, lam, b: jnp.sum((w - lam) ** 2)
          >>> plan = opt.memory_plan(opt.init(jnp.zeros(3), jnp.ones(3)), None, None, loss, loss)
          >>> plan.checkpoint, plan.mixed_mode
          (None, False)
        """
        if self.memory_budget is None:
            raise ValueError("memory_plan needs the optimizer built with a memory_budget")
        window = self._checked(train_batch, "train_batch")
        val_window = self._checked(val_batch, "val_batch")

        def make(checkpoint, mixed):
            def hypergrad(state, window, val_window):
                return self._reverse(
                    state, window, val_window, train_loss_fn, val_loss_fn, checkpoint, mixed
                ).hypergrad

            return hypergrad

        return cached_plan(
            self,
            ("estimate", train_loss_fn, val_loss_fn),
            make,
            (state, window, val_window),
            self.memory_budget,
            allow_mixed=self.inner.kind != "update_fn",
            name=f"{type(self).__name__}(unroll_steps={self.unroll_steps})",
        )

    def _reverse(self, state, window, val_window, tl, vl, checkpoint, mixed_mode) -> Estimate:
        return reverse_window(
            self.inner,
            state,
            window,
            val_window.last(),
            tl,
            vl,
            truncation=self.truncation,
            checkpoint=checkpoint,
            mixed_mode=mixed_mode,
        )

    def _estimate_window(self, state, window, val_window, train_loss_fn, val_loss_fn):
        checkpoint, mixed = self.checkpoint, self.mixed_mode
        if self.memory_budget is not None:
            plan = self.memory_plan(state, window, val_window, train_loss_fn, val_loss_fn)
            checkpoint, mixed = plan.checkpoint, plan.mixed_mode
        return self._reverse(
            state, window, val_window, train_loss_fn, val_loss_fn, checkpoint, mixed
        )


_MEMORY_ARGS = """checkpoint: the memory strategy of the backward pass: ``None`` (store every step),
        ``"step"`` (rematerialise each step), ``"sqrt"`` (⌈√T⌉-step segments),
        ``"binomial"`` (⌈log₂T⌉ stored carries, treeverse; the ``equinox`` extra) or a
        segment length K. Every strategy gives the same hypergradient.
      checkpoint_every: the older spelling of ``checkpoint=K``.
      mixed_mode: differentiate each step's training gradient forward-over-reverse
        (MixFlow-MG): the backward pass keeps the step's inputs instead of the inner
        gradient's activations. Combines with ``checkpoint``; needs an ``inner_optimizer``.
      memory_budget: instead of ``checkpoint``/``mixed_mode``, a ceiling on the compiled
        temporary memory (bytes, or a string such as ``"64 MiB"``): the fastest strategy that
        fits is used (:meth:`memory_plan` says which)."""


class ReverseModeOptimizer(_ReverseMode):
    """Exact reverse-mode hypergradient through ``unroll_steps`` inner steps, as an optimizer.

    One :meth:`step` takes T inner steps from ``(w_0, s_0)`` and updates λ once with
    ``dL_val(w_T(λ), λ)/dλ``, differentiated through every step and the inner optimizer
    state: the number :func:`gradhpo.reverse_hypergradient` gives over the same batches,
    and what every short-horizon estimator approximates. The validation loss is taken at
    ``w_T`` (with :class:`~gradhpo.Stacked` validation batches, the last one). Cost: T
    gradient evaluations forward and T VJPs of Φ backward.

    Args:
      inner_optimizer: the inner optimizer, an ``optax.GradientTransformation`` or a function
        ``hyperparams -> GradientTransformation``.
      outer_optimizer: the ``optax.GradientTransformation`` of λ (required; ``step`` has no
        ``lr_hyper``).
      unroll_steps: the window T ≥ 1.
      MEMORY
      update_fn: instead of ``inner_optimizer``, a custom inner step (keyword only).

    Example:
      >>> import jax.numpy as jnp, optax, gradhpo
      >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)
      >>> val = lambda w, lam, b: 0.5 * jnp.sum(w**2)
      >>> opt = gradhpo.ReverseModeOptimizer(optax.sgd(0.5), optax.sgd(1.0), unroll_steps=3,
      ...                                    checkpoint="binomial", mixed_mode=True)
      >>> state = opt.init(jnp.zeros(1), jnp.ones(1))
      >>> opt.compute_hypergradient(state, None, None, train, val)  # (1 - 0.5**3)**2
      Array([0.765625], dtype=float32)

    References:
      Maclaurin et al., ICML 2015; Franceschi et al., ICML 2017 (reverse-mode HO);
      Griewank & Walther, ACM TOMS 2000 (binomial checkpointing); Kemaev et al., ICML 2025
      (mixed mode).
    """

    def __init__(
        self,
        inner_optimizer: InnerOptimizer | None = None,
        outer_optimizer: optax.GradientTransformation | None = None,
        unroll_steps: int = 1,
        *,
        checkpoint: Checkpoint = None,
        checkpoint_every: int | None = None,
        mixed_mode: bool = False,
        memory_budget: int | str | None = None,
        update_fn: UpdateFn | None = None,
    ):
        super().__init__(
            inner_optimizer,
            outer_optimizer,
            unroll_steps,
            None,
            checkpoint,
            checkpoint_every,
            mixed_mode,
            memory_budget,
            update_fn,
        )


class TruncatedReverseOptimizer(_ReverseMode):
    """Truncated reverse mode: back-propagate through only the last K of the window's T steps.

    Each :meth:`step` takes ``T = unroll_steps`` inner steps; the first ``T - K`` run with λ
    held constant and the hypergradient of ``L_val(w_T, λ)`` is differentiated through the
    last ``K = truncation`` (Shaban et al. 2019)::

        g_K = ∂L_val/∂λ + α_T Σ_{t > T-K} (A_T ··· A_{t+1}) B_t.

    ``K = T`` is :class:`ReverseModeOptimizer`; ``K = 1`` the exact one-step term
    ``g_FO + α_T B_T`` of the last step. Memory O(P·K) (or less with ``checkpoint``).

    Args:
      inner_optimizer: the inner optimizer, an ``optax.GradientTransformation`` or a function
        ``hyperparams -> GradientTransformation``.
      outer_optimizer: the ``optax.GradientTransformation`` of λ (required).
      unroll_steps: the window T ≥ 1.
      truncation: K ∈ [1, T], the number of last steps differentiated.
      MEMORY
      update_fn: instead of ``inner_optimizer``, a custom inner step (keyword only).

    Example:
      >>> import jax.numpy as jnp, optax, gradhpo
      >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)
      >>> val = lambda w, lam, b: 0.5 * jnp.sum(w**2)
      >>> opt = gradhpo.TruncatedReverseOptimizer(optax.sgd(0.5), optax.sgd(1.0),
      ...                                         unroll_steps=3, truncation=2)
      >>> state = opt.init(jnp.zeros(1), jnp.ones(1))
      >>> opt.compute_hypergradient(state, None, None, train, val)  # 0.875 (0.5 + 0.25)
      Array([0.65625], dtype=float32)

    References:
      Shaban, Cheng, Hatch, Boots. "Truncated Back-propagation for Bilevel Optimization."
      AISTATS 2019.
    """

    def __init__(
        self,
        inner_optimizer: InnerOptimizer | None = None,
        outer_optimizer: optax.GradientTransformation | None = None,
        unroll_steps: int = 1,
        truncation: int = 1,
        *,
        checkpoint: Checkpoint = None,
        checkpoint_every: int | None = None,
        mixed_mode: bool = False,
        memory_budget: int | str | None = None,
        update_fn: UpdateFn | None = None,
    ):
        super().__init__(
            inner_optimizer,
            outer_optimizer,
            unroll_steps,
            truncation,
            checkpoint,
            checkpoint_every,
            mixed_mode,
            memory_budget,
            update_fn,
        )


for _cls in (ReverseModeOptimizer, TruncatedReverseOptimizer):
    _cls.__doc__ = _cls.__doc__.replace("MEMORY", _MEMORY_ARGS)
