"""The compiled programs of the training loops: a window, an episode of windows, a refit.

Everything here is traced: the optimizer, the loss functions and a :class:`Config` are
static, so one program serves every episode and every later run with the same settings.
A window is the loop's only unit: draw its batches, then ``apply(estimate(...))``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradhpo.core.base import BilevelOptimizer, WindowOptimizer
from gradhpo.core.batches import Stacked
from gradhpo.core.state import BilevelState
from gradhpo.core.types import LossFn, PyTree
from gradhpo.training.data import HostSource, Sampler, Tasks
from gradhpo.training.progress import report
from gradhpo.utils.tree import all_finite, tree_norm


class Config(NamedTuple):
    """Static settings of the compiled programs.

    Attributes:
      windows: windows (hyper-updates) per episode.
      calls_per_window: step calls a window covers (``hyper_update_every`` for an online
        optimizer, 1 for a window optimizer).
      window_steps: inner steps a window covers.
      restart: episodes restart the weights from φ (Reptile).
      schedule: a jittable ``n -> lr_hyper`` of the hyper-update count, or ``None``.
      ticks: advance the progress bar every ``ticks`` windows from inside a compiled
        episode (0: no bar, no callback in the program).
      warmup: plain inner steps with λ fixed at the start of every episode, before its
        first window (no estimator sees them).
    """

    windows: int
    calls_per_window: int
    window_steps: int
    restart: bool
    schedule: Callable[[jax.Array], jax.Array] | None
    ticks: int = 0
    warmup: int = 0

    @property
    def episode_steps(self) -> int:
        """Inner steps per episode: the warm-up and the windows."""
        return self.warmup + self.windows * self.window_steps


def hyper_summary(hyperparams: PyTree) -> tuple[jax.Array, jax.Array]:
    leaves = jax.tree.leaves(hyperparams)
    total = sum(jnp.sum(x) for x in leaves)
    count = sum(x.size for x in leaves)
    return total / count, tree_norm(hyperparams)


def record(old: BilevelState, new: BilevelState) -> dict[str, jax.Array]:
    """The per-window records of the history."""
    md = new.metadata
    mean, norm = hyper_summary(new.hyperparams)
    skipped = md["skipped_hyper_updates"] - old.metadata["skipped_hyper_updates"]
    return {
        "train_loss": md["train_loss"],
        "val_loss": md["val_loss"],
        "hypergrad_norm": md["hypergrad_norm"],
        "hyper_mean": mean,
        "hyper_norm": norm,
        "hyper_update": skipped == 0,
    }


def episode_record(state: BilevelState) -> dict[str, Any]:
    """The small per-episode records of the history (θ where the optimizer has one)."""
    return {"theta": state.metadata["theta"]} if "theta" in state.metadata else {}


def lr_at(config: Config, lr_hyper: Any, state: BilevelState) -> Any:
    """The hyper step size after the hyper-updates made so far (a schedule is traced)."""
    if config.schedule is None:
        return lr_hyper
    if config.warmup:  # every episode: warm-up steps, then its windows
        episodes, into = jnp.divmod(state.step, config.episode_steps)
        done = jnp.maximum(into - config.warmup, 0) // config.window_steps
        n_updates = episodes * config.windows + done
    else:
        n_updates = state.step // config.window_steps
    # The widest integer in use (int64 under x64), so the schedule's value has full precision.
    return config.schedule(jnp.asarray(n_updates, jax.dtypes.canonicalize_dtype(jnp.int64)))


def train_window(opt: BilevelOptimizer, config: Config, train: Sampler, keys) -> Stacked:
    """The window's training batches, from its call keys (one key per step call).

    Step call c draws its training batch with ``split(keys[c])[0]``; a window optimizer's
    call splits that key once more, one key per unrolled step. A window sampler
    (``Sampler(..., window=True)``) draws the whole window from the first call's key.
    """
    train_keys = jax.vmap(lambda k: jax.random.split(k)[0])(keys)
    if train.window:
        return Stacked(train.draw_window(train_keys[0], config.window_steps))
    if isinstance(opt, WindowOptimizer):
        return Stacked(jax.vmap(train)(jax.random.split(train_keys[0], config.window_steps)))
    return Stacked(jax.vmap(train)(train_keys))


def val_batch_of(val: Sampler, keys) -> Any:
    """The window's validation batch: ``split(keys[-1])[1]``, or a window sampler's draw.

    A window validation sampler gets the key of the window's training draw, so that both
    can come from one task.
    """
    if val.window:
        return val.draw_window(jax.random.split(keys[0])[0])
    return val(jax.random.split(keys[-1])[1])


def window_batches(opt, config, train, val, keys):
    """``(train_window(...), val_batch_of(...))``."""
    return train_window(opt, config, train, keys), val_batch_of(val, keys)


def apply_window(opt, tl, vl, config, state, window, val_batch, lr_hyper):
    """``apply(estimate(window))``: the one thing a loop does with an optimizer."""
    estimate = opt.estimate(state, window, val_batch, tl, vl)
    return opt.apply(state, estimate, lr_at(config, lr_hyper, state))


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def jit_window(opt, tl, vl, config, state, window, val_batch, lr_hyper):
    """One window from given batches, with its record (the host-data path)."""
    opt._check_state(state)
    new = apply_window(opt, tl, vl, config, state, window, val_batch, lr_hyper)
    return new, record(state, new)


jit_train_window = jax.jit(train_window, static_argnums=(0, 1))
jit_val_batch = jax.jit(val_batch_of)


def episode_keys(key: jax.Array, episode: Any) -> tuple[jax.Array, jax.Array]:
    """The (refit, run) keys of an episode: a pure function of the run's key and the index."""
    k_refit, k_run = jax.random.split(jax.random.fold_in(key, episode))
    return k_refit, k_run


