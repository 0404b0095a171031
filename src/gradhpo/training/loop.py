"""Training loops that compile once: episodes, Reptile, schedules, progress, populations.

:func:`run` drives any :class:`~gradhpo.core.base.BilevelOptimizer` through ``num_episodes``
episodes of windows: each window draws its batches and makes one hyper-update,
``apply(estimate(state, window, ...))`` (``hyper_update_every`` inner steps for an online
optimizer, ``unroll_steps`` for a window optimizer). With jittable data (a
:class:`~gradhpo.training.data.Sampler` or a fixed batch) a whole episode is one compiled
``lax.scan`` over its windows, with no ``lax.cond``; with Python sources each window is one
jitted call. :func:`run_population` runs N independent copies as one ``vmap``-ped program.

References:
  Lee, Lee, Hwang. ICLR 2022, Algorithm 3 (episodes, θ every P episodes, Reptile).
  Nichol, Achiam, Schulman. "On First-Order Meta-Learning Algorithms." 2018 (Reptile).
  Luketina et al. ICML 2016 (a hyper-update every k inner steps).
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradhpo.core._checks import flag, lr_hyper_rule, positive_int
from gradhpo.core.base import STALL_KEY, BilevelOptimizer, WindowOptimizer
from gradhpo.core.batches import Stacked
from gradhpo.core.state import BilevelState, check_single
from gradhpo.core.types import LossFn, PyTree
from gradhpo.diagnostics import fidelity
from gradhpo.training import programs
from gradhpo.training.data import DataExhaustedError, HostSource, Sampler, Tasks, as_source
from gradhpo.training.progress import StepBar, advance, progress_enabled

logger = logging.getLogger("gradhpo")

#: Hyper-updates skipped in a row after which :func:`run` warns that the run has stalled.
STALL_AFTER = 100

#: Progress-bar updates per episode at most, from inside a compiled episode.
_TICKS_PER_EPISODE = 50

#: Per-window records of the history (arrays of shape ``(num_episodes, windows)``).
STEP_KEYS = ("train_loss", "val_loss", "hypergrad_norm", "hyper_mean", "hyper_norm", "hyper_update")


class RunResult(NamedTuple):
    """What :func:`run` returns.

    Attributes:
      state: the final state.
      meta_params: the Reptile meta-initialisation φ after the last episode (``None``
        without restarts).
      history: per-window arrays of shape ``(num_episodes, windows per episode)`` (a
        leading population axis for :func:`run_population`), one entry per hyper-update:
        ``train_loss`` (of the window's last inner step), ``val_loss``,
        ``hypergrad_norm``, ``hyper_mean`` and ``hyper_norm`` (mean and norm over every
        scalar of λ), ``hyper_update`` (whether the hyper-update was applied, False where
        the non-finite guard skipped it); per episode ``theta`` where the optimizer has
        one; and ``hyperparams``, λ at the end of every ``hyperparams_every``-th episode
        (by default every episode; host numpy arrays, copied off the device as the run
        goes), with their indices in ``hyperparams_episode``. A continued run's history
        holds the episodes of every call, in order.
      episode: the episodes completed since the run began (over every call that
        continued it): the index of the next episode.
      key: the run's PRNG key (a population's: one per member); with ``episode`` and
        ``meta_params`` it is the loop's position, from which ``run(optimizer, result,
        ...)`` continues.
      stopped: ``None`` when every requested episode ran; otherwise why the run ended
        early, after its last complete episode: ``"interrupted"`` (Ctrl-C),
        ``"data_exhausted"`` (an iterator ran out) or ``"callback"`` (the callback returned
        ``True``).
    """

    state: BilevelState
    meta_params: PyTree
    history: dict[str, Any]
    episode: int = 0
    key: jax.Array | None = None
    stopped: str | None = None


# -- configuration ----------------------------------------------------------------------


class RunOptions(NamedTuple):
    """The settings of a run, validated once (:meth:`check`) and shared by both loops.

    Attributes:
      num_episodes: M ≥ 1.
      episode_length: step calls per episode, or ``None`` for the optimizer's default.
      lr_hyper: a float, a scalar array, a schedule ``n -> lr`` or ``None``.
      hyper_update_every: k ≥ 1 step calls per hyper-update (online optimizers).
      lr_reptile: ``None`` (no restarts) or η_Reptile ∈ [0, 1].
      warmup_steps: plain inner steps (λ fixed) at the start of every episode, ≥ 0.
    """

    num_episodes: int = 1
    episode_length: int | None = None
    lr_hyper: Any = None
    hyper_update_every: int = 1
    lr_reptile: float | None = None
    warmup_steps: int = 0

    def config(self, opt: BilevelOptimizer) -> programs.Config:
        """Check the options against ``opt``; the static program configuration.

        Example:
          >>> import optax, gradhpo
          >>> from gradhpo.training.loop import RunOptions
          >>> opt = gradhpo.OneStepOptimizer(optax.sgd(0.1))
          >>> config = RunOptions(episode_length=6, lr_hyper=0.1, hyper_update_every=3).config(opt)
          >>> config.windows, config.window_steps
          (2, 3)
        """
        if not isinstance(opt, BilevelOptimizer):
            raise TypeError(f"optimizer must be a BilevelOptimizer, got {type(opt).__name__}")
        positive_int("num_episodes", self.num_episodes)
        every = positive_int("hyper_update_every", self.hyper_update_every)
        length = self.episode_length
        if length is None:
            if opt.refit is None:
                raise ValueError(
                    f"episode_length is required for {type(opt).__name__} (step calls per episode)"
                )
            length = opt.refit.num_batches  # HyperDistill: its horizon T
        length = positive_int("episode_length", length)
        lr_hyper_rule(opt.outer_optimizer is not None, self.lr_hyper, schedules=True)
        eta = self.lr_reptile
        if eta is not None and (
            isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0
        ):
            raise ValueError(f"lr_reptile must be None or in [0, 1], got {eta!r}")
        warmup = self.warmup_steps
        if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup!r}")
        warmup = int(warmup)
        if isinstance(opt, WindowOptimizer):
            if every != 1:
                raise ValueError(
                    f"hyper_update_every={every} conflicts with {type(opt).__name__}: a window "
                    f"optimizer makes one hyper-update per step call, over its unroll_steps = "
                    f"{opt.unroll_steps} inner steps; leave hyper_update_every at 1 and set "
                    "unroll_steps instead"
                )
            return programs.Config(
                length,
                1,
                opt.unroll_steps,
                self.lr_reptile is not None,
                self._schedule(),
                warmup=warmup,
            )
        if length % every:
            raise ValueError(
                f"episode_length ({length}) must be a multiple of hyper_update_every ({every}): "
                "every window of hyper_update_every inner steps ends with a hyper-update"
            )
        return programs.Config(
            length // every,
            every,
            every,
            self.lr_reptile is not None,
            self._schedule(),
            warmup=warmup,
        )

    def _schedule(self) -> Callable | None:
        return self.lr_hyper if callable(self.lr_hyper) else None

    def traced_lr(self) -> Any:
        """``lr_hyper`` as a traced argument (``None`` for a schedule, which is static)."""
        return None if callable(self.lr_hyper) else self.lr_hyper


# -- the driver ---------------------------------------------------------------------------


class _Loop:
    """The episode driver shared by :func:`run` and :func:`run_population`."""

    def __init__(
        self, opt, train_data, val_data, tl, vl, options: RunOptions, vmapped: bool, progress
    ):
        config = options.config(opt)
        self.opt, self.tl, self.vl = opt, tl, vl
        opt.note_loss_functions(tl, vl)  # a new lambda per run compiles the run again
        meta = isinstance(train_data, Tasks)  # the compiled programs dispatch on it
        if meta:
            self.train, self.val = train_data, None
            _check_meta(options, val_data, vmapped)
        else:
            self.train = as_source(train_data, "train_data")
            self.val = as_source(val_data, "val_data")
        self.lr_hyper = options.traced_lr()
        self.lr_reptile = options.lr_reptile if options.lr_reptile is not None else 0.0
        self.jittable = meta or (isinstance(self.train, Sampler) and isinstance(self.val, Sampler))
        if config.warmup and not self.jittable:
            raise ValueError(
                "warmup_steps needs jittable data: a gradhpo.training.Sampler or a fixed batch "
                "for train_data and val_data (or a Tasks source)"
            )
        self.show = progress_enabled(progress)
        if self.show and self.jittable:  # the bar advances from inside the compiled episode
            config = config._replace(ticks=max(1, config.windows // _TICKS_PER_EPISODE))
        self.config = config
        if vmapped and not self.jittable:
            raise ValueError(
                "run_population needs jittable data: a gradhpo.training.Sampler (e.g. "
                "minibatches(arrays, batch_size)) or a fixed batch for train_data and val_data"
            )
        for name, src in (("train_data", self.train), ("val_data", self.val)):
            if isinstance(src, Sampler) and src.window and not self.jittable:
                raise ValueError(f"{name} is a window Sampler: give the other source as one too")
        # Module-level jitted programs with static (optimizer, losses, config): a later run
        # with the same settings reuses the compiled programs.
        static = (opt, tl, vl, config)
        if vmapped:
            self.episode_fn = partial(programs.population_episode, *static)
            self.refit_fn = partial(programs.population_refit, *static[:3])
        else:
            self.episode_fn = partial(programs.jit_episode, *static)
            self.refit_fn = partial(programs.jit_refit_draw, *static[:3])

    def episode(self, state, phi, key, episode):
        """Episode ``episode`` of the run keyed ``key``: (state, φ, window records)."""
        if not self.jittable:
            return self.host_episode(state, phi, programs.episode_keys(key, episode)[1])
        args = (self.train, self.val, self.lr_hyper, self.lr_reptile)
        return self.episode_fn(state, phi, key, episode, *args)

    def refit(self, state, key, episode):
        """The optimizer's refit (HyperDistill: θ) on freshly drawn batches."""
        if self.jittable:
            return self.refit_fn(state, key, episode, self.train, self.val)
        k_refit = programs.episode_keys(key, episode)[0]
        batches, val = programs.refit_batches(self.opt, self.train, self.val, k_refit)
        return programs.jit_refit(self.opt, self.tl, self.vl, state, batches, val)

    # -- host data: one jitted call per window --------------------------------------------

    def host_window(self, keys):
        """The window's batches from Python sources (and samplers, drawn by a jitted call)."""
        config = self.config
        if isinstance(self.train, HostSource):
            window = Stacked(self.train.draw(config.window_steps))
        else:
            window = programs.jit_train_window(self.opt, config, self.train, keys)
        if isinstance(self.val, HostSource):
            return window, self.val()
        return window, programs.jit_val_batch(self.val, keys)

    def host_episode(self, state, phi, key):
        opt, config = self.opt, self.config
        if config.restart:
            state = opt.new_episode(state, phi)
        records = []
        for keys in programs.episode_call_keys(key, config):
            window, val_batch = self.host_window(keys)
            state, rec = programs.jit_window(
                opt, self.tl, self.vl, config, state, window, val_batch, self.lr_hyper
            )
            records.append(rec)
            advance(config.window_steps)
        if config.restart:
            phi = programs.reptile(phi, state.params, self.lr_reptile)
        return state, phi, {k: jnp.stack([r[k] for r in records]) for k in records[0]}


