"""The experiments on the public training loop, and the horizon-matched hypergradient check.

An *outer step* is T inner steps and one update of λ: one window of
:func:`gradhpo.training.run` (see :mod:`~.methods` for how each kind of method spends it).
:func:`train` drives every method through ``run`` with one episode per outer step, so that
its callback can record the task's metrics after every outer step; HyperDistill's θ
estimation, the Reptile restarts of episodic tasks and the batches are ``run``'s. This
module only measures and reports.

:func:`horizon_hypergradients` defines what "cosine with the exact hypergradient" means
everywhere in the experiments: from a state ``(w_0, s_0, λ)`` at the start of an outer step
and that step's T batches, the exact hypergradient is
``gradhpo.reverse_hypergradient`` of ``L_val(w_T(λ), λ)`` through those T inner steps; a
method's estimate is the hypergradient it would apply for that same window,
``compute_hypergradient(state, Stacked(batches), ...)``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import numpy as np

from gradhpo import BilevelState, Stacked, WindowOptimizer, reverse_hypergradient
from gradhpo.core.types import Batch, LossFn, PyTree
from gradhpo.diagnostics import compare
from gradhpo.training import Sampler, run
from gradhpo_bench.methods import Method


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
      seconds: wall time of the outer steps, metrics excluded; the first outer step
        counts as a steady-state one (its excess over the median is ``compile_seconds``).
      compile_seconds: the first outer step's time above the median of the others (the
        compilation of the run's programs; about 0 when they were cached).
    """

    state: BilevelState
    history: dict[str, np.ndarray]
    seconds: float
    compile_seconds: float


def outer_step(
    method: Method, state: BilevelState, batches: Batch, val_batch: Batch, train_loss, val_loss
) -> BilevelState:
    """One outer step of ``method``: ``step`` over the window of T ``batches``.

    An online optimizer's ``step`` takes a :class:`~gradhpo.Stacked` window (T - 1 inner
    steps, then its estimate at the last one); a window optimizer's covers its
    ``unroll_steps``.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo_bench.loop import outer_step
      >>> from gradhpo_bench.methods import Settings, build
      >>> m = build("one-step", Settings(T=3, momentum=0.0))
      >>> train = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)
      >>> val = lambda w, lam, b: jnp.sum((w - 1.0) ** 2)
      >>> s = outer_step(m, m.opt.init(jnp.zeros(2), jnp.zeros(2)), jnp.ones((3, 2)),
      ...                None, train, val)
      >>> int(s.step), bool(jnp.all(s.hyperparams < 0))
      (3, True)
    """
    window = Stacked(batches)
    if isinstance(method.opt, WindowOptimizer):
        return method.opt.step(state, window, val_batch, train_loss, val_loss)
    return method.opt.step(state, window, val_batch, train_loss, val_loss, None)


@partial(jax.jit, static_argnums=(0, 4, 5))
def horizon_hypergradients(
    method: Method, state: BilevelState, batches: Batch, val_batch: Batch, train_loss, val_loss
) -> tuple[PyTree, PyTree]:
    """``(estimate, exact)`` for one outer step: the definition of every fidelity number.

    ``exact`` is :func:`gradhpo.reverse_hypergradient` of ``L_val(w_T(λ), λ)`` through the T
    inner steps on ``batches`` from ``(state.params, state.inner_opt_state)`` with λ held at
    ``state.hyperparams``; ``estimate`` is ``compute_hypergradient`` of the same window
    (the online methods' estimate at ``w_{T-1}``, reached along the same trajectory).

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo_bench.loop import horizon_hypergradients
      >>> from gradhpo_bench.methods import Settings, build
      >>> exact_method = build("exact", Settings(T=4, momentum=0.0))
      >>> state = exact_method.opt.init(jnp.zeros(2), jnp.zeros(2))
      >>> est, exact = horizon_hypergradients(
      ...     exact_method, state, jnp.ones((4, 2)), None,
      ...     lambda w, lam, b: jnp.sum((w - b) ** 2 * jnp.exp(lam)),
      ...     lambda w, lam, b: jnp.sum(w**2))
      >>> bool(jnp.allclose(est, exact))
      True
    """
    opt = method.opt
    estimate = opt.estimate(state, Stacked(batches), val_batch, train_loss, val_loss).hypergrad
    exact = reverse_hypergradient(
        state.params,
        state.hyperparams,
        batches,
        val_batch,
        train_loss,
        val_loss,
        inner_optimizer=opt.inner_optimizer,
        update_fn=opt.update_fn,
        inner_opt_state=state.inner_opt_state,
    )
    return estimate, exact