def episode_scan(
    opt: BilevelOptimizer,
    tl: LossFn,
    vl: LossFn,
    config: Config,
    state: BilevelState,
    phi: PyTree,
    key: jax.Array,
    episode: Any,
    train_src: Sampler,
    val_src: Sampler,
    lr_hyper: Any,
    lr_reptile: Any,
):
    """Episode ``episode`` of the run keyed ``key``, one ``lax.scan`` over its windows.

    A :class:`~gradhpo.training.data.Tasks` source as ``train_src`` (``val_src`` ``None``)
    makes it a meta-learning episode (:func:`meta_episode`).

    Returns (state, φ, window records).
    """
    opt._check_state(state)
    k_run = episode_keys(key, episode)[1]
    if isinstance(train_src, Tasks):
        return meta_episode(opt, tl, vl, config, state, phi, k_run, train_src, lr_hyper, lr_reptile)
    if config.restart:
        state = opt.new_episode(state, phi)
    if config.warmup:
        k_warm, k_run = jax.random.split(k_run)
        state = warm_up(opt, tl, config, state, train_src, k_warm)
    keys = episode_call_keys(k_run, config)

    def body(state, xs):
        keys_w, index = xs if config.ticks else (xs, None)
        window, val_batch = window_batches(opt, config, train_src, val_src, keys_w)
        new = apply_window(opt, tl, vl, config, state, window, val_batch, lr_hyper)
        if config.ticks:
            report(index, config.ticks, config.window_steps)
        return new, record(state, new)

    xs = (keys, jnp.arange(config.windows)) if config.ticks else keys
    state, records = jax.lax.scan(body, state, xs)
    if config.restart:
        phi = reptile(phi, state.params, lr_reptile)
    return state, phi, records


def warm_up(opt, tl, config, state, train_src: Sampler, key) -> BilevelState:
    """The episode's ``config.warmup`` plain inner steps, λ fixed, one batch each."""
    if train_src.window:
        batches = train_src.draw_window(key, config.warmup)
    else:
        batches = jax.vmap(train_src)(jax.random.split(key, config.warmup))
    out, _ = opt.inner.unroll(
        state.params, state.inner_opt_state, state.hyperparams, Stacked(batches), tl
    )
    steps = jnp.asarray(config.warmup, state.step.dtype)
    return state.update(
        params=out.params, inner_opt_state=out.inner_opt_state, step=state.step + steps
    )


def episode_call_keys(key: jax.Array, config: Config) -> jax.Array:
    """One key per step call of the episode, grouped by window: ``(windows, calls, 2)``."""
    keys = jax.random.split(key, config.windows * config.calls_per_window)
    return keys.reshape(config.windows, config.calls_per_window, *keys.shape[1:])


