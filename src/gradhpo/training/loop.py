"""Training loops that compile once: episodes, Reptile, schedules, progress, populations.

:func:`run` drives any :class:`~gradhpo.core.base.BilevelOptimizer` through ``num_episodes``
episodes of ``episode_length`` step calls (an inner step and a hyper-update each; for Greedy
an outer step of ``unroll_steps`` inner steps). With jittable data (a
:class:`~gradhpo.training.data.Sampler` or a fixed batch) a whole episode is one compiled
``lax.scan``; with Python sources each step is one jitted call. :func:`run_population` runs
N independent copies as one ``vmap``-ped program.

References:
  Lee, Lee, Hwang. ICLR 2022, Algorithm 3 (episodes, θ every P episodes, Reptile).
  Nichol, Achiam, Schulman. "On First-Order Meta-Learning Algorithms." 2018 (Reptile).
  Luketina et al. ICML 2016 (a hyper-update every k inner steps).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from gradhpo.core.base import BilevelOptimizer
from gradhpo.core.state import BilevelState
from gradhpo.core.types import LossFn, PyTree
from gradhpo.training import programs
from gradhpo.training.data import HostSource, Sampler, as_source
from gradhpo.utils.tree import stack_batches

logger = logging.getLogger("gradhpo")

#: Per-step records of the history (arrays of shape ``(num_episodes, episode_length)``).
STEP_KEYS = ("train_loss", "val_loss", "hypergrad_norm", "hyper_mean", "hyper_norm", "hyper_update")


class RunResult(NamedTuple):
    """What :func:`run` returns.

    Attributes:
      state: the final state.
      meta_params: the Reptile meta-initialisation φ after the last episode (``None``
        without restarts).
      history: per-step arrays of shape ``(num_episodes, episode_length)`` (a leading
        population axis for :func:`run_population`): ``train_loss``, ``val_loss``,
        ``hypergrad_norm``, ``hyper_mean`` and ``hyper_norm`` (mean and norm over every
        scalar of λ), ``hyper_update`` (whether λ was updated at that step), and per episode
        ``hyperparams`` (λ at the end of each episode, leading axis ``num_episodes``) and
        ``theta`` where the optimizer has one.
    """

    state: BilevelState
    meta_params: PyTree
    history: dict[str, Any]


# -- host-side driver ----------------------------------------------------------------------


def _progress_enabled(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        return False
    return sys.stderr.isatty()


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        logger.info("tqdm is not installed: no progress bar")
        return None
    return tqdm(total=total, desc=desc, unit="episode")


def _check_run_args(opt, num_episodes, episode_length, lr_hyper, hyper_update_every, lr_reptile):
    if not isinstance(opt, BilevelOptimizer):
        raise TypeError(f"optimizer must be a BilevelOptimizer, got {type(opt).__name__}")
    for name, value in (
        ("num_episodes", num_episodes),
        ("episode_length", episode_length),
        ("hyper_update_every", hyper_update_every),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if opt.outer_optimizer is not None and lr_hyper is not None:
        raise ValueError(
            "lr_hyper must be None for an optimizer with an outer_optimizer (put a schedule "
            "into the optax optimizer instead)"
        )
    if opt.outer_optimizer is None and lr_hyper is None:
        raise ValueError(
            "lr_hyper is required (a float, a scalar array, an optax schedule or a callable "
            "of the hyper-update count) when the optimizer has no outer_optimizer"
        )
    if lr_reptile is not None and not (0.0 <= float(lr_reptile) <= 1.0):
        raise ValueError(f"lr_reptile must be None or in [0, 1], got {lr_reptile!r}")


def _resolve_episode_length(opt: BilevelOptimizer, episode_length: int | None) -> int:
    if episode_length is None:
        episode_length = opt.default_episode_length
        if episode_length is None:
            raise ValueError(
                f"episode_length is required for {type(opt).__name__} (step calls per episode)"
            )
    return episode_length


def _split_lr(lr_hyper: Any) -> tuple[Any, Callable | None]:
    """(a traced value, or None; a static schedule, or None)."""
    if callable(lr_hyper):
        return None, lr_hyper
    return lr_hyper, None


#: The settings of a run that configure its compiled programs.
_OPTIONS = ("num_episodes", "episode_length", "lr_hyper", "hyper_update_every", "lr_reptile")


class _Loop:
    """The episode driver shared by :func:`run` and :func:`run_population`."""

    def __init__(self, opt, train_data, val_data, tl, vl, options: dict[str, Any], vmapped):
        episode_length = _resolve_episode_length(opt, options["episode_length"])
        lr_hyper, lr_reptile = options["lr_hyper"], options["lr_reptile"]
        every = options["hyper_update_every"]
        _check_run_args(opt, options["num_episodes"], episode_length, lr_hyper, every, lr_reptile)
        lr_value, schedule = _split_lr(lr_hyper)
        config = programs.Config(episode_length, every, lr_reptile is not None, schedule)
        self.opt, self.tl, self.vl, self.config = opt, tl, vl, config
        self.train = as_source(train_data, "train_data")
        self.val = as_source(val_data, "val_data")
        self.lr_hyper = lr_value
        self.lr_reptile = lr_reptile if lr_reptile is not None else 0.0
        self.jittable = isinstance(self.train, Sampler) and isinstance(self.val, Sampler)
        if vmapped and not self.jittable:
            raise ValueError(
                "run_population needs jittable data: a gradhpo.training.Sampler (e.g. "
                "minibatches(arrays, batch_size)) or a fixed batch for train_data and val_data"
            )
        # Module-level jitted programs with static (optimizer, losses, config): a later run
        # with the same settings reuses the compiled programs.
        static = (opt, tl, vl, config)
        if vmapped:
            self.episode_fn = partial(programs.population_episode, *static)
            self.setup_fn = partial(programs.population_setup, *static[:3])
        else:
            self.episode_fn = partial(programs.jit_episode, *static)
            self.setup_fn = partial(programs.jit_setup_draw, *static[:3])

    # -- jittable data: one program per episode -------------------------------------------

    def episode(self, state, phi, key, call_index):
        """One episode: (state, φ, step records, next host-side call index)."""
        if not self.jittable:
            return self.host_episode(state, phi, key, call_index)
        state, phi, records = self.episode_fn(
            state, phi, key, self.train, self.val, self.lr_hyper, self.lr_reptile
        )
        return state, phi, records, call_index

    def setup(self, state, key):
        """The optimizer's episode setup (HyperDistill: θ) on freshly drawn batches."""
        if not self.jittable:
            return self.host_setup(state, key)
        return self.setup_fn(state, key, self.train, self.val)

    # -- host data: one jitted call per step ----------------------------------------------

    def host_batches(self, source):
        spc = self.opt.steps_per_call
        if spc == 1:
            return source()
        return programs.stack_for_call(self.opt, stack_batches([source() for _ in range(spc)]))

    def host_val(self, key):
        return self.val() if isinstance(self.val, HostSource) else self.val(key)

    def host_train(self, key):
        if isinstance(self.train, HostSource):
            return self.host_batches(self.train)
        return programs.draw(self.opt, self.train, key)

    def host_episode(self, state, phi, key, call_index):
        opt, config = self.opt, self.config
        state = opt.new_episode(state, phi) if config.restart else opt.begin_window(state)
        records = []
        for key_t in jax.random.split(key, config.episode_length):
            k_train, k_val = jax.random.split(key_t)
            is_hyper = programs.hyper_due(config, call_index)
            n_updates = call_index // config.hyper_update_every
            lr = programs.lr_at(config, self.lr_hyper, n_updates)
            train_batch, val_batch = self.host_train(k_train), self.host_val(k_val)
            if is_hyper:
                state = opt.run_step(state, train_batch, val_batch, self.tl, self.vl, lr)
            elif opt.steps_per_call == 1:
                state = opt.inner_step(state, train_batch, self.tl)
            else:
                for b in range(opt.steps_per_call):
                    batch = jax.tree.map(lambda a, b=b: a[b], train_batch.batches)
                    state = opt.inner_step(state, batch, self.tl)
            records.append(programs.record(state, is_hyper))
            call_index += 1
        if config.restart:
            phi = programs.reptile(phi, state.params, self.lr_reptile)
        stacked = {k: jnp.stack([r[k] for r in records]) for k in records[0]}
        return state, phi, stacked, call_index

    def host_setup(self, state, key):
        k_train, k_val = jax.random.split(key)
        T = self.opt.default_episode_length
        if isinstance(self.train, HostSource):
            batches = stack_batches([self.train() for _ in range(T)])
        else:
            batches = jax.vmap(self.train)(jax.random.split(k_train, T))
        return programs.jit_setup(self.opt, self.tl, self.vl, state, batches, self.host_val(k_val))


