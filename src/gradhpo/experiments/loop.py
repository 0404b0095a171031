"""The one training loop of the experiments, and the horizon-matched hypergradient check.

An *outer step* is T inner steps and one update of λ (see :mod:`~.methods` for how each
kind of method spends it). :func:`train` runs ``outer_steps`` of them, each one compiled
program (a ``lax.scan`` over the inner steps, batches drawn inside it), with a Python loop
over outer steps for the per-step work that is not jitted: HyperDistill's θ estimation,
episode restarts with Reptile, metrics, progress.

:func:`horizon_hypergradients` defines what "cosine with the exact hypergradient" means
everywhere in the experiments: from a state ``(w_0, s_0, λ)`` at the start of an outer step
and that step's T batches, the exact hypergradient is
``gradhpo.reverse_hypergradient`` of ``L_val(w_T(λ), λ)`` through those T inner steps; a
method's estimate is the hypergradient it would apply for that same outer step —
``compute_hypergradient`` at ``w_{T-1}`` (reached with λ fixed) for the online methods,
``compute_hypergradient`` of the whole window for Greedy and the exact method.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradhpo.algorithms.greedy import Stacked
from gradhpo.core.state import BilevelState
from gradhpo.core.types import Batch, LossFn, PyTree
from gradhpo.experiments.methods import Method
from gradhpo.reference import reverse_hypergradient
from gradhpo.utils.tree import leading_axis_length


class TaskFns(NamedTuple):
    """The static (hashable, function) part of a task.

    Attributes:
      train_loss, val_loss: ``loss(params, hyperparams, batch) -> scalar``.
      sample: ``sample(data, key, T) -> (train_batches, val_batch)``: T training batches
        stacked along a leading axis and one validation batch, jittable.
      evaluate: ``evaluate(data, params, hyperparams) -> dict of scalars``, jittable: the
        metrics recorded after every outer step (test metrics may use test data here and
        only here).
    """

    train_loss: LossFn
    val_loss: LossFn
    sample: Callable[[PyTree, jax.Array, int], tuple[Batch, Batch]]
    evaluate: Callable[[PyTree, PyTree, PyTree], dict[str, jax.Array]]


class Task(NamedTuple):
    """A bilevel task: functions, data (passed to compiled programs as arguments), start.

    Attributes:
      fns: the :class:`TaskFns`.
      data: every array the functions read, a pytree.
      params0, hyper0: the initial weights and hyperparameters.
      reptile_lr: ``None`` for one continuing training run; a number η for episodic
        tasks, where every outer step restarts the weights from φ and then
        ``φ ← φ - η (φ - w_T)`` (Reptile).
    """

    fns: TaskFns
    data: PyTree
    params0: PyTree
    hyper0: PyTree
    reptile_lr: float | None = None


class Run(NamedTuple):
    """What :func:`train` returns.

    Attributes:
      state: the final state.
      history: ``metric -> array`` over outer steps 0..K (0 is before training).
      seconds: wall time of the outer steps, compilation and metrics excluded.
      compile_seconds: time spent compiling the outer step (0 when it was cached).
    """

    state: BilevelState
    history: dict[str, np.ndarray]
    seconds: float
    compile_seconds: float


def _begin_window(method: Method, state: BilevelState) -> BilevelState:
    """Start HyperDistill's episode at the window: t = 0, ``S_0 = 0``, ``w* = w_0``.

    Its estimate at the window's last step then targets the same horizon T as every other
    method. The weights and the inner optimizer state (momentum) carry on, unlike
    ``new_episode``, which restarts them for episodic tasks.
    """
    return method.opt.begin_window(state)


def _hold_all(method: Method, state, batches, train_loss):
    """:func:`_begin_window`, then T - 1 inner steps with λ fixed (``opt.inner_step``).

    ``inner_step`` keeps each method's per-step bookkeeping (HyperDistill's ``w*_t``, ``S_t``
    and ``D*_t`` advance). Returns the state at ``w_{T-1}`` and the last batch. The batches
    are read by index inside one ``lax.scan`` (slicing off the last one would copy them all).
    """
    state = _begin_window(method, state)
    T = leading_axis_length(batches, "batches")

    def body(s, t):
        return method.opt.inner_step(s, jax.tree.map(lambda a: a[t], batches), train_loss), None

    state = jax.lax.scan(body, state, jnp.arange(T - 1))[0]
    return state, jax.tree.map(lambda a: a[T - 1], batches)


def outer_step(
    method: Method, state: BilevelState, batches: Batch, val_batch: Batch, train_loss, val_loss
) -> BilevelState:
    """One outer step of ``method``: T inner steps (``batches``) and one update of λ.

    Args:
      method: a configured :class:`~gradhpo.experiments.methods.Method`.
      state: the state at the start of the outer step.
      batches: T training batches stacked along a leading axis.
      val_batch: the validation batch.
      train_loss, val_loss: the task's losses.

    Returns:
      The state after the outer step.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.experiments.loop import outer_step
      >>> from gradhpo.experiments.methods import Settings, build
      >>> m = build("one-step", Settings(T=3, momentum=0.0))
      >>> train = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)
      >>> val = lambda w, lam, b: jnp.sum((w - 1.0) ** 2)
      >>> s = outer_step(m, m.opt.init(jnp.zeros(2), jnp.zeros(2)), jnp.ones((3, 2)),
      ...                None, train, val)
      >>> int(s.step), bool(jnp.all(s.hyperparams < 0))
      (3, True)
    """
    if method.kind == "none":
        return jax.lax.scan(
            lambda s, b: (method.opt.inner_step(s, b, train_loss), None), state, batches
        )[0]
    if method.kind == "window":
        return method.opt.step(state, Stacked(batches), val_batch, train_loss, val_loss)
    state, last = _hold_all(method, state, batches, train_loss)
    return method.opt.step(state, last, val_batch, train_loss, val_loss, None)


def method_hypergradient(
    method: Method, state: BilevelState, batches: Batch, val_batch: Batch, train_loss, val_loss
) -> PyTree:
    """The hypergradient ``method`` applies in the outer step from ``state`` with ``batches``.

    Args:
      method, state, batches, val_batch, train_loss, val_loss: as for :func:`outer_step`.

    Returns:
      A pytree like ``state.hyperparams`` (zeros for ``none``).

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.experiments.loop import method_hypergradient
      >>> from gradhpo.experiments.methods import Settings, build
      >>> m = build("fo", Settings(T=2, momentum=0.0))  # g_FO = w_T = 0.8² after 2 steps
      >>> method_hypergradient(m, m.opt.init(jnp.ones(1), jnp.ones(1)), jnp.zeros((2, 1)),
      ...     None, lambda w, lam, b: jnp.sum(w**2), lambda w, lam, b: jnp.sum(lam * w))
      Array([0.64], dtype=float32)
    """
    if method.kind == "none":
        return jax.tree.map(jnp.zeros_like, state.hyperparams)
    if method.kind == "window":
        opt = method.opt
        return opt.compute_hypergradient(state, Stacked(batches), val_batch, train_loss, val_loss)
    state, last = _hold_all(method, state, batches, train_loss)
    return method.opt.compute_hypergradient(state, last, val_batch, train_loss, val_loss)


@partial(jax.jit, static_argnums=(0, 4, 5))
def horizon_hypergradients(
    method: Method, state: BilevelState, batches: Batch, val_batch: Batch, train_loss, val_loss
) -> tuple[PyTree, PyTree]:
    """``(estimate, exact)`` for one outer step: the definition of every fidelity number.

    ``exact`` is :func:`gradhpo.reverse_hypergradient` of ``L_val(w_T(λ), λ)`` through the T
    inner steps on ``batches`` from ``(state.params, state.inner_opt_state)`` with λ held at
    ``state.hyperparams``; ``estimate`` is :func:`method_hypergradient` for the same outer
    step (the online methods' estimate at ``w_{T-1}``, reached along the same trajectory).

    Args:
      method, state, batches, val_batch, train_loss, val_loss: as for :func:`outer_step`.

    Returns:
      Two pytrees shaped like ``state.hyperparams``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.experiments.loop import horizon_hypergradients
      >>> from gradhpo.experiments.methods import Settings, build
      >>> exact_method = build("exact", Settings(T=4, momentum=0.0))
      >>> state = exact_method.opt.init(jnp.zeros(2), jnp.zeros(2))
      >>> est, exact = horizon_hypergradients(
      ...     exact_method, state, jnp.ones((4, 2)), None,
      ...     lambda w, lam, b: jnp.sum((w - b) ** 2 * jnp.exp(lam)),
      ...     lambda w, lam, b: jnp.sum(w**2))
      >>> bool(jnp.allclose(est, exact))
      True
    """
    estimate = method_hypergradient(method, state, batches, val_batch, train_loss, val_loss)
    exact = reverse_hypergradient(
        state.params,
        state.hyperparams,
        batches,
        val_batch,
        train_loss,
        val_loss,
        inner_optimizer=method.opt.inner_optimizer,
        update_fn=method.opt.update_fn,
        inner_opt_state=state.inner_opt_state,
    )
    return estimate, exact


def _outer_step_program(method: Method, fns: TaskFns, T: int, state, data, key):
    batches, val_batch = fns.sample(data, key, T)
    return outer_step(method, state, batches, val_batch, fns.train_loss, fns.val_loss)


_COMPILED: dict[Any, Any] = {}


def _signature(tree: PyTree) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


def compiled_outer_step(method: Method, fns: TaskFns, T: int, state, data, key):
    """The compiled outer-step program for these static settings and shapes, and its compile time.

    Compiled ahead of time (so the time is known) and cached for the process, so repeated
    runs with the same method and shapes (random-search trials, seeds) compile once.

    Returns:
      ``(program, seconds)``: ``program(state, data, key) -> state``; ``seconds`` is 0 when
      the program came from the cache.
    """
    cache_key = (method, fns, T, _signature((state, data, key)))
    if cache_key in _COMPILED:
        return _COMPILED[cache_key], 0.0
    start = time.perf_counter()
    program = (
        jax.jit(_outer_step_program, static_argnums=(0, 1, 2))
        .lower(method, fns, T, state, data, key)
        .compile()
    )
    _COMPILED[cache_key] = program
    return program, time.perf_counter() - start


def _theta_batches(task: Task, key: jax.Array, T: int) -> tuple[Batch, Batch]:
    return task.fns.sample(task.data, jax.random.fold_in(key, 0x7E7A), T)


@partial(jax.jit, static_argnums=0)
def _evaluate(fns: TaskFns, data, params, hyperparams):
    return fns.evaluate(data, params, hyperparams)


def _reptile(phi: PyTree, w_T: PyTree, lr: float) -> PyTree:
    """``φ ← φ - η (φ - w_T)`` (Nichol et al. 2018)."""
    return jax.tree.map(lambda p, w: p - lr * (p - w), phi, w_T)


def train(
    method: Method,
    task: Task,
    T: int,
    outer_steps: int,
    key: jax.Array,
    *,
    hyper0: PyTree | None = None,
    callback: Callable[[int, BilevelState, jax.Array], None] | None = None,
    progress: Any = None,
) -> Run:
    """Run ``outer_steps`` outer steps of ``method`` on ``task``: the one training loop.

    Outer step k draws its T training batches and its validation batch with
    ``fold_in(key, k)`` (the same batches for every method), restarts the weights from φ
    when the task is episodic, re-estimates HyperDistill's θ every ``estimation_period``
    outer steps (Algorithm 4, on T batches drawn for it), runs the compiled outer step, and
    records ``task.fns.evaluate`` of the new weights.

    Args:
      method: a configured method.
      task: the task.
      T: inner steps per outer step (the methods were built with the same T).
      outer_steps: K ≥ 0.
      key: PRNG key of the batches.
      hyper0: initial λ (default ``task.hyper0``; random search passes its trials here).
      callback: ``callback(k, state, key_k)`` before outer step k (not timed).
      progress: an object with ``update(n)`` (a progress bar), or ``None``.

    Returns:
      A :class:`Run`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo.experiments.loop import Task, TaskFns, train
      >>> from gradhpo.experiments.methods import Settings, build
      >>> fns = TaskFns(
      ...     lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2),
      ...     lambda w, lam, b: jnp.sum((w - 1.0) ** 2),
      ...     lambda data, key, T: (jnp.ones((T, 2)), None),
      ...     lambda data, w, lam: {"val_loss": jnp.sum((w - 1.0) ** 2)})
      >>> task = Task(fns, None, jnp.zeros(2), jnp.zeros(2))
      >>> run = train(build("greedy", Settings(T=5)), task, 5, 20, jax.random.PRNGKey(0))
      >>> run.history["val_loss"].shape, bool(run.history["val_loss"][-1] < 0.1)
      ((21,), True)
    """
    opt, fns = method.opt, task.fns
    state = init_state(method, task, key, T, hyper0)
    phi = state.params
    program, compile_seconds = compiled_outer_step(method, fns, T, state, task.data, key)
    period = getattr(opt, "estimation_period", None)
    if period is not None:  # compile Algorithm 4 before the clock starts
        start = time.perf_counter()
        batches, val_batch = _theta_batches(task, key, T)
        jax.block_until_ready(
            opt.estimate_theta(state, batches, val_batch, fns.train_loss, fns.val_loss)
        )
        compile_seconds += time.perf_counter() - start
    records = [_evaluate(fns, task.data, state.params, state.hyperparams)]
    seconds = 0.0
    for k in range(outer_steps):
        key_k = jax.random.fold_in(key, k)
        if task.reptile_lr is not None:  # an episode restarts from φ
            state = opt.new_episode(state, phi)
        if callback is not None:
            callback(k, state, key_k)
        start = time.perf_counter()
        if period is not None and k % period == 0:  # HyperDistill, Algorithm 3 line 1
            batches, val_batch = _theta_batches(task, key_k, T)
            theta = opt.estimate_theta(state, batches, val_batch, fns.train_loss, fns.val_loss)
            state = opt.with_theta(state, theta)
        state = jax.block_until_ready(program(state, task.data, key_k))
        seconds += time.perf_counter() - start
        if task.reptile_lr is not None:
            phi = _reptile(phi, state.params, task.reptile_lr)
        weights = state.params if task.reptile_lr is None else phi
        records.append(_evaluate(fns, task.data, weights, state.hyperparams))
        if progress is not None:
            progress.update(1)
    history = {name: np.asarray([float(r[name]) for r in records]) for name in records[0]}
    return Run(state, history, seconds, compile_seconds)


def init_state(
    method: Method, task: Task, key: jax.Array, T: int, hyper0: PyTree | None = None
) -> BilevelState:
    """``method.opt.init`` at the task's start (HyperDistill's distilled batch shaped here)."""
    hyper0 = task.hyper0 if hyper0 is None else hyper0
    if getattr(method.opt, "distill_batch", False):
        batches, _ = task.fns.sample(task.data, key, T)
        example = jax.tree.map(lambda a: a[0], batches)
        return method.opt.init(task.params0, hyper0, example_batch=example)
    return method.opt.init(task.params0, hyper0)


def cosine_and_ratio(estimate: PyTree, exact: PyTree) -> tuple[float, float]:
    """``(cos(estimate, exact), ‖estimate‖ / ‖exact‖)`` of two pytrees as flat vectors.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo.experiments.loop import cosine_and_ratio
      >>> cosine_and_ratio(jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0]))
      (0.7071, 1.4142)
    """
    from gradhpo.utils.tree import tree_cosine, tree_norm

    denom = float(tree_norm(exact))
    ratio = float(tree_norm(estimate)) / denom if denom > 0 else float("nan")
    return float(tree_cosine(estimate, exact)), ratio
