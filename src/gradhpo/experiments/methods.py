"""The estimators as the experiments configure them, and exact reverse mode as an optimizer.

Every method makes one update of λ per *outer step* of ``T`` inner steps, with the same
outer optimizer (Adam), so that curves against outer steps compare like with like:

* ``none`` — no tuning: T inner steps, λ never moves;
* ``fo``, ``one-step``, ``t1t2``, ``hyperdistill`` — *online* estimators: T - 1 inner steps
  with λ fixed, then one ``step`` whose hypergradient is the method's estimate at the last
  step of the window (HyperDistill keeps its γ-average ``w*`` over every inner step);
* ``greedy``, ``exact`` — *window* estimators: one ``step`` over the T steps, with the
  γ-weighted sum (Greedy) or the exact reverse-mode hypergradient through the window
  (:class:`ReverseModeOptimizer`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import optax

from gradhpo.algorithms.baselines import FOOptimizer, OneStepOptimizer
from gradhpo.algorithms.greedy import GreedyOptimizer
from gradhpo.algorithms.online import OnlineHypergradientOptimizer
from gradhpo.algorithms.t1t2 import T1T2Optimizer
from gradhpo.core.base import BilevelOptimizer, Estimate

#: Every method, in the order tables list them.
METHODS = ("none", "fo", "one-step", "t1t2", "greedy", "hyperdistill", "exact")
#: Display names.
LABELS = {
    "none": "no tuning",
    "fo": "FO",
    "one-step": "One-Step",
    "t1t2": "T1-T2 (DARTS)",
    "greedy": "Greedy",
    "hyperdistill": "HyperDistill",
    "exact": "exact (reverse mode)",
}
#: How each method spends an outer step (see the module docstring).
KINDS = {
    "none": "none",
    "fo": "online",
    "one-step": "online",
    "t1t2": "online",
    "hyperdistill": "online",
    "greedy": "window",
    "exact": "window",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The choices every experiment states: horizon, discount, step sizes.

    Attributes:
      T: inner steps per outer step (the horizon of Greedy, HyperDistill and the exact
        reference).
      gamma: γ of Greedy and HyperDistill.
      inner_lr: the inner SGD step size (also ξ of T1-T2's DARTS difference).
      momentum: the inner SGD momentum (0 for plain SGD).
      outer_lr: the step size on λ, one update per outer step.
      estimation_period: HyperDistill re-estimates θ every this many outer steps.
      distill_batch: HyperDistill also distills the batches (Eq. 14), so its second-order
        term sees examples of earlier inner steps, not only the last batch.
      outer: the outer optimizer, ``"adam"`` or ``"sgd"``.
    """

    T: int = 10
    gamma: float = 0.9
    inner_lr: float = 0.1
    momentum: float = 0.9
    outer_lr: float = 0.1
    estimation_period: int = 10
    distill_batch: bool = True
    outer: str = "adam"

    def inner_optimizer(self) -> optax.GradientTransformation:
        """The inner optax optimizer these settings name."""
        return optax.sgd(self.inner_lr, momentum=self.momentum or None)

    def outer_optimizer(self) -> optax.GradientTransformation:
        """The outer optax optimizer these settings name."""
        if self.outer == "sgd":
            return optax.sgd(self.outer_lr)
        return optax.adam(self.outer_lr)

    def describe(self) -> str:
        """One line stating every choice, for the tables' captions."""
        mom = f", momentum {self.momentum}" if self.momentum else ""
        return (
            f"inner SGD lr {self.inner_lr}{mom}; T = {self.T} inner steps per outer step; "
            f"outer {'Adam' if self.outer == 'adam' else 'SGD'} lr {self.outer_lr}; "
            f"γ = {self.gamma} (Greedy, HyperDistill); "
            f"HyperDistill θ re-estimated every {self.estimation_period} outer steps"
            f"{', distilled batch (Eq. 14)' if self.distill_batch else ''}; "
            f"T1-T2 ξ = {self.inner_lr}"
        )


