"""The compiled programs of the training loops: one episode as a ``lax.scan``, the setup.

Everything here is traced: the optimizer, the loss functions and a :class:`Config` are
static, so one program serves every episode and every later run with the same settings.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradhpo.core.base import BilevelOptimizer
from gradhpo.core.state import BilevelState
from gradhpo.core.types import LossFn, PyTree
from gradhpo.training.data import Sampler
from gradhpo.utils.tree import tree_norm


class Config(NamedTuple):
    """Static settings of the compiled episode program."""

    episode_length: int
    hyper_update_every: int
    restart: bool
    schedule: Callable[[jax.Array], jax.Array] | None


def hyper_summary(hyperparams: PyTree) -> tuple[jax.Array, jax.Array]:
    leaves = jax.tree.leaves(hyperparams)
    total = sum(jnp.sum(x) for x in leaves)
    count = sum(x.size for x in leaves)
    return total / count, tree_norm(hyperparams)


def record(state: BilevelState, hyper_update: jax.Array) -> dict[str, jax.Array]:
    md = state.metadata
    mean, norm = hyper_summary(state.hyperparams)
    return {
        "train_loss": md["train_loss"],
        "val_loss": md["val_loss"],
        "hypergrad_norm": md["hypergrad_norm"],
        "hyper_mean": mean,
        "hyper_norm": norm,
        "hyper_update": jnp.asarray(hyper_update),
    }


def episode_record(state: BilevelState) -> dict[str, Any]:
    record = {"hyperparams": state.hyperparams}
    if "theta" in state.metadata:
        record["theta"] = state.metadata["theta"]
    return record


def lr_at(config: Config, lr_hyper: Any, n_updates: jax.Array) -> Any:
    """The hyper step size after ``n_updates`` hyper-updates (a schedule is traced)."""
    if config.schedule is None:
        return lr_hyper
    # The widest integer in use (int64 under x64), so the schedule's value has full precision.
    return config.schedule(jnp.asarray(n_updates, jax.dtypes.canonicalize_dtype(jnp.int64)))


def one_call(
    opt: BilevelOptimizer, state, train_batch, val_batch, tl, vl, lr, is_hyper, config: Config
) -> BilevelState:
    """One step call: a full step, or (between hyper-updates) inner steps only."""

    def full(s):
        return opt.run_step(s, train_batch, val_batch, tl, vl, lr)

    def inner_only(s):
        if opt.steps_per_call == 1:
            return opt.inner_step(s, train_batch, tl)
        batches = train_batch.batches  # Stacked, one batch per inner step
        return jax.lax.scan(lambda c, b: (opt.inner_step(c, b, tl), None), s, batches)[0]

    if config.hyper_update_every == 1:
        return full(state)
    return jax.lax.cond(is_hyper, full, inner_only, state)


def stack_for_call(opt: BilevelOptimizer, batches: PyTree) -> Any:
    """Wrap ``steps_per_call`` stacked batches as the optimizer's step expects them."""
    from gradhpo.algorithms.greedy import Stacked

    return Stacked(batches)


def draw(opt: BilevelOptimizer, sampler: Sampler, key: jax.Array) -> Any:
    if opt.steps_per_call == 1:
        return sampler(key)
    stacked = jax.vmap(sampler)(jax.random.split(key, opt.steps_per_call))
    return stack_for_call(opt, stacked)


def call_index(opt: BilevelOptimizer, state: BilevelState) -> jax.Array:
    return state.step // opt.steps_per_call


def hyper_due(config: Config, call_index) -> Any:
    return (call_index + 1) % config.hyper_update_every == 0


def episode_scan(
    opt: BilevelOptimizer,
    tl: LossFn,
    vl: LossFn,
    config: Config,
    state: BilevelState,
    phi: PyTree,
    key: jax.Array,
    train_src: Sampler,
    val_src: Sampler,
    lr_hyper: Any,
    lr_reptile: Any,
):
    """One episode as one ``lax.scan`` (jittable data). Returns (state, φ, step records)."""
    state = opt.new_episode(state, phi) if config.restart else opt.begin_window(state)

    def body(state, key_t):
        k_train, k_val = jax.random.split(key_t)
        call = call_index(opt, state)
        is_hyper = hyper_due(config, call)
        lr = lr_at(config, lr_hyper, call // config.hyper_update_every)
        new = one_call(
            opt,
            state,
            draw(opt, train_src, k_train),
            val_src(k_val),
            tl,
            vl,
            lr,
            is_hyper,
            config,
        )
        return new, record(new, is_hyper)

    state, records = jax.lax.scan(body, state, jax.random.split(key, config.episode_length))
    if config.restart:
        phi = reptile(phi, state.params, lr_reptile)
    return state, phi, records


def reptile(phi: PyTree, w_T: PyTree, lr_reptile: Any) -> PyTree:
    """Reptile ``φ ← φ - η (φ - w_T)``, as ``(1 - η) φ + η w_T`` (η = 1 gives w_T exactly)."""
    return jax.tree.map(lambda p, w: (1 - lr_reptile) * p + lr_reptile * w, phi, w_T)


def setup_jittable(opt, tl, vl, state, key, train_src, val_src):
    """``episode_setup`` (HyperDistill: θ) with T freshly drawn batches."""
    k_train, k_val = jax.random.split(key)
    T = opt.default_episode_length
    batches = jax.vmap(train_src)(jax.random.split(k_train, T))
    return opt.episode_setup(state, batches, val_src(k_val), tl, vl)


jit_episode = jax.jit(episode_scan, static_argnums=(0, 1, 2, 3))
jit_setup_draw = jax.jit(setup_jittable, static_argnums=(0, 1, 2))


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def population_episode(opt, tl, vl, config, states, phi, keys, train, val, lr, lr_reptile):
    episode = partial(episode_scan, opt, tl, vl, config)
    return jax.vmap(episode, in_axes=(0, 0, 0, None, None, None, None))(
        states, phi, keys, train, val, lr, lr_reptile
    )


@partial(jax.jit, static_argnums=(0, 1, 2))
def population_setup(opt, tl, vl, states, keys, train, val):
    setup = partial(setup_jittable, opt, tl, vl)
    return jax.vmap(setup, in_axes=(0, 0, None, None))(states, keys, train, val)


@partial(jax.jit, static_argnums=(0, 1, 2))
def jit_setup(opt, tl, vl, state, batches, val_batch):
    return opt.episode_setup(state, batches, val_batch, tl, vl)