def _check_meta(options: RunOptions, val_data: Any, vmapped: bool) -> None:
    """The options a :class:`~gradhpo.training.data.Tasks` source needs."""
    if vmapped:
        raise ValueError(
            "run_population does not take a Tasks source: a meta-batch is already one "
            "vmapped program (run(optimizer, state, tasks, None, ...))"
        )
    if val_data is not None:
        raise ValueError(
            "val_data must be None with a Tasks source: each task's query batches come from "
            "its val_batch function"
        )
    if options.lr_reptile is None:
        raise ValueError(
            "lr_reptile is required with a Tasks source: every episode restarts the tasks' "
            "weights from the meta-initialisation φ (1: φ becomes the meta-batch mean of the "
            "adapted weights, as in Reptile with η = 1; 0: φ stays fixed)"
        )


#: The records of ``run(..., fidelity_every=N)``, one per evaluation.
FIDELITY_KEYS = ("fidelity_episode", "fidelity_cosine", "fidelity_norm_ratio", "fidelity_signs")

# Offset of the keys of fidelity windows (folded into the run's key: no overlap with training).
_FIDELITY_SALT = 0x5EED


def _fidelity_record(loop: _Loop, state, key, episode) -> dict[str, jax.Array]:
    """The state's estimate against the exact one on a freshly drawn window."""
    keys = jax.random.split(jax.random.fold_in(key, _FIDELITY_SALT + episode), 2)
    call_keys = jax.random.split(keys[0], loop.config.calls_per_window)
    window, val_batch = loop.host_window(call_keys)
    f = fidelity(loop.opt, state, window, val_batch, loop.tl, loop.vl)
    values = (jnp.asarray(episode), f.cosine, f.norm_ratio, f.sign_agreement)
    return dict(zip(FIDELITY_KEYS, values, strict=True))