class ReverseModeOptimizer(GreedyOptimizer):
    """Exact reverse-mode hypergradient through ``unroll_steps`` inner steps, as an optimizer.

    One :meth:`step` takes T inner steps from ``(w_0, s_0)`` in a ``lax.scan`` and updates
    λ once with ``dL_val(w_T(λ), λ)/dλ``, differentiated through every step (the inner
    optimizer state included, SPEC Part 2 item 5): the same number as
    :func:`gradhpo.reverse_hypergradient` over the same batches, and the step Greedy
    approximates. It shares Greedy's window interface (``step`` without ``lr_hyper``,
    :class:`~gradhpo.Stacked` batches or one batch reused, ``steps_per_call``); only the
    estimate differs. Memory O(P·T).

    Args:
      inner_optimizer: the inner optax optimizer (or a factory of one).
      outer_optimizer: the optax optimizer of λ (required; ``step`` has no ``lr_hyper``).
      unroll_steps: T ≥ 1.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo
      >>> from gradhpo.experiments.methods import ReverseModeOptimizer
      >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)
      >>> val = lambda w, lam, b: 0.5 * jnp.sum(w**2)
      >>> opt = ReverseModeOptimizer(optax.sgd(0.5), optax.sgd(1.0), unroll_steps=3)
      >>> state = opt.init(jnp.zeros(1), jnp.ones(1))
      >>> batches = gradhpo.Stacked(jnp.zeros((3, 1)))
      >>> opt.compute_hypergradient(state, batches, None, train, val)  # (1 - 0.5**3)**2
      Array([0.765625], dtype=float32)

    References:
      Maclaurin et al., ICML 2015; Franceschi et al., ICML 2017 (reverse-mode HO).
    """

    def __init__(
        self, inner_optimizer, outer_optimizer: optax.GradientTransformation, unroll_steps: int
    ):
        super().__init__(inner_optimizer, outer_optimizer, unroll_steps, gamma=1.0)

    def _estimate(self, state, train_batch, val_batch, train_loss_fn, val_loss_fn) -> Estimate:
        stacked = self._per_step(train_batch, "train_batch")

        def objective(lam):
            def body(carry, batch):  # w_t, s_t = Φ(w_{t-1}, s_{t-1}, λ; D_t)
                batch = train_batch if batch is None else batch
                out = self.inner(carry[0], carry[1], lam, batch, train_loss_fn)
                return (out.params, out.inner_opt_state), out.train_loss

            carry = (state.params, state.inner_opt_state)
            (w_T, s_T), losses = jax.lax.scan(body, carry, stacked, length=self.unroll_steps)
            return val_loss_fn(w_T, lam, val_batch), (w_T, s_T, losses[-1])

        (val_loss, (w_T, s_T, train_loss)), hypergrad = jax.value_and_grad(objective, has_aux=True)(
            state.hyperparams
        )
        return Estimate(hypergrad, w_T, s_T, train_loss, val_loss, num_steps=self.unroll_steps)


@dataclasses.dataclass(frozen=True)
class Method:
    """A configured method: its key, display name, kind and optimizer."""

    key: str
    opt: BilevelOptimizer
    name: str | None = None

    @property
    def label(self) -> str:
        """The display name."""
        return LABELS[self.key] if self.name is None else self.name

    @property
    def kind(self) -> str:
        """``"none"``, ``"online"`` or ``"window"`` (see the module docstring)."""
        return KINDS[self.key]


def build(key: str, settings: Settings, inner=None, xi: float | None = None) -> Method:
    """The optimizer of method ``key`` under ``settings``.

    Args:
      key: one of :data:`METHODS`.
      settings: the shared choices.
      inner: the inner optimizer (default ``settings.inner_optimizer()``).
      xi: T1-T2's virtual step ξ (default ``settings.inner_lr``).

    Returns:
      A :class:`Method`.

    Example:
      >>> from gradhpo.experiments.methods import Settings, build
      >>> m = build("greedy", Settings(T=5))
      >>> m.label, m.kind, m.opt.unroll_steps
      ('Greedy', 'window', 5)
    """
    inner = settings.inner_optimizer() if inner is None else inner
    outer = settings.outer_optimizer()
    s = settings
    if key in ("none", "one-step"):
        return Method(key, OneStepOptimizer(inner, outer))
    if key == "fo":
        return Method(key, FOOptimizer(inner, outer))
    if key == "t1t2":
        opt = T1T2Optimizer(inner, outer, fd="weights", xi=s.inner_lr if xi is None else xi)
        return Method(key, opt, None if xi is None else f"T1-T2 (DARTS, ξ = {xi})")
    if key == "greedy":
        return Method(key, GreedyOptimizer(inner, outer, unroll_steps=s.T, gamma=s.gamma))
    if key == "hyperdistill":
        opt = OnlineHypergradientOptimizer(
            inner,
            outer,
            gamma=s.gamma,
            estimation_period=s.estimation_period,
            T=s.T,
            distill_batch=s.distill_batch,
        )
        return Method(key, opt)
    if key == "exact":
        return Method(key, ReverseModeOptimizer(inner, outer, unroll_steps=s.T))
    raise ValueError(f"unknown method {key!r}; choose from {', '.join(METHODS)}")


def build_all(keys: Sequence[str], settings: Settings) -> list[Method]:
    """:func:`build` for each key, in order."""
    return [build(k, settings) for k in keys]
