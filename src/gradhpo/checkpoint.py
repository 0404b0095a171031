"""Checkpoints of training runs on disk, with orbax-checkpoint: atomic, the last N kept.

A :class:`Checkpointer` saves everything a run needs to continue — the state (weights,
optimizer states, λ, metadata with HyperDistill's distilled batches and their key), the
Reptile φ, the episode index, the run's key and its history — as one orbax checkpoint per
saved episode. orbax writes each checkpoint into a temporary directory and renames it when
complete, so a process killed while writing leaves the previous checkpoint as the latest
loadable one. Pass it to :func:`gradhpo.training.run` (``checkpointer=``); after a restart,
:meth:`Checkpointer.restore` gives back the :class:`~gradhpo.training.RunResult`, and
``run(optimizer, restored, ...)`` continues it, bitwise as if never interrupted.

orbax-checkpoint is an optional dependency: ``pip install "gradhpo-jax[checkpoint]"``. Under
several processes (``jax.distributed``) every process calls the same methods; orbax
coordinates them and the primary process writes the shared files.

Reference: the orbax-checkpoint documentation, ``CheckpointManager``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradhpo.core._checks import positive_int
from gradhpo.core.state import BilevelState
from gradhpo.training.loop import RunResult

#: The layout version written into every checkpoint's ``meta`` item.
FORMAT = 1


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as error:  # pragma: no cover - exercised without the extra
        raise ImportError(
            'gradhpo.checkpoint needs orbax-checkpoint: pip install "gradhpo-jax[checkpoint]"'
        ) from error
    return ocp


class Checkpointer:
    """Save and restore training runs in ``directory``, one checkpoint per saved episode.

    Args:
      directory: where the checkpoints live (created if missing); one subdirectory per
        saved episode count.
      every: save after every ``every``-th episode (``run`` also saves after the last one
        and when a run stops early), ``>= 1``.
      keep: how many of the newest checkpoints to keep, ``>= 1``.

    Example:
      >>> import tempfile, jax.numpy as jnp, optax, gradhpo
      >>> from gradhpo.checkpoint import Checkpointer
      >>> from gradhpo.training import run
      >>> train = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)
      >>> val = lambda w, lam, b: jnp.sum((w - b) ** 2)
      >>> opt = gradhpo.OneStepOptimizer(optax.sgd(0.1))
      >>> init = opt.init(jnp.zeros(2), jnp.zeros(2))
      >>> ckpt = Checkpointer(tempfile.mkdtemp(), every=1, keep=2)
      >>> first = run(opt, init, jnp.ones(2), jnp.ones(2), train, val, num_episodes=3,
      ...             episode_length=5, lr_hyper=0.1, progress=False, checkpointer=ckpt)
      >>> ckpt.episodes()  # the newest two
      [2, 3]
      >>> restored = ckpt.restore(like=init)  # e.g. in a new process
      >>> restored.episode, bool(jnp.all(restored.state.hyperparams == first.state.hyperparams))
      (3, True)
      >>> later = run(opt, restored, jnp.ones(2), jnp.ones(2), train, val, num_episodes=1,
      ...             episode_length=5, lr_hyper=0.1, progress=False)
      >>> later.episode, later.history["val_loss"].shape
      (4, (4, 5))
    """

    def __init__(self, directory: str | os.PathLike, *, every: int = 1, keep: int = 3):
        if not isinstance(directory, str | os.PathLike) or not os.fspath(directory):
            raise ValueError(f"directory must be a non-empty path, got {directory!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = positive_int("every", every)
        self.keep = positive_int("keep", keep)
        ocp = _orbax()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, enable_async_checkpointing=False, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __repr__(self) -> str:
        return f"Checkpointer({self.directory!r}, every={self.every}, keep={self.keep})"

    def episodes(self) -> list[int]:
        """The episode counts of the complete checkpoints on disk, oldest first."""
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest(self) -> int | None:
        """The newest complete checkpoint's episode count, or ``None`` when there is none."""
        episodes = self.episodes()
        return episodes[-1] if episodes else None

    def save(self, result: RunResult) -> None:
        """Save ``result`` as the checkpoint of episode ``result.episode`` (atomically).

        A checkpoint already on disk for that episode is replaced.
        """
        if not isinstance(result, RunResult):
            raise TypeError(f"result must be a RunResult, got {type(result).__name__}")
        if result.key is None:
            raise ValueError("result holds no run position (key); save what run returned")
        ocp = _orbax()
        arrays = {"state": result.state, "key": result.key}
        if result.meta_params is not None:
            arrays["meta_params"] = result.meta_params
        arrays = jax.tree.map(_savable, arrays)
        history, layout = _flat_history(result.history)
        meta = {
            "format": FORMAT,
            "episode": int(result.episode),
            "stopped": result.stopped,
            "restart": result.meta_params is not None,
            "key_shape": list(np.shape(result.key)),
            "history": layout,
        }
        items = {"arrays": ocp.args.StandardSave(arrays), "meta": ocp.args.JsonSave(meta)}
        if history:
            items["history"] = ocp.args.StandardSave(history)
        step = int(result.episode)
        if step in self.episodes():
            self._manager.delete(step)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def restore(self, like: BilevelState | RunResult, episode: int | None = None) -> RunResult:
        """The :class:`~gradhpo.training.RunResult` saved at ``episode`` (default: newest).

        Args:
          like: a state of the run's structure — ``optimizer.init(params, hyperparams)``
            of the run (a population's: the stacked states), or a ``RunResult`` of it;
            only its structure, shapes and dtypes are used.
          episode: which checkpoint; ``None`` for the newest.

        Raises:
          FileNotFoundError: there is no complete checkpoint (at ``episode``).
        """
        ocp = _orbax()
        template = like.state if isinstance(like, RunResult) else like
        if not isinstance(template, BilevelState):
            raise TypeError(
                f"like must be a BilevelState (optimizer.init(...)) or a RunResult, got "
                f"{type(like).__name__}"
            )
        available = self.episodes()
        if episode is None:
            if not available:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            episode = available[-1]
        elif episode not in available:
            raise FileNotFoundError(
                f"no complete checkpoint of episode {episode} in {self.directory} "
                f"(there are: {available})"
            )
        meta = self._manager.restore(
            episode, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        ).meta
        if meta.get("format") != FORMAT:
            raise ValueError(f"checkpoint format {meta.get('format')!r} is not {FORMAT}")
        target = {
            "state": template,
            "key": np.zeros(meta["key_shape"], np.uint32),
        }
        if meta["restart"]:
            target["meta_params"] = template.params
        target = jax.tree.map(_restorable, target)
        items = {"arrays": ocp.args.StandardRestore(target)}
        if meta["history"]:
            items["history"] = ocp.args.StandardRestore()
        try:
            restored = self._manager.restore(episode, args=ocp.args.Composite(**items))
        except (ValueError, KeyError) as error:
            raise ValueError(
                f"the checkpoint of episode {episode} does not fit `like` (another "
                f"optimizer, model or population size?): {error}"
            ) from error
        arrays = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x,
                              restored.arrays)  # fmt: skip
        history = _unflat_history(
            restored.history if meta["history"] else {}, meta["history"], template
        )
        return RunResult(
            arrays["state"],
            arrays.get("meta_params"),
            history,
            meta["episode"],
            jnp.asarray(arrays["key"], jnp.uint32),
            meta["stopped"],
        )

    def close(self) -> None:
        """Wait for pending writes and release the directory."""
        self._manager.close()