def _drive(loop: _Loop, state, episode_keys, num_episodes, callback, progress, population):
    """Run the episodes; ``episode_keys(e)`` gives the (setup, run) keys of episode e."""
    opt, config = loop.opt, loop.config
    period = opt.episode_setup_period
    phi = state.params
    new_episode = jax.vmap(opt.new_episode) if population else opt.new_episode
    bar = _progress_bar(_progress_enabled(progress), num_episodes, type(opt).__name__)
    call_index = None
    if not loop.jittable:
        call_index = int(state.step) // opt.steps_per_call  # one read, before the loop
    step_records, episode_records = [], []
    for episode in range(num_episodes):
        k_setup, k_run = episode_keys(episode)
        if period is not None and episode % period == 0:
            if config.restart:  # the setup (θ) starts from the episode's φ
                state = new_episode(state, phi)
            state = loop.setup(state, k_setup)
            logger.debug("episode %d: %s setup done", episode, type(opt).__name__)
        state, phi, records, call_index = loop.episode(state, phi, k_run, call_index)
        step_records.append(records)
        episode_records.append(programs.episode_record(state))
        if callback is not None:
            callback(episode, state, records)
        if bar is not None:  # the user asked for feedback: one read per episode
            bar.update(1)
            bar.set_postfix(val_loss=f"{float(jnp.mean(records['val_loss'][..., -1])):.4g}")
    if bar is not None:
        bar.close()
    axis = 1 if population else 0
    history = {k: jnp.stack([r[k] for r in step_records], axis) for k in step_records[0]}
    for k in episode_records[0]:
        history[k] = jax.tree.map(lambda *xs: jnp.stack(xs, axis), *[r[k] for r in episode_records])
    return RunResult(state, phi if config.restart else None, history)