class StalledRunError(RuntimeError):
    """Raised by :func:`run` with ``strict=True`` when every hyper-update is being skipped.

    Attributes:
      result: the :class:`RunResult` of the episodes run so far (the state as it was when
        the stall was detected).
    """

    def __init__(self, message: str, result: RunResult):
        super().__init__(message)
        self.result = result


#: Values of :attr:`RunResult.stopped`: why a run ended before ``num_episodes``.
STOP_REASONS = ("interrupted", "data_exhausted", "callback")


class _Watch:
    """Host-side checks between episodes: stalled hyper-updates and failed refits.

    One scalar is read per episode (``"consecutive_skips"``, the maximum over a
    population), and the refit's failure counter after each refit.
    """

    def __init__(self, opt: BilevelOptimizer, stall_after: int, strict: bool):
        self.opt, self.stall_after, self.strict = opt, stall_after, strict
        self.stalled = False
        self.refit_failures = 0

    def after_refit(self, state, episode: int) -> None:
        counter = self.opt.refit.failures
        if counter is None:
            return
        failures = int(jnp.max(state.metadata[counter]))
        if failures > self.refit_failures:
            logger.warning(
                "episode %d: %s's refit gave non-finite values and kept the previous ones "
                "(metadata[%r] = %d)",
                episode,
                type(self.opt).__name__,
                counter,
                failures,
            )
        self.refit_failures = failures

    def after_episode(self, state, episode: int, partial_result) -> None:
        skips = int(jnp.max(state.metadata[STALL_KEY]))
        if skips < self.stall_after:
            self.stalled = False
            return
        if self.stalled and not self.strict:
            return  # warned already for this stall
        self.stalled = True
        message = (
            f"episode {episode}: the last {skips} hyper-updates of {type(self.opt).__name__} "
            "were all skipped by the non-finite guard or the safeguard "
            "(metadata['consecutive_skips'], metadata['safeguard_skips']), so λ no longer "
            "moves. Typical causes: λ reached a region where the losses or "
            "their gradients are NaN or overflow (e.g. exp(λ)), or the data hold NaNs; a "
            "smaller hyper step size, a bounded parametrisation of λ, or "
            "optax.clip_by_global_norm in the outer optimizer may help"
        )
        if self.strict:
            raise StalledRunError(message, partial_result())
        logger.warning(message)