def reptile(phi: PyTree, w_T: PyTree, lr_reptile: Any) -> PyTree:
    """Reptile ``φ ← φ - η (φ - w_T)``, as ``(1 - η) φ + η w_T`` (η = 1 gives w_T exactly)."""
    return jax.tree.map(lambda p, w: (1 - lr_reptile) * p + lr_reptile * w, phi, w_T)


def refit_batches(opt: BilevelOptimizer, train_src, val_src, key):
    """The fresh batches of the optimizer's ``refit`` (HyperDistill: θ on T batches).

    Traceable for samplers; a Python source (the host path) is read as it comes.
    """
    n = opt.refit.num_batches
    k_train, k_val = jax.random.split(key)
    if isinstance(train_src, HostSource):
        batches = train_src.draw(n)
    elif train_src.window:
        batches = train_src.draw_window(k_train, n)
    else:
        batches = jax.vmap(train_src)(jax.random.split(k_train, n))
    if isinstance(val_src, HostSource):
        return batches, val_src()
    return batches, val_src.draw_window(k_train) if val_src.window else val_src(k_val)


def refit_jittable(opt, tl, vl, state, key, episode, train_src, val_src):
    k_refit = episode_keys(key, episode)[0]
    if isinstance(train_src, Tasks):
        return meta_refit(opt, tl, vl, state, k_refit, train_src)
    batches, val_batch = refit_batches(opt, train_src, val_src, k_refit)
    return opt.refit.fn(state, batches, val_batch, tl, vl)


jit_episode = jax.jit(episode_scan, static_argnums=(0, 1, 2, 3))
jit_refit_draw = jax.jit(refit_jittable, static_argnums=(0, 1, 2))


@partial(jax.jit, static_argnums=(0, 1, 2))
def jit_refit(opt, tl, vl, state, batches, val_batch):
    return opt.refit.fn(state, batches, val_batch, tl, vl)


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def population_episode(opt, tl, vl, config, states, phi, keys, episode, *args):
    """:func:`episode_scan` of every member (member i with ``keys[i]``), one program."""
    member = partial(episode_scan, opt, tl, vl, config)
    in_axes = (0, 0, 0, None) + (None,) * len(args)
    return jax.vmap(member, in_axes=in_axes)(states, phi, keys, episode, *args)


@partial(jax.jit, static_argnums=(0, 1, 2))
def population_refit(opt, tl, vl, states, keys, episode, train, val):
    refit = partial(refit_jittable, opt, tl, vl)
    return jax.vmap(refit, in_axes=(0, 0, None, None, None))(states, keys, episode, train, val)


# -- meta-learning: a meta-batch of tasks sharing λ ------------------------------------------


def broadcast(tree: PyTree, n: int) -> PyTree:
    """``n`` copies of every leaf along a new leading axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *jnp.shape(x))), tree)


def _member_reduce(x: jax.Array) -> jax.Array:
    """One value from the members' copies of a leaf.

    Floating leaves: the mean, or the first copy where every copy is equal (so a value
    the members share, θ or a limit, is kept bit for bit); signed integers (counters): the
    largest; anything else (PRNG keys): the first.
    """
    if jnp.issubdtype(x.dtype, jnp.inexact):
        same = jnp.all(x == x[0])
        return jnp.where(same, x[0], jnp.mean(x, axis=0)).astype(x.dtype)
    if jnp.issubdtype(x.dtype, jnp.signedinteger):
        return jnp.max(x, axis=0)
    return x[0]


def collapse(members: BilevelState) -> BilevelState:
    """The meta-batch as one state: λ, outer state and step as the members share them;
    weights, inner state and metadata reduced over the members (:func:`_member_reduce`)."""
    first = jax.tree.map(lambda x: x[0], members)
    return first.update(
        params=jax.tree.map(_member_reduce, members.params),
        inner_opt_state=jax.tree.map(_member_reduce, members.inner_opt_state),
        metadata=jax.tree.map(_member_reduce, members.metadata),
    )


def share(estimates) -> Any:
    """The members' estimates with the meta-batch mean hypergradient and losses in each.

    A non-finite value in any member's estimate makes the shared hypergradient NaN, so
    that every member's guard skips the hyper-update: λ stays one value for all of them.
    The losses are shared too, so that the safeguard decides once for the meta-batch.
    """
    n = jax.tree.leaves(estimates.hypergrad)[0].shape[0]
    finite = all_finite((estimates.hypergrad, estimates.params, estimates.inner_opt_state))
    finite = finite & all_finite(estimates.metadata or {})
    mean = jax.tree.map(
        lambda g: jnp.where(finite, jnp.mean(g, axis=0), jnp.nan), estimates.hypergrad
    )
    losses = {
        "train_loss": broadcast(jnp.mean(estimates.train_loss), n),
        "val_loss": broadcast(jnp.mean(estimates.val_loss), n),
    }
    return estimates._replace(hypergrad=broadcast(mean, n), **losses)


def _reduce_record(records: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """A window's record of the meta-batch: means over the members (``hyper_update``: all)."""
    return {
        k: jnp.all(v, axis=0) if v.dtype == jnp.bool_ else jnp.mean(v, axis=0)
        for k, v in records.items()
    }