def _episode_keys(key: jax.Array, episode: int) -> tuple[jax.Array, jax.Array]:
    """The (setup, run) keys of an episode: a pure function of the run's key and the index."""
    k_setup, k_run = jax.random.split(jax.random.fold_in(key, episode))
    return k_setup, k_run


def run(
    optimizer: BilevelOptimizer,
    state: BilevelState,
    train_data: Any,
    val_data: Any,
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    *,
    num_episodes: int = 1,
    episode_length: int | None = None,
    lr_hyper: Any = None,
    hyper_update_every: int = 1,
    lr_reptile: float | None = None,
    key: jax.Array | None = None,
    callback: Callable[[int, BilevelState, dict[str, jax.Array]], None] | None = None,
    progress: bool | None = None,
) -> RunResult:
    """Train ``num_episodes`` episodes of ``episode_length`` step calls; one signature for all.

    Each step call is ``optimizer.step`` — one inner step and one hyper-update (Greedy: an
    outer step of ``unroll_steps`` inner steps) — or, with ``hyper_update_every = k > 1``,
    only every k-th call updates λ and the others take inner steps alone. With
    ``lr_reptile`` set, every episode restarts the weights (and the inner optimizer state)
    from a meta-initialisation φ, updated after the episode by Reptile,
    ``φ ← φ - lr_reptile (φ - w_T)`` (1 means ``φ ← w_T``, 0 a fixed restart point) — as
    HyperDistill's Algorithm 3 does; without it the run is one long trajectory cut into
    episodes, each opening a new estimation window (``begin_window``: HyperDistill's horizon
    restarts, the weights carry on). An optimizer with an ``episode_setup_period`` P
    (HyperDistill: its ``estimation_period``) runs its setup (θ estimation) at episodes
    0, P, 2P, … on ``episode_length`` freshly drawn batches.

    Data: a :class:`~gradhpo.training.data.Sampler` or a fixed batch runs every episode as
    one compiled ``lax.scan``; a callable ``() -> batch`` or an iterator runs one jitted call
    per step (see :mod:`gradhpo.training.data`). Programs compile once: the step counter,
    the learning rates and the schedule values are traced.

    Args:
      optimizer: any :class:`~gradhpo.core.base.BilevelOptimizer`.
      state: the initial state (``optimizer.init``); its ``params`` are the first φ.
      train_data, val_data: batch sources (see above).
      train_loss_fn, val_loss_fn: ``loss(params, hyperparams, batch) -> scalar``.
      num_episodes: M ≥ 1.
      episode_length: step calls per episode (default: the optimizer's ``T`` where it has
        one, e.g. HyperDistill).
      lr_hyper: the hyper step size for optimizers without an ``outer_optimizer``: a float,
        a scalar array, or a schedule ``n -> lr`` (an optax schedule, or any jittable
        callable) evaluated at ``n`` = hyper-updates made so far (counted from
        ``state.step``). Must be ``None`` with an ``outer_optimizer``.
      hyper_update_every: k ≥ 1, update λ at every k-th step call.
      lr_reptile: ``None`` (no restarts) or η_Reptile ∈ [0, 1].
      key: PRNG key for the samplers (default ``PRNGKey(0)``).
      callback: ``callback(episode, state, step_records)`` after every episode (host side).
      progress: show a tqdm bar; default: on in a terminal, off when ``CI`` is set.

    Returns:
      A :class:`RunResult` (final state, φ, history arrays).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo
      >>> from gradhpo.training import run
      >>> train = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)
      >>> val = lambda w, lam, b: jnp.sum((w - b) ** 2)
      >>> opt = gradhpo.OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
      >>> result = run(opt, opt.init(jnp.zeros(2), jnp.zeros(2)), jnp.ones(2), jnp.ones(2),
      ...              train, val, num_episodes=3, episode_length=10,
      ...              lr_hyper=optax.exponential_decay(0.5, 10, 0.5), progress=False)
      >>> int(result.state.step), result.history["val_loss"].shape
      (30, (3, 10))

    References:
      Lee et al., ICLR 2022, Algorithm 3; Nichol et al., 2018 (Reptile).
    """
    options = {name: value for name, value in locals().items() if name in _OPTIONS}
    loop = _Loop(optimizer, train_data, val_data, train_loss_fn, val_loss_fn, options, False)
    key = jax.random.PRNGKey(0) if key is None else key
    episode_keys = partial(_episode_keys, key)
    return _drive(loop, state, episode_keys, num_episodes, callback, progress, None)