class _Episode(NamedTuple):
    """One completed episode, committed to the run by a single ``list.append``."""

    index: int
    state: Any  # set to None once a later episode is committed
    phi: Any
    steps: dict[str, Any]  # the per-window records
    extras: dict[str, Any]  # the per-episode records (θ)
    snapshot: Any  # λ on the host, or None
    fidelity: dict[str, Any] | None


class _Start(NamedTuple):
    """Where a run starts: state, φ, first episode index, key and earlier history."""

    state: Any
    phi: Any
    episode: int
    key: jax.Array
    history: dict[str, Any]


def _start(given, key, config: programs.Config, population: bool) -> _Start:
    """The start of a run from a state, or the continuation of a :class:`RunResult`."""
    if not isinstance(given, RunResult):
        return _Start(given, given.params, 0, key, {})
    if given.key is None:
        raise ValueError("this RunResult holds no run position (key): it cannot be continued")
    if key is not None and not np.array_equal(np.asarray(key), np.asarray(given.key)):
        raise ValueError(
            "key: a continued run keeps the key stream of the run it continues; leave the "
            "key unset (or pass result.key)"
        )
    if config.restart != (given.meta_params is not None):
        if given.meta_params is None:
            hint = "ran without Reptile restarts: continue it with lr_reptile=None"
        else:
            hint = "ran with Reptile restarts (meta_params): continue it with lr_reptile set"
        raise ValueError(f"lr_reptile: the run being continued {hint}")
    done = given.history.get("val_loss")
    axis = 2 if population else 1
    if done is not None and np.ndim(done) > axis and np.shape(done)[axis] != config.windows:
        raise ValueError(
            f"episode_length: the run being continued made {np.shape(done)[axis]} "
            f"hyper-updates per episode, these options make {config.windows}; continue it "
            "with the same episode_length and hyper_update_every"
        )
    phi = given.meta_params if config.restart else given.state.params
    return _Start(given.state, phi, int(given.episode), given.key, given.history)


def _stack(records: list, axis: int) -> Any:
    """Stack per-episode records on the host: linear in their number, nothing compiled."""
    host = jax.device_get(records)
    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs, axis)), *host)


def _history(episodes: list[_Episode], axis: int, fidelity: bool) -> dict[str, Any]:
    """The history of the committed episodes (stacked on the host)."""
    history = _stack([e.steps for e in episodes], axis) if episodes else {}
    if episodes and episodes[0].extras:
        history.update(_stack([e.extras for e in episodes], axis))
    snapshots = [e for e in episodes if e.snapshot is not None]
    if snapshots:
        host = [e.snapshot for e in snapshots]
        history["hyperparams"] = jax.tree.map(lambda *xs: np.stack(xs, axis), *host)
        history["hyperparams_episode"] = jnp.asarray([e.index for e in snapshots])
    if fidelity:
        records = [e.fidelity for e in episodes if e.fidelity is not None]
        for k in FIDELITY_KEYS:
            history[k] = jnp.stack([r[k] for r in records]) if records else []
    return history


def _empty(value) -> bool:
    return isinstance(value, list) and not value


def _append_history(earlier: dict, later: dict, axis: int) -> dict:
    """``earlier`` followed by ``later``: per-episode arrays concatenated, records appended."""
    if not earlier:
        return later
    merged = dict(earlier)
    for name, value in later.items():
        old = earlier.get(name)
        if old is None or _empty(old):
            merged[name] = value
        elif _empty(value):
            continue
        else:
            along = 0 if name in FIDELITY_KEYS or name == "hyperparams_episode" else axis
            join = np.concatenate if name == "hyperparams" else jnp.concatenate
            merged[name] = jax.tree.map(lambda a, b, j=join, n=along: j([a, b], n), old, value)
    return merged