@dataclasses.dataclass(frozen=True)
class _WindowDraw:
    """A task's ``sample`` as a window sampler of ``run``: one part of ``sample(data, key, n)``.

    Hashable by value, so that runs of the same task share their compiled programs.
    """

    sample: Callable
    part: int  # 0: the T training batches; 1: the validation batch

    def __call__(self, data, key, num_steps=1):
        return self.sample(data, key, num_steps)[self.part]


def samplers(task: Task) -> tuple[Sampler, Sampler]:
    """``run``'s training and validation window samplers of ``task``."""
    draw = partial(Sampler, data=task.data, window=True)
    return draw(_WindowDraw(task.fns.sample, 0)), draw(_WindowDraw(task.fns.sample, 1))


@partial(jax.jit, static_argnums=0)
def _evaluate(fns: TaskFns, data, params, hyperparams):
    return fns.evaluate(data, params, hyperparams)


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
    evaluate_adapted: bool = False,
) -> Run:
    """Run ``outer_steps`` outer steps of ``method`` on ``task`` through ``gradhpo.training.run``.

    One ``run`` call: ``outer_steps`` episodes of one window of T inner steps each
    (``hyper_update_every = T`` for the online methods, ``unroll_steps = T`` for the
    window methods), batches drawn by ``run`` from the task's sampler (one draw of T
    training batches and the validation batch per window, so an episodic task keeps one
    task per episode), Reptile restarts for episodic tasks, HyperDistill's θ every
    ``estimation_period`` outer steps. After every outer step the callback records
    ``task.fns.evaluate`` of the weights (φ for episodic tasks).

    Args:
      method: a configured method.
      task: the task.
      T: inner steps per outer step (the methods were built with the same T).
      outer_steps: K ≥ 1.
      key: PRNG key of the run (``run``'s ``key``).
      hyper0: initial λ (default ``task.hyper0``; random search passes its trials here).
      callback: ``callback(k, state, key_k)`` with the state before outer step k (for
        k = 0 before the run; not timed) and ``key_k = fold_in(key, k)``.
      progress: an object with ``update(n)`` (a progress bar), or ``None``.
      evaluate_adapted: for an episodic task, record the metrics of the adapted weights
        ``w_T`` instead of φ (a task that restarts from a fixed point every outer step).

    Returns:
      A :class:`Run`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo_bench.loop import Task, TaskFns, train
      >>> from gradhpo_bench.methods import Settings, build
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
    episodic = task.reptile_lr is not None
    records = [_evaluate(fns, task.data, state.params, state.hyperparams)]
    if callback is not None:
        callback(0, state, jax.random.fold_in(key, 0))
    marks = [time.perf_counter()]  # the end of each outer step's device work

    def after_episode(k, new_state, window_records):
        jax.block_until_ready(new_state)
        marks.append(time.perf_counter())
        use_phi = episodic and not evaluate_adapted
        weights = window_records["meta_params"] if use_phi else new_state.params
        records.append(_evaluate(fns, task.data, weights, new_state.hyperparams))
        if callback is not None and k + 1 < outer_steps:
            callback(k + 1, new_state, jax.random.fold_in(key, k + 1))
        jax.block_until_ready(records[-1])
        if progress is not None:
            progress.update(1)
        marks[-1] = time.perf_counter()  # the next outer step starts after the metrics

    window = {"episode_length": 1} if isinstance(opt, WindowOptimizer) else {}
    if not window:
        window = {"episode_length": T, "hyper_update_every": T}
    train_src, val_src = samplers(task)
    result = run(
        opt,
        state,
        train_src,
        val_src,
        fns.train_loss,
        fns.val_loss,
        num_episodes=outer_steps,
        lr_reptile=task.reptile_lr,
        key=key,
        callback=after_episode,
        progress=False,
        **window,
    )
    seconds = np.diff(marks)
    compile_seconds = (
        max(0.0, seconds[0] - float(np.median(seconds[1:]))) if len(seconds) > 1 else 0.0
    )
    history = {name: np.asarray([float(r[name]) for r in records]) for name in records[0]}
    return Run(result.state, history, float(seconds.sum()) - compile_seconds, compile_seconds)


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
      >>> from gradhpo_bench.loop import cosine_and_ratio
      >>> cosine_and_ratio(jnp.array([2.0, 0.0]), jnp.array([1.0, 1.0]))
      (0.7071, 1.4142)
    """
    cosine, ratio, _ = compare(estimate, exact)
    return float(cosine), float(ratio)