def run_population(
    optimizer: BilevelOptimizer,
    states: BilevelState,
    train_data: Any,
    val_data: Any,
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    *,
    keys: jax.Array,
    num_episodes: int = 1,
    episode_length: int | None = None,
    lr_hyper: Any = None,
    hyper_update_every: int = 1,
    lr_reptile: float | None = None,
    callback: Callable[[int, BilevelState, dict[str, jax.Array]], None] | None = None,
    progress: bool | None = None,
) -> RunResult:
    """:func:`run` for N independent copies at once, as one ``vmap``-ped compiled program.

    Member i starts from ``states[i]`` (a state with a leading population axis on every
    leaf, e.g. ``jax.vmap(opt.init)(params, hyperparams)``) and draws its batches with
    ``keys[i]``; it computes exactly what ``run(..., key=keys[i])`` computes for that member
    alone. Data must be jittable (a Sampler or a fixed batch).

    Args:
      optimizer: any :class:`~gradhpo.core.base.BilevelOptimizer`.
      states: the members' initial states, stacked along a leading axis of length N.
      keys: N PRNG keys, shape ``(N, 2)``.
      train_data, val_data, train_loss_fn, val_loss_fn, num_episodes, episode_length,
      lr_hyper, hyper_update_every, lr_reptile, callback, progress: as for :func:`run`.

    Returns:
      A :class:`RunResult` whose every array has a leading population axis.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import gradhpo
      >>> from gradhpo.training import run_population
      >>> train = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)
      >>> val = lambda w, lam, b: jnp.sum((w - b) ** 2)
      >>> opt = gradhpo.OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
      >>> lams = jnp.array([[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]])
      >>> states = jax.vmap(lambda l: opt.init(jnp.zeros(2), l))(lams)
      >>> out = run_population(opt, states, jnp.ones(2), jnp.ones(2), train, val,
      ...                      keys=jax.random.split(jax.random.PRNGKey(0), 3),
      ...                      episode_length=20, lr_hyper=0.5, progress=False)
      >>> out.state.hyperparams.shape, out.history["val_loss"].shape
      ((3, 2), (3, 1, 20))

    References:
      Lee et al., ICLR 2022, Algorithm 3.
    """
    options = {name: value for name, value in locals().items() if name in _OPTIONS}
    loop = _Loop(optimizer, train_data, val_data, train_loss_fn, val_loss_fn, options, True)
    population = int(jnp.shape(states.step)[0]) if jnp.ndim(states.step) == 1 else None
    if population is None:
        raise ValueError("states must carry a leading population axis (states.step of shape (N,))")
    if jnp.shape(keys)[:1] != (population,):
        raise ValueError(f"keys must have a leading axis of length {population}, got {keys.shape}")
    # Member i's keys are exactly those run(key=keys[i]) would use.
    member_keys = jax.vmap(_episode_keys, in_axes=(0, None))
    return _drive(
        loop, states, partial(member_keys, keys), num_episodes, callback, progress, population
    )