class _Driver:
    """The episodes of one call of :func:`run` / :func:`run_population`.

    The run's position (state, φ, episode index) advances only when an episode is complete:
    an interrupt, a source that runs out or a callback asking to stop leaves the last
    complete episode as the result, and a continued run starts exactly there.
    """

    def __init__(self, loop: _Loop, start: _Start, num_episodes: int, population, **options):
        self.loop, self.start, self.population = loop, start, population
        self.stop_at = start.episode + num_episodes
        self.axis = 1 if population else 0
        self.callback = options["callback"]
        self.fidelity_every = options["fidelity_every"]
        self.hyperparams_every = options["hyperparams_every"]
        self.checkpointer = options["checkpointer"]
        self.watch = _Watch(loop.opt, options["stall_after"], options["strict"])
        self.episodes: list[_Episode] = []
        self.saved = start.episode
        latest = self.checkpointer.latest() if self.checkpointer is not None else None
        if latest is not None and latest > start.episode:
            raise ValueError(
                f"checkpointer: {self.checkpointer.directory} holds checkpoints up to episode "
                f"{latest}, past this run's start at episode {start.episode}; continue from "
                "the newest (run(optimizer, checkpointer.restore(like=state), ...)) or use "
                "another directory"
            )

    def position(self) -> tuple[Any, Any, int]:
        if self.episodes:
            last = self.episodes[-1]
            return last.state, last.phi, last.index + 1
        return self.start.state, self.start.phi, self.start.episode

    def result(self, stopped: str | None = None) -> RunResult:
        state, phi, done = self.position()
        fidelity = self.fidelity_every is not None or any(
            k in self.start.history for k in FIDELITY_KEYS
        )
        history = _history(self.episodes, self.axis, fidelity)
        history = _append_history(self.start.history, history, self.axis)
        meta_params = phi if self.loop.config.restart else None
        return RunResult(state, meta_params, history, done, self.start.key, stopped)

    def one_episode(self, episode: int) -> _Episode:
        """Episode ``episode`` from the committed position (nothing is committed here)."""
        loop, opt, config = self.loop, self.loop.opt, self.loop.config
        state, phi, _ = self.position()
        key = self.start.key
        if opt.refit is not None and episode % opt.refit.every == 0:
            if config.restart:  # the refit (θ) starts from the episode's φ
                new_episode = jax.vmap(opt.new_episode) if self.population else opt.new_episode
                state = new_episode(state, phi)
            state = loop.refit(state, key, episode)
            self.watch.after_refit(state, episode)
            logger.debug("episode %d: %s refit done", episode, type(opt).__name__)
        state, phi, steps = loop.episode(state, phi, key, episode)
        every = self.hyperparams_every
        # Snapshots are kept on the host: long runs do not fill the device with them.
        snapshot = None
        if every is not None and (episode + 1) % every == 0:
            snapshot = jax.device_get(state.hyperparams)
        fid = None
        if self.fidelity_every is not None and (episode + 1) % self.fidelity_every == 0:
            fid = _fidelity_record(loop, state, key, episode)
            logger.debug("episode %d: fidelity %s", episode, fid)
        return _Episode(episode, state, phi, steps, programs.episode_record(state), snapshot, fid)

    def commit(self, done: _Episode) -> None:
        self.episodes.append(done)  # the one step that moves the run's position
        if len(self.episodes) > 1:  # only the last position is kept on the device
            self.episodes[-2] = self.episodes[-2]._replace(state=None, phi=None)

    def save(self, force: bool = False, stopped: str | None = None) -> None:
        ck = self.checkpointer
        _, _, done = self.position()
        if ck is None or done == self.saved or not (force or done % ck.every == 0):
            return
        ck.save(self.result(stopped))
        self.saved = done

    def run(self) -> RunResult:
        opt, config = self.loop.opt, self.loop.config
        steps = config.episode_steps  # inner steps per episode
        total = (self.stop_at - self.start.episode) * steps
        bar = StepBar(total, type(opt).__name__, self.loop.show)
        stopped = None
        try:
            for episode in range(self.start.episode, self.stop_at):
                done = self.one_episode(episode)
                self.commit(done)
                self.watch.after_episode(done.state, episode, self.result)
                self.save(force=episode + 1 == self.stop_at)
                bar.sync((episode + 1 - self.start.episode) * steps)
                logging_on = logger.isEnabledFor(logging.INFO)
                if bar.shown or logging_on:  # the user asked for feedback: one read
                    summary = _summary(done)
                    if logging_on:
                        _log_episode(opt, done, self.stop_at, summary)
                    val = summary["val_loss"]
                    bar.postfix(episode=f"{episode + 1}/{self.stop_at}", val_loss=f"{val:.4g}")
                if self.callback is not None:
                    restart = self.loop.config.restart
                    info = {**done.steps, "meta_params": done.phi} if restart else done.steps
                    if self.callback(episode, done.state, info) is True:
                        stopped = "callback"
                        break
        except KeyboardInterrupt:
            stopped = "interrupted"
        except DataExhaustedError as error:
            if self.watch.strict:
                self.save(force=True, stopped="data_exhausted")
                error.result = self.result("data_exhausted")
                raise
            logger.warning("%s; returning the %s", error, self._completed())
            stopped = "data_exhausted"
        finally:
            bar.close()
        if stopped is not None:
            self.save(force=True, stopped=stopped)
            if stopped == "interrupted":
                logger.warning("interrupted: returning the %s", self._completed())
        return self.result(stopped)

    def _completed(self) -> str:
        _, _, done = self.position()
        return f"run as of its last complete episode ({done} episodes done)"


def _summary(done: _Episode) -> dict[str, float]:
    """The episode's last losses, mean λ, largest hypergradient norm and skips: one read."""
    names = ("train_loss", "val_loss", "hyper_mean", "hypergrad_norm", "hyper_update")
    steps = jax.device_get({k: done.steps[k] for k in names})
    return {
        "train_loss": float(np.mean(steps["train_loss"][..., -1])),
        "val_loss": float(np.mean(steps["val_loss"][..., -1])),
        "hyper_mean": float(np.mean(steps["hyper_mean"][..., -1])),
        "hypergrad_norm": float(np.max(steps["hypergrad_norm"])),
        "skipped": int(np.sum(~np.asarray(steps["hyper_update"]))),
    }


