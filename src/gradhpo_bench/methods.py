"""The estimators as the experiments configure them.

Every method makes one update of λ per *outer step* of ``T`` inner steps — one window of
:func:`gradhpo.training.run` — with the same outer optimizer (Adam), so that curves against
outer steps compare like with like:

* ``none`` — no tuning: T inner steps, λ never moves (``FOOptimizer`` with
  ``optax.set_to_zero()`` as its outer optimizer);
* ``fo``, ``one-step``, ``t1t2``, ``hyperdistill`` — *online* estimators: a window of
  ``hyper_update_every = T`` steps, T - 1 inner steps with λ fixed and then the method's
  estimate at the last step (HyperDistill keeps its γ-average ``w*`` over every inner step);
* ``greedy``, ``exact`` — *window* estimators (``unroll_steps = T``): the γ-weighted sum
  (Greedy) or the exact reverse-mode hypergradient through the window
  (:class:`gradhpo.ReverseModeOptimizer`);
* the long-horizon estimators of :data:`LONG_HORIZON`, window estimators too: truncated
  reverse mode through the last ``K = ⌈T/4⌉`` steps, DrMAD, forward mode (RTRL), and the
  implicit hypergradient at ``w_T`` by conjugate gradient (20 iterations) or by a Neumann
  series of 5 terms with η = the inner lr (the papers' N.IFT(5)). The benches that compare
  estimators (``fidelity``, ``cost``) run them all; the training benches run :data:`METHODS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import optax

from gradhpo import (
    BilevelOptimizer,
    DrMADOptimizer,
    FOOptimizer,
    ForwardModeOptimizer,
    GreedyOptimizer,
    ImplicitOptimizer,
    OneStepOptimizer,
    OnlineHypergradientOptimizer,
    ReverseModeOptimizer,
    T1T2Optimizer,
    TruncatedReverseOptimizer,
)

#: Every method, in the order tables list them.
METHODS = ("none", "fo", "one-step", "t1t2", "greedy", "hyperdistill", "exact")
#: The long-horizon estimators, for the benches that compare estimators.
LONG_HORIZON = ("truncated", "drmad", "forward", "implicit", "neumann")
#: Display names.
LABELS = {
    "none": "no tuning",
    "fo": "FO",
    "one-step": "One-Step",
    "t1t2": "T1-T2 (DARTS)",
    "greedy": "Greedy",
    "hyperdistill": "HyperDistill",
    "exact": "exact (reverse mode)",
    "truncated": "truncated reverse (K = ⌈T/4⌉)",
    "drmad": "DrMAD",
    "forward": "forward mode (RTRL)",
    "implicit": "implicit (CG, 20)",
    "neumann": "N.IFT(5)",
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
    **dict.fromkeys(LONG_HORIZON, "window"),
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
      >>> from gradhpo_bench.methods import Settings, build
      >>> m = build("greedy", Settings(T=5))
      >>> m.label, m.kind, m.opt.unroll_steps
      ('Greedy', 'window', 5)
    """
    inner = settings.inner_optimizer() if inner is None else inner
    outer = settings.outer_optimizer()
    s = settings
    if key == "none":  # λ never moves: an outer optimizer that makes no update
        return Method(key, FOOptimizer(inner, optax.set_to_zero()))
    if key == "one-step":
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
    if key == "truncated":
        K = -(-s.T // 4)
        return Method(key, TruncatedReverseOptimizer(inner, outer, s.T, truncation=K))
    if key == "drmad":
        return Method(key, DrMADOptimizer(inner, outer, unroll_steps=s.T))
    if key == "forward":
        return Method(key, ForwardModeOptimizer(inner, outer, unroll_steps=s.T))
    if key == "implicit":
        return Method(key, ImplicitOptimizer(inner, outer, s.T, solver="cg", solver_steps=20))
    if key == "neumann":
        opt = ImplicitOptimizer(
            inner, outer, s.T, solver="neumann", solver_steps=5, neumann_lr=s.inner_lr
        )
        return Method(key, opt)
    choices = ", ".join((*METHODS, *LONG_HORIZON))
    raise ValueError(f"unknown method {key!r}; choose from {choices}")


def build_all(keys: Sequence[str], settings: Settings) -> list[Method]:
    """:func:`build` for each key, in order."""
    return [build(k, settings) for k in keys]
