"""How good is a hypergradient estimate? Compare it with the exact one over the same window.

:func:`fidelity` runs an optimizer's estimate and an exact reference on the same state and
the same window of batches (the optimizer's ``unroll_steps``, or the ``k`` steps of a
:class:`~gradhpo.Stacked` window for an online optimizer) and reports the cosine, the norm
ratio ``‖ĝ‖/‖g‖`` and the fraction of coordinates whose signs agree, with, on request, the
cost of each (compiled temporary memory, and time in units of one inner step). The
reference is the exact hypergradient of ``L_val(w_k(λ), λ)`` through the window's k steps,
from the state's ``(w, s)``: reverse mode with a memory strategy chosen to fit a budget, or
forward mode when λ is small. A short horizon shows up as a cosine well below 1.

``gradhpo.training.run(..., fidelity_every=N)`` records these numbers every N episodes.

References:
  Wu, Ren, Liao, Grosse. "Understanding Short-Horizon Bias in Stochastic Meta-Optimization."
  ICLR 2018 (why short horizons mislead). Lee, Lee, Hwang, ICLR 2022 (HyperDistill's
  cosine-to-exact comparisons).
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gradhpo.algorithms.exact import reverse_window
from gradhpo.core.base import BilevelOptimizer, WindowOptimizer
from gradhpo.core.batches import Stacked, as_window
from gradhpo.core.inner import scalar_loss
from gradhpo.core.memory import cached_plan, parse_budget, temp_bytes
from gradhpo.core.state import BilevelState
from gradhpo.core.types import Batch, LossFn, PyTree
from gradhpo.utils.tree import tree_cosine, tree_norm

__all__ = ["Cost", "Fidelity", "compare", "fidelity", "reference_hypergradient"]

#: dim λ up to which ``reference="auto"`` uses forward mode.
FORWARD_MAX = 16


class Cost(NamedTuple):
    """What an estimate and its reference cost, measured on this machine.

    Attributes:
      estimate_temp_bytes, reference_temp_bytes: XLA's compiled temporary memory.
      estimate_steps, reference_steps: run time in units of one plain inner step (one
        gradient evaluation and the inner optimizer's update), median of three runs.
      reference: which reference ran (``"forward"`` or ``"reverse(checkpoint=…)"``).
    """

    estimate_temp_bytes: int
    reference_temp_bytes: int
    estimate_steps: float
    reference_steps: float
    reference: str


class Fidelity(NamedTuple):
    """An estimate against the exact hypergradient over the same window.

    Attributes:
      cosine: ``cos(ĝ, g)`` over all coordinates (1: the same direction).
      norm_ratio: ``‖ĝ‖ / ‖g‖``.
      sign_agreement: the fraction of coordinates where ``sign(ĝ) = sign(g)``.
      estimate: ``ĝ``, the optimizer's hypergradient.
      reference: ``g``, the exact one.
      cost: a :class:`Cost` with ``fidelity(..., cost=True)``, else ``None``.
    """

    cosine: jax.Array
    norm_ratio: jax.Array
    sign_agreement: jax.Array
    estimate: PyTree
    reference: PyTree
    cost: Cost | None = None


def compare(estimate: PyTree, reference: PyTree) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(cosine, norm ratio, sign agreement)`` of ``estimate`` against ``reference``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.diagnostics import compare
      >>> [round(float(x), 4) for x in compare(jnp.array([1.0, -1.0]), jnp.array([2.0, 1.0]))]
      [0.3162, 0.6325, 0.5]
    """
    est, ref = ravel_pytree(estimate)[0], ravel_pytree(reference)[0]
    ref_norm = tree_norm(ref)
    ratio = tree_norm(est) / jnp.where(ref_norm > 0, ref_norm, jnp.nan)
    return tree_cosine(est, ref), ratio, jnp.mean(jnp.sign(est) == jnp.sign(ref))


def _window(opt: BilevelOptimizer, train_batch, val_batch) -> tuple[Stacked, Batch]:
    if isinstance(opt, WindowOptimizer):
        window = opt._checked(train_batch, "train_batch")
    else:
        window = as_window(train_batch)
    val = val_batch.last() if isinstance(val_batch, Stacked) else val_batch
    return window, val


def _forward(opt, state, window, val, tl, vl):
    """The exact hypergradient by one JVP per coordinate of λ through the window."""
    flat, unravel = ravel_pytree(state.hyperparams)
    val_loss = scalar_loss("val_loss_fn", vl)

    def objective(flat_lam):
        lam = unravel(flat_lam)
        out, _ = opt.inner.unroll(state.params, state.inner_opt_state, lam, window, tl)
        return val_loss(out.params, lam, val)

    basis = jnp.eye(flat.size, dtype=flat.dtype)
    return unravel(jax.vmap(lambda u: jax.jvp(objective, (flat,), (u,))[1])(basis))


def _reverse(opt, checkpoint, mixed, state, window, val, tl, vl):
    return reverse_window(
        opt.inner, state, window, val, tl, vl, checkpoint=checkpoint, mixed_mode=mixed
    ).hypergrad


@functools.lru_cache(maxsize=64)
def _programs(opt, tl, vl, method, checkpoint, mixed):
    """Jitted estimate and reference for one configuration (compiled once, reused)."""

    def estimate(state, window, val):
        return opt.compute_hypergradient(state, window, val, tl, vl)

    def reference(state, window, val):
        if method == "forward":
            return _forward(opt, state, window, val, tl, vl)
        return _reverse(opt, checkpoint, mixed, state, window, val, tl, vl)

    def step(state, window):
        xs = window.scan_xs
        batch = window.at(None if xs is None else jax.tree.map(lambda x: x[0], xs))
        return opt.inner(state.params, state.inner_opt_state, state.hyperparams, batch, tl).params

    return jax.jit(estimate), jax.jit(reference), jax.jit(step)


def _method(opt, state, window, val, tl, vl, reference, memory_budget):
    """``(method, checkpoint, mixed)`` of the reference."""
    if reference not in ("auto", "forward", "reverse"):
        raise ValueError(f'reference must be "auto", "forward" or "reverse", got {reference!r}')
    dim = ravel_pytree(state.hyperparams)[0].size
    if reference == "forward" or (reference == "auto" and dim <= FORWARD_MAX):
        return "forward", None, False
    budget = parse_budget(memory_budget)

    def make(checkpoint, mixed):
        return functools.partial(_reverse, opt, checkpoint, mixed, tl=tl, vl=vl)

    plan = cached_plan(
        opt,
        ("reference", tl, vl),
        make,
        (state, window, val),
        budget,
        allow_mixed=opt.inner.kind != "update_fn",
        name="the reverse-mode reference",
    )
    return "reverse", plan.checkpoint, plan.mixed_mode


def _setup(opt, state, train_batch, val_batch, tl, vl, reference, memory_budget):
    """``((state, window, val), method, compiled programs)`` for one comparison."""
    window, val = _window(opt, train_batch, val_batch)
    args = (state, window, val)
    method = _method(opt, *args, tl, vl, reference, memory_budget)
    return args, method, _programs(opt, tl, vl, *method)


def reference_hypergradient(
    opt: BilevelOptimizer,
    state: BilevelState,
    train_batch: Batch | Stacked,
    val_batch: Batch | Stacked,
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    *,
    reference: str = "auto",
    memory_budget: int | str = "1 GiB",
) -> PyTree:
    """The exact hypergradient over the window ``opt`` would estimate from ``state``.

    Args:
      opt: any optimizer (its inner step Φ and its window length are used).
      state: the state the estimate starts from.
      train_batch: the window: one batch (reused for a window optimizer's ``unroll_steps``;
        one step for an online optimizer) or :class:`~gradhpo.Stacked` batches.
      val_batch: the validation batch (with ``Stacked``, the last one is used).
      train_loss_fn, val_loss_fn: the losses.
      reference: ``"forward"`` (one JVP per coordinate of λ), ``"reverse"`` (reverse mode
        with the fastest memory strategy that fits ``memory_budget``), or ``"auto"``:
        forward for dim λ ≤ 16, else reverse.
      memory_budget: the reverse-mode reference's memory ceiling (bytes or ``"… MiB"``).

    Returns:
      A pytree shaped like ``state.hyperparams``.

    Example:
      >>> import jax.numpy as jnp, optax, gradhpo
      >>> from gradhpo.diagnostics import reference_hypergradient
      >>> opt = gradhpo.OneStepOptimizer(optax.sgd(0.5))
      >>> train = lambda w, lam, b: 0.5 * jnp.sum((w - lam) ** 2)
      >>> val = lambda w, lam, b: 0.5 * jnp.sum(w**2)
      >>> state = opt.init(jnp.zeros(1), jnp.ones(1))
      >>> reference_hypergradient(opt, state, gradhpo.Stacked.repeat(None, 3), None, train, val)
      Array([0.765625], dtype=float32)
    """
    args, _, programs = _setup(
        opt, state, train_batch, val_batch, train_loss_fn, val_loss_fn, reference, memory_budget
    )
    return programs[1](*args)


def _median_seconds(fn, *args) -> float:
    jax.block_until_ready(fn(*args))  # compiled and warm
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def fidelity(
    opt: BilevelOptimizer,
    state: BilevelState,
    train_batch: Batch | Stacked,
    val_batch: Batch | Stacked,
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    *,
    reference: str = "auto",
    memory_budget: int | str = "1 GiB",
    cost: bool = False,
) -> Fidelity:
    """The optimizer's hypergradient against the exact one over the same window.

    Both start from ``state`` and see the same batches: the estimate is
    ``opt.compute_hypergradient(state, train_batch, val_batch, ...)`` (what ``step``
    applies), the reference :func:`reference_hypergradient`.

    Args:
      opt, state, train_batch, val_batch, train_loss_fn, val_loss_fn: as for
        :func:`reference_hypergradient`.
      reference, memory_budget: the reference's mode and memory ceiling.
      cost: also measure each one's compiled temporary memory and run time (in units of
        one plain inner step; runs each a few times).

    Returns:
      A :class:`Fidelity`.

    Example:
      >>> import jax.numpy as jnp, optax, gradhpo
      >>> from gradhpo.diagnostics import fidelity
      >>> train = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)
      >>> val = lambda w, lam, b: jnp.sum((w - 1.0) ** 2)
      >>> exact = gradhpo.ReverseModeOptimizer(optax.sgd(0.1), optax.sgd(0.1), unroll_steps=5)
      >>> f = fidelity(exact, exact.init(jnp.zeros(2), jnp.zeros(2)), jnp.ones(2), None,
      ...              train, val)
      >>> round(float(f.cosine), 6), round(float(f.norm_ratio), 6)
      (1.0, 1.0)
      >>> one = gradhpo.OneStepOptimizer(optax.sgd(0.1))  # one step of the same five
      >>> f = fidelity(one, one.init(jnp.zeros(2), jnp.zeros(2)),
      ...              gradhpo.Stacked.repeat(jnp.ones(2), 5), None, train, val)
      >>> round(float(f.cosine), 4), round(float(f.norm_ratio), 2)  # right direction, half the size
      (1.0, 0.53)
    """
    args, method, programs = _setup(
        opt, state, train_batch, val_batch, train_loss_fn, val_loss_fn, reference, memory_budget
    )
    estimate_fn, reference_fn, step_fn = programs
    est, ref = estimate_fn(*args), reference_fn(*args)
    cosine, ratio, signs = compare(est, ref)
    measured = None
    if cost:
        step_time = _median_seconds(step_fn, state, args[1])
        name = "forward" if method[0] == "forward" else f"reverse(checkpoint={method[1]!r}"
        if method[0] == "reverse":
            name += ", mixed_mode=True)" if method[2] else ")"
        measured = Cost(
            temp_bytes(estimate_fn, *args),
            temp_bytes(reference_fn, *args),
            _median_seconds(estimate_fn, *args) / step_time,
            _median_seconds(reference_fn, *args) / step_time,
            name,
        )
    return Fidelity(cosine, ratio, signs, est, ref, measured)