def _log_episode(opt, done: _Episode, total: int, summary: dict[str, float]) -> None:
    """Per-episode metrics on the ``"gradhpo"`` logger at INFO."""
    logger.info(
        "%s episode %d/%d: train_loss %.6g, val_loss %.6g, mean λ %.6g, max |hypergrad| %.4g"
        ", %d skipped",
        type(opt).__name__,
        done.index + 1,
        total,
        summary["train_loss"],
        summary["val_loss"],
        summary["hyper_mean"],
        summary["hypergrad_norm"],
        summary["skipped"],
    )


def run(
    optimizer: BilevelOptimizer,
    state: BilevelState | RunResult,
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
    warmup_steps: int = 0,
    key: jax.Array | None = None,
    callback: Callable[[int, BilevelState, dict[str, jax.Array]], None] | None = None,
    progress: bool | None = None,
    fidelity_every: int | None = None,
    hyperparams_every: int | None = 1,
    stall_after: int = STALL_AFTER,
    strict: bool = False,
    checkpointer: Any = None,
) -> RunResult:
    """Train ``num_episodes`` episodes of ``episode_length`` step calls; one signature for all.

    The loop's unit is a window: its batches are drawn, then
    ``optimizer.apply(optimizer.estimate(state, window, ...))`` — one hyper-update. For an
    online optimizer (FO, One-Step, T1-T2, HyperDistill) a window is ``hyper_update_every``
    = k step calls of one inner step each (k - 1 inner steps with λ fixed, then the
    estimator's step); for a window optimizer (Greedy, exact reverse mode) a window is one
    step call of ``unroll_steps`` inner steps, and ``hyper_update_every`` must stay 1. With
    ``lr_reptile`` set, every episode restarts the weights (and the inner optimizer state)
    from a meta-initialisation φ, updated after the episode by Reptile,
    ``φ ← φ - lr_reptile (φ - w_T)`` (1 means ``φ ← w_T``, 0 a fixed restart point) — as
    HyperDistill's Algorithm 3 does; without it the run is one long trajectory cut into
    episodes. An optimizer with a ``refit`` record (HyperDistill: θ every
    ``estimation_period`` episodes) has it run at episodes 0, P, 2P, … on freshly drawn
    batches, after the episode's restart.

    Meta-learning: a :class:`~gradhpo.training.data.Tasks` source as ``train_data`` (with
    ``val_data=None`` and ``lr_reptile`` set) makes every episode a meta-batch of tasks,
    fixed for the episode, each adapting its own weights from φ on its support batches
    while all share λ: every hyper-update applies the meta-batch mean of the tasks'
    hypergradients (one ``vmap``-ped program), a non-finite value in any task skips it for
    all, Reptile moves φ towards the mean adapted weights, and the refit (θ) runs on a fresh
    meta-batch (each task's fit, averaged). ``state.params`` is then the mean adapted
    weights of the last episode and the history holds meta-batch means.

    Data: a :class:`~gradhpo.training.data.Sampler` or a fixed batch runs every episode as
    one compiled ``lax.scan`` over its windows; a callable ``() -> batch``, an iterator, a
    list of batches or a data loader (any iterable, read in passes) runs one jitted call per
    window (see :mod:`gradhpo.training.data`). Programs compile
    once: the step counter, the learning rates and the schedule values are traced.

    A run is resumable: the returned :class:`RunResult` holds the loop's position (episode
    index, φ, key), and ``run(optimizer, result, ...)`` continues it for ``num_episodes``
    more episodes, exactly as one uninterrupted call would have run them (bitwise, with
    jittable data; a Python source is simply read on), its history appended. With a
    :class:`gradhpo.checkpoint.Checkpointer` the position is also saved to disk every
    ``checkpointer.every`` episodes. Ctrl-C, an iterator that runs out, or a callback that
    returns ``True`` ends the run after its last complete episode and returns it, with
    ``result.stopped`` saying why (and, with a checkpointer, that episode saved).

    Args:
      optimizer: any :class:`~gradhpo.core.base.BilevelOptimizer`.
      state: the initial state (``optimizer.init``; its ``params`` are the first φ), or
        the :class:`RunResult` of an earlier call (or of
        :meth:`~gradhpo.checkpoint.Checkpointer.restore`) to continue.
      train_data, val_data: batch sources (see above), or a
        :class:`~gradhpo.training.data.Tasks` source and ``None``.
      train_loss_fn, val_loss_fn: ``loss(params, hyperparams, batch) -> scalar``.
      num_episodes: M ≥ 1.
      episode_length: step calls per episode, a multiple of ``hyper_update_every``
        (default: the number of batches of the optimizer's ``refit``, HyperDistill's
        ``T``).
      lr_hyper: the hyper step size for optimizers without an ``outer_optimizer``: a float,
        a scalar array, or a schedule ``n -> lr`` (an optax schedule, or any jittable
        callable) evaluated at ``n`` = hyper-updates made so far (``state.step`` divided
        by the window's inner steps). Must be ``None`` with an ``outer_optimizer``.
      hyper_update_every: k ≥ 1, update λ at every k-th step call (online optimizers).
      lr_reptile: ``None`` (no restarts) or η_Reptile ∈ [0, 1].
      warmup_steps: k ≥ 0 plain inner steps (λ fixed, seen by no estimator) at the start
        of every episode, before its windows: hyper-updates only in the last steps of an
        episode (the online N.IFT of Lee et al.). Needs jittable data.
      key: PRNG key for the samplers (default ``PRNGKey(0)``; a continued run keeps its
        own).
      callback: ``callback(episode, state, records)`` after every episode (host side):
        ``records`` holds the episode's window records and, with restarts,
        ``"meta_params"``, φ after the episode's Reptile update. Returning ``True`` stops
        the run there (``result.stopped == "callback"``).
      progress: show a tqdm bar; default: on in a terminal, off when ``CI`` is set.
      fidelity_every: N ≥ 1: after every N-th episode, compare the optimizer's hypergradient
        with the exact one over one freshly drawn window from the current state
        (:func:`gradhpo.diagnostics.fidelity`) and record ``"fidelity_episode"``,
        ``"fidelity_cosine"``, ``"fidelity_norm_ratio"`` and ``"fidelity_signs"`` (the sign
        agreement) in the history, one entry per evaluation. It runs on the host, between
        episodes, and draws its batches with keys of its own (a Python data source gives
        up its next batches to it).
      hyperparams_every: k ≥ 1: keep a snapshot of λ after every k-th episode in
        ``history["hyperparams"]`` (their episode indices in
        ``history["hyperparams_episode"]``); ``None``: none. The per-window summaries
        ``hyper_mean`` and ``hyper_norm`` are always kept. Each snapshot is the size of λ,
        so for large λ over many episodes keep few.
      stall_after: N ≥ 1: after an episode that ends with the last N hyper-updates all
        skipped by the non-finite guard (``metadata["consecutive_skips"] >= N``, checked
        between episodes), log a warning on the ``"gradhpo"`` logger (once per stall).
        Default 100.
      strict: raise :class:`StalledRunError` (with the partial result) instead of
        warning on a stall, and :class:`~gradhpo.training.data.DataExhaustedError` (its
        ``result`` the partial result) instead of returning when an iterator runs out.
      checkpointer: a :class:`gradhpo.checkpoint.Checkpointer`: save the run every
        ``checkpointer.every`` episodes, after the last one and when the run stops early.

    Returns:
      A :class:`RunResult` (final state, φ, history arrays, position).

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
      >>> greedy = gradhpo.GreedyOptimizer(optax.sgd(0.1), optax.adam(0.1), unroll_steps=5)
      >>> out = run(greedy, greedy.init(jnp.zeros(2), jnp.zeros(2)), jnp.ones(2), jnp.ones(2),
      ...           train, val, num_episodes=2, episode_length=4, progress=False)
      >>> int(out.state.step), out.history["hyper_update"].shape  # 2 x 4 windows of 5 steps
      (40, (2, 4))
      >>> more = run(greedy, out, jnp.ones(2), jnp.ones(2), train, val, num_episodes=1,
      ...            episode_length=4, progress=False)  # continue: episode 2
      >>> more.episode, int(more.state.step), more.history["hyper_update"].shape
      (3, 60, (3, 4))

    References:
      Lee et al., ICLR 2022, Algorithm 3; Nichol et al., 2018 (Reptile).
    """
    if fidelity_every is not None:
        fidelity_every = positive_int("fidelity_every", fidelity_every)
        if isinstance(train_data, Tasks):
            raise ValueError("fidelity_every is not available with a Tasks source")
    watch = _watch_options(hyperparams_every, stall_after, strict, callback, checkpointer)
    options = RunOptions(
        num_episodes, episode_length, lr_hyper, hyper_update_every, lr_reptile, warmup_steps
    )
    loop = _Loop(
        optimizer, train_data, val_data, train_loss_fn, val_loss_fn, options, False, progress
    )
    if key is not None or not isinstance(state, RunResult):  # a continued run has its own
        key = _run_key(key)
    start = _start(state, key, loop.config, population=False)
    check_single(start.state, "use run_population for a population of states, or pass one member")
    watch["fidelity_every"] = fidelity_every
    return _Driver(loop, start, num_episodes, None, **watch).run()