def _member_keys(key: jax.Array, n: int) -> jax.Array:
    """Member b's key stream: ``fold_in(key, b)``."""
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(n))


def meta_episode(opt, tl, vl, config, state, phi, key, tasks, lr_hyper, lr_reptile):
    """A meta-learning episode from its run key: B tasks adapting from φ, sharing λ.

    Keys: ``key`` splits into the key of the tasks (``tasks.sample``) and the key of their
    batches; member b folds in b and then draws as a single run's episode would (warm-up
    key split off first when there is one). Every window: each member's ``estimate`` on
    its own task (one ``vmap``), the meta-batch mean of the hypergradients (:func:`share`),
    each member's ``apply`` of that mean — the same λ and outer state for all. After the
    windows: the state collapsed over the members (:func:`collapse`) and Reptile towards
    the mean adapted weights.

    Returns (state, φ, window records: means over the members).
    """
    n = tasks.meta_batch_size
    k_tasks, k_batches = jax.random.split(key)
    task = tasks.sample(k_tasks)
    members = broadcast(opt.new_episode(state, phi), n)

    def member_setup(member, task_b, key_b):
        train_src = tasks.samplers(task_b)[0]
        if config.warmup:
            k_warm, key_b = jax.random.split(key_b)
            member = warm_up(opt, tl, config, member, train_src, k_warm)
        return member, episode_call_keys(key_b, config)

    members, keys = jax.vmap(member_setup)(members, task, _member_keys(k_batches, n))
    keys = jnp.swapaxes(keys, 0, 1)  # (windows, members, calls, 2)

    def estimate(member, task_b, keys_b):
        train_src, val_src = tasks.samplers(task_b)
        window, val_batch = window_batches(opt, config, train_src, val_src, keys_b)
        return opt.estimate(member, window, val_batch, tl, vl)

    def body(members, xs):
        keys_w, index = xs if config.ticks else (xs, None)
        estimates = share(jax.vmap(estimate)(members, task, keys_w))
        lr = lr_at(config, lr_hyper, jax.tree.map(lambda x: x[0], members))
        new = jax.vmap(lambda m, e: opt.apply(m, e, lr))(members, estimates)
        if config.ticks:
            report(index, config.ticks, config.window_steps)
        return new, _reduce_record(jax.vmap(record)(members, new))

    xs = (keys, jnp.arange(config.windows)) if config.ticks else keys
    members, records = jax.lax.scan(body, members, xs)
    mean_w = jax.tree.map(lambda w: jnp.mean(w, axis=0), members.params)
    return collapse(members), reptile(phi, mean_w, lr_reptile), records


def meta_refit(opt, tl, vl, state, key, tasks):
    """The optimizer's refit on a fresh meta-batch: each task's fit, reduced (the mean θ)."""
    n = tasks.meta_batch_size
    k_tasks, k_batches = jax.random.split(key)
    task = tasks.sample(k_tasks)

    def member_refit(task_b, key_b):
        train_src, val_src = tasks.samplers(task_b)
        batches, val_batch = refit_batches(opt, train_src, val_src, key_b)
        return opt.refit.fn(state, batches, val_batch, tl, vl)

    return collapse(jax.vmap(member_refit)(task, _member_keys(k_batches, n)))