def _savable(leaf: Any) -> Any:
    """Under several processes, a host-local or replicated array is saved as numpy.

    orbax refuses host-local ``jax.Array`` s in a multi-process program; a replicated global
    array is the same on every process. Arrays sharded across processes (a sharded λ)
    are saved, and restored, shard by shard. With one process nothing changes.
    """
    if jax.process_count() == 1 or not isinstance(leaf, jax.Array):
        return leaf
    if leaf.is_fully_addressable:
        return np.asarray(leaf)
    if leaf.sharding.is_fully_replicated:
        return np.asarray(leaf.addressable_data(0))
    return leaf


def _restorable(leaf: Any) -> Any:
    """The restore target of a leaf of ``like``: its placement where it has one.

    An array on a device of its own choosing (uncommitted, as ``init`` returns them) or one
    not sharded across processes is restored on the host and placed by the next program,
    next to data on any mesh; an array with an explicit sharding is restored into it.
    """
    leaf = _savable(leaf)
    if isinstance(leaf, jax.Array) and not leaf.committed:
        return np.zeros(leaf.shape, leaf.dtype)
    return leaf


def _flat_history(history: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The history as a flat dict of arrays, and its layout (name -> kind)."""
    flat, layout = {}, {}
    for name, value in history.items():
        if isinstance(value, list) and not value:
            layout[name] = "empty"
        elif name == "hyperparams":
            leaves = jax.tree.leaves(value)
            flat[name] = {str(i): np.asarray(x) for i, x in enumerate(leaves)}
            layout[name] = "hyperparams"
        else:
            flat[name] = np.asarray(value)
            layout[name] = "array"
    return flat, layout


def _unflat_history(flat: dict, layout: dict[str, str], template: BilevelState) -> dict:
    history = {}
    for name, kind in layout.items():
        if kind == "empty":
            history[name] = []
        elif kind == "hyperparams":
            leaves = [np.asarray(flat[name][str(i)]) for i in range(len(flat[name]))]
            treedef = jax.tree.structure(template.hyperparams)
            history[name] = jax.tree.unflatten(treedef, leaves)
        else:
            history[name] = jnp.asarray(flat[name])
    return history