def _spread(population: int, states, keys, *data):
    """The members spread over this process's devices, where there are several (the default).

    Measured the fastest layout on CPU host devices (``benchmarks/scale.py``): each device
    runs its members on its own thread. Only when nothing was placed by the caller (no
    committed array among the states, keys and data), the population divides evenly, and
    the run is one process; otherwise the arrays stay where they are.
    """
    devices = jax.local_devices()
    if len(devices) == 1 or population % len(devices) or jax.process_count() > 1:
        return states, keys
    leaves = jax.tree.leaves((states, keys, data))
    if any(isinstance(x, jax.Array) and x.committed for x in leaves):
        return states, keys
    mesh = jax.sharding.Mesh(np.array(devices), ("population",))
    members = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("population"))
    return jax.device_put((states, jnp.asarray(keys)), members)


def _watch_options(hyperparams_every, stall_after, strict, callback, checkpointer) -> dict:
    if hyperparams_every is not None:
        hyperparams_every = positive_int("hyperparams_every", hyperparams_every)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if checkpointer is not None and not hasattr(checkpointer, "save"):
        raise TypeError(
            "checkpointer must be a gradhpo.checkpoint.Checkpointer or None, got "
            f"{type(checkpointer).__name__}"
        )
    return {
        "hyperparams_every": hyperparams_every,
        "stall_after": positive_int("stall_after", stall_after),
        "strict": flag("strict", strict),
        "callback": callback,
        "checkpointer": checkpointer,
    }


def _run_key(key) -> jax.Array:
    """The run's PRNG key (default ``PRNGKey(0)``), checked."""
    if key is None:
        return jax.random.PRNGKey(0)
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(
            f"key must be one PRNG key (jax.random.PRNGKey(seed) or jax.random.key(seed)), "
            f"got {key.dtype}{key.shape}"
        )
    return key


def run_population(
    optimizer: BilevelOptimizer,
    states: BilevelState | RunResult,
    train_data: Any,
    val_data: Any,
    train_loss_fn: LossFn,
    val_loss_fn: LossFn,
    *,
    keys: jax.Array | None = None,
    num_episodes: int = 1,
    episode_length: int | None = None,
    lr_hyper: Any = None,
    hyper_update_every: int = 1,
    lr_reptile: float | None = None,
    warmup_steps: int = 0,
    callback: Callable[[int, BilevelState, dict[str, jax.Array]], None] | None = None,
    progress: bool | None = None,
    hyperparams_every: int | None = 1,
    stall_after: int = STALL_AFTER,
    strict: bool = False,
    checkpointer: Any = None,
) -> RunResult:
    """:func:`run` for N independent copies at once, as one ``vmap``-ped compiled program.

    Member i starts from ``states[i]`` (a state with a leading population axis on every
    leaf, e.g. ``jax.vmap(opt.init)(params, hyperparams)``) and draws its batches with
    ``keys[i]``; it computes what ``run(..., key=keys[i])`` computes for that member alone,
    equal to rounding but not necessarily bitwise (the batched program may order its sums
    differently; float32 results agree to about one unit in the last place per step). Data
    must be jittable (a Sampler or a fixed batch). Where the process has several devices
    (GPUs, or CPU host devices from ``XLA_FLAGS=--xla_force_host_platform_device_count=K``)
    and nothing was placed on one, the members are spread over them (N a multiple of the
    count) — the fastest layout measured; states placed by the caller keep their sharding
    (a ``P("pop")`` over a mesh axis, combinable with a data axis). A population run is
    resumable and
    interrupt-safe as :func:`run` is: pass its result as ``states`` to continue it. The
    arguments not listed below (``train_data``, ``val_data``, the losses, ``num_episodes``,
    ``episode_length``, ``lr_hyper``, ``hyper_update_every``, ``lr_reptile``,
    ``warmup_steps``, ``callback``, ``progress``, ``hyperparams_every``, ``stall_after``,
    ``strict``, ``checkpointer``) are as for :func:`run`; a stall is the maximum over the
    members.

    Args:
      optimizer: any :class:`~gradhpo.core.base.BilevelOptimizer`.
      states: the members' initial states, stacked along a leading axis of length N, or
        the :class:`RunResult` of an earlier population run to continue.
      keys: N PRNG keys, shape ``(N, 2)`` (required for a new run; a continued one keeps
        its own).

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
    watch = _watch_options(hyperparams_every, stall_after, strict, callback, checkpointer)
    options = RunOptions(
        num_episodes, episode_length, lr_hyper, hyper_update_every, lr_reptile, warmup_steps
    )
    loop = _Loop(
        optimizer, train_data, val_data, train_loss_fn, val_loss_fn, options, True, progress
    )
    given = states.state if isinstance(states, RunResult) else states
    if not isinstance(given, BilevelState):
        raise TypeError(f"states must be a BilevelState, got {type(states).__name__}")
    population = int(jnp.shape(given.step)[0]) if jnp.ndim(given.step) == 1 else None
    if population is None:
        raise ValueError("states must carry a leading population axis (states.step of shape (N,))")
    if keys is None and not isinstance(states, RunResult):
        raise TypeError("run_population needs keys: N PRNG keys, shape (N, 2)")
    if keys is not None and jnp.shape(keys)[:1] != (population,):
        raise ValueError(f"keys must have a leading axis of length {population}, got {keys.shape}")
    # Member i's keys are exactly those run(key=keys[i]) would use.
    if not isinstance(states, RunResult):
        states, keys = _spread(population, states, keys, loop.train, loop.val)
    start = _start(states, keys, loop.config, population=True)
    watch["fidelity_every"] = None
    return _Driver(loop, start, num_episodes, population, **watch).run()
