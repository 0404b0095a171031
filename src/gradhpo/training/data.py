"""Batch sources for the training loops: jittable samplers, fixed batches, Python sources.

A loop draws one training batch per inner step and one validation batch per step call. Three
kinds of source are accepted, with a trade-off:

* a :class:`Sampler` (``sample(data, key) -> batch`` over arrays it carries, e.g.
  :func:`minibatches`), or a fixed batch (any pytree of arrays, reused every step): jittable,
  so a whole episode runs as one compiled ``lax.scan`` with no Python per step — the fast
  path, and the only one populations (``vmap``) can use;
* a Python callable ``() -> batch``: the simple usage; each step is one jitted call fed from
  Python (about a dispatch's overhead per step, and no ``vmap`` over populations);
* any iterator of batches (a generator): as flexible as a callable, with the same
  per-step cost; running out before the run ends is an error;
* a list of batches, or any iterable that is not an iterator (a PyTorch ``DataLoader``, a
  ``tf.data.Dataset`` whose batches convert to arrays): read in passes, a new pass starting
  when one ends. A single batch is therefore a tuple, a dict or an array, never a list
  (as for :class:`~gradhpo.Stacked`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradhpo.core._checks import positive_int
from gradhpo.core.types import Batch, PyTree
from gradhpo.utils.tree import leading_axis_length, stack_batches


@jax.tree_util.register_pytree_node_class
class Sampler:
    """A jittable batch source: ``sampler(key) = sample_fn(data, key)``.

    ``data`` (any pytree of arrays) is a pytree child, passed to compiled programs as an
    argument rather than baked in as a constant; ``sample_fn`` is static (hashed as given, so
    reuse one function object).

    A *window sampler* (``window=True``) draws all the batches of a window at once, from
    one key: as ``train_data`` its ``sample_fn(data, key, num_steps)`` returns
    ``num_steps`` batches stacked along a leading axis; as ``val_data`` its
    ``sample_fn(data, key)`` receives the same key as the window's training draw. The
    training and validation batches of a window can so come from one task, as in
    meta-learning (one task per episode, support batches for the inner steps and a query
    batch for the hypergradient).

    Args:
      sample_fn: ``sample_fn(data, key) -> batch`` (or, for a training window sampler,
        ``sample_fn(data, key, num_steps) -> stacked batches``), jittable, fixed shapes.
      data: the arrays to sample from (``None`` when ``sample_fn`` needs none).
      window: draw whole windows (see above).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo.training import Sampler
      >>> noise = Sampler(lambda data, key: data + jax.random.normal(key, (2,)), jnp.zeros(2))
      >>> noise(jax.random.PRNGKey(0)).shape
      (2,)
      >>> tasks = Sampler(lambda data, key, n: jnp.full((n, 2), jax.random.normal(key)),
      ...                 window=True)
      >>> tasks.draw_window(jax.random.PRNGKey(0), 3).shape
      (3, 2)
    """

    def __init__(
        self,
        sample_fn: Callable[..., Batch],
        data: PyTree = None,
        *,
        window: bool = False,
    ):
        if not callable(sample_fn):
            raise TypeError(f"sample_fn must be callable, got {type(sample_fn).__name__}")
        if not isinstance(window, bool):
            raise TypeError(f"window must be True or False, got {window!r}")
        self.sample_fn = sample_fn
        self.data = data
        self.window = window

    def __call__(self, key: jax.Array) -> Batch:
        if self.window:
            raise ValueError(
                "this Sampler draws whole windows (window=True): use draw_window(key, num_steps)"
            )
        return self.sample_fn(self.data, key)

    def draw_window(self, key: jax.Array, num_steps: int | None = None) -> Batch:
        """A window sampler's draw: ``sample_fn(data, key, num_steps)`` (or ``(data, key)``)."""
        if num_steps is None:
            return self.sample_fn(self.data, key)
        return self.sample_fn(self.data, key, num_steps)

    def tree_flatten(self):
        return (self.data,), (self.sample_fn, self.window)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        (obj.sample_fn, obj.window), obj.data = aux, children[0]
        return obj


@dataclasses.dataclass(frozen=True)
class _Minibatch:
    """``sample_fn`` of :func:`minibatches`; hashable by value so equal settings share a program."""

    batch_size: int
    replace: bool

    def __call__(self, data: PyTree, key: jax.Array) -> Batch:
        n = leading_axis_length(data, "data")
        if self.replace:  # O(batch_size)
            idx = jax.random.randint(key, (self.batch_size,), 0, n)
        else:  # the top k of n uniforms: a uniform k-subset in O(n), no sort of all n
            idx = jax.lax.top_k(jax.random.uniform(key, (n,)), self.batch_size)[1]
        return jax.tree.map(lambda a: a[idx], data)


def _fixed(data: PyTree, key: jax.Array) -> Batch:
    return data


def minibatches(data: PyTree, batch_size: int, *, replace: bool = True) -> Sampler:
    """A sampler of random minibatches along the leading (example) axis of ``data``.

    Every draw is independent: ``batch_size`` i.i.d. uniform indices (``replace=True``, the
    default, O(batch_size) per draw), or a uniform random subset of distinct examples
    (``replace=False``, O(n) per draw through ``lax.top_k`` of n uniforms — cheaper than
    ``jax.random.choice(replace=False)``, which sorts all n).

    Args:
      data: a pytree of arrays sharing a leading axis of examples.
      batch_size: examples per batch, ``>= 1`` (and ``<= n`` without replacement).
      replace: draw indices with replacement.

    Returns:
      A :class:`Sampler`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo.training import minibatches
      >>> sampler = minibatches({"x": jnp.arange(10.0)}, 4)
      >>> sampler(jax.random.PRNGKey(0))["x"].shape
      (4,)
    """
    n = leading_axis_length(data, "data")
    batch_size = positive_int("batch_size", batch_size)
    if not replace and batch_size > n:
        raise ValueError(f"batch_size must be <= {n} (the number of examples), got {batch_size}")
    return Sampler(_Minibatch(batch_size, replace), jax.tree.map(jnp.asarray, data))


@dataclasses.dataclass(frozen=True)
class _LocalMinibatch:
    """``sample_fn`` of :func:`sharded_minibatches`: each shard draws from its own rows."""

    batch_size: int  # per shard
    replace: bool
    mesh: Any
    axis: str

    def __call__(self, data: PyTree, key: jax.Array) -> Batch:
        spec = jax.sharding.PartitionSpec(self.axis)
        draw = _Minibatch(self.batch_size, self.replace)

        def local(rows, key):
            return draw(rows, jax.random.fold_in(key, jax.lax.axis_index(self.axis)))

        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(spec, jax.sharding.PartitionSpec()),
            out_specs=spec,
        )(data, key)


def sharded_minibatches(
    data: PyTree, batch_size: int, mesh: jax.sharding.Mesh, axis: str = "batch", *, replace=True
) -> Sampler:
    """Minibatches drawn shard by shard: every device (or process) samples its own rows.

    ``data`` is a global array sharded over the mesh axis ``axis`` along its leading
    (example) axis — on several processes, e.g. built with
    ``jax.make_array_from_process_local_data`` from each process's own rows. Each shard draws
    ``batch_size / mesh.shape[axis]`` of its own rows (with its own key, the draw's key
    folded with the shard's index), so the batch is sharded like the data and no example
    crosses devices. :func:`minibatches` instead draws from all rows, gathering them.

    Args:
      data: a pytree of arrays sharded over ``axis`` along their leading axis.
      batch_size: the global batch size, a multiple of the axis size.
      mesh: the mesh of the sharding.
      axis: the mesh axis of the examples.
      replace: draw with replacement (see :func:`minibatches`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> from gradhpo.training import sharded_minibatches
      >>> mesh = jax.make_mesh((1,), ("batch",))
      >>> x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P("batch")))
      >>> sharded_minibatches(x, 4, mesh)(jax.random.PRNGKey(0)).shape
      (4,)
    """
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise ValueError(f"axis must be one of the mesh axes {tuple(mesh.shape)}, got {axis!r}")
    shards = mesh.shape[axis]
    batch_size = positive_int("batch_size", batch_size)
    if batch_size % shards:
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of the {shards} shards of axis {axis!r}"
        )
    n = leading_axis_length(data, "data")
    if n % shards:
        raise ValueError(f"data has {n} examples, not a multiple of the {shards} shards")
    per_shard = batch_size // shards
    if not replace and per_shard > n // shards:
        raise ValueError(
            f"batch_size must be <= {n} (the number of examples) without replacement, got "
            f"{batch_size}"
        )
    return Sampler(_LocalMinibatch(per_shard, replace, mesh, axis), data)


def fixed_batch(batch: PyTree) -> Sampler:
    """A sampler that returns ``batch`` at every step (full-batch training).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo.training import fixed_batch
      >>> fixed_batch(jnp.ones(3))(jax.random.PRNGKey(0))
      Array([1., 1., 1.], dtype=float32)
    """
    return Sampler(_fixed, batch)


class DataExhaustedError(ValueError):
    """An iterator given as ``train_data`` or ``val_data`` ran out before the run ended.

    :func:`run` returns the episodes completed so far (``result.stopped ==
    "data_exhausted"``) unless ``strict=True``, which raises this with the partial result.

    Attributes:
      result: the :class:`RunResult` of the completed episodes (set by the loop).
    """

    result: Any = None


class HostSource:
    """A Python batch source, read on the host.

    A callable ``() -> batch``; an iterator (read once: running out is an error); or an
    iterable that is not an iterator (a list of batches, a PyTorch ``DataLoader``, a
    ``tf.data.Dataset``), read in passes, a new pass starting when one ends.
    """

    def __init__(self, source: Callable[[], Batch] | Iterator[Batch] | Iterable, name: str):
        self.name = name
        self.passes = None
        if not callable(source) and not isinstance(source, Iterator):
            self.passes, source = source, iter(source)  # re-iterable: one pass at a time
        self.source = source

    def draw(self, num_steps: int) -> Batch:
        """``num_steps`` batches from the source, stacked along a leading axis."""
        return stack_batches([self() for _ in range(num_steps)])

    def __call__(self) -> Batch:
        if callable(self.source):
            return self.source()
        try:
            return next(self.source)
        except StopIteration:
            if self.passes is None:
                raise DataExhaustedError(
                    f"{self.name} ran out of batches before the run ended"
                ) from None
        self.source = iter(self.passes)  # the next pass
        try:
            return next(self.source)
        except StopIteration:
            raise ValueError(f"{self.name} holds no batches") from None


def _is_batch(data: Any) -> bool:
    """Whether ``data`` is a pytree of arrays and numbers (a batch), not a loader object."""
    leaves = jax.tree.leaves(data)
    return all(isinstance(x, jax.Array | np.ndarray | np.generic | int | float) for x in leaves)


def as_source(data: Any, name: str) -> Sampler | HostSource:
    """Classify a user's data argument: a :class:`Sampler`, a fixed batch, or a host source."""
    if isinstance(data, Sampler):
        return data
    if callable(data) or isinstance(data, Iterator | list):
        return HostSource(data, name)  # a list is a sequence of batches, as for Stacked
    if isinstance(data, Iterable) and not _is_batch(data):
        return HostSource(data, name)  # a data loader: iterated
    if data is not None and not jax.tree.leaves(data):
        raise ValueError(f"{name} must be a Sampler, a batch of arrays, a callable or an iterator")
    return fixed_batch(data)


@jax.tree_util.register_pytree_node_class
class Tasks:
    """A jittable task distribution for meta-learning: ``run(opt, state, tasks, None, ...)``.

    Every episode of :func:`~gradhpo.training.run` given a ``Tasks`` source draws a
    *meta-batch* of ``meta_batch_size`` tasks that stay fixed for the whole episode. Each
    task adapts its own copy of the weights from the meta-initialisation φ (support batches
    drawn from that task at every inner step) while all of them share λ: every
    hyper-update applies the meta-batch mean of the tasks' hypergradients, and Reptile
    moves φ towards the mean of the adapted weights. The meta-batch runs as one
    ``vmap``-ped compiled program.

    Args:
      sample_fn: ``sample_fn(data, key) -> task``, jittable: one task (any pytree of
        arrays of fixed shapes, e.g. a sinusoid's amplitude, phase and support inputs).
      train_batch: ``train_batch(task, key) -> batch``: the support batch of one inner
        step (return the task's whole support set for full-batch adaptation).
      val_batch: ``val_batch(task, key) -> batch``: the query batch of one hyper-update.
      data: arrays ``sample_fn`` reads (``None`` when it needs none); a pytree child,
        passed to compiled programs as an argument.
      meta_batch_size: tasks per episode, B ≥ 1.

    The functions are static (hashed as given: define them once). Randomness: episode e
    draws its tasks from one key and gives task b its own key stream for the batches; a
    run is a pure function of its key.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gradhpo.training import Tasks
      >>> def sample(data, key):  # a task: a target vector
      ...     return {"target": jax.random.normal(key, (3,))}
      >>> def support(task, key):
      ...     return task["target"] + 0.1 * jax.random.normal(key, (3,))
      >>> def query(task, key):
      ...     return task["target"]
      >>> tasks = Tasks(sample, support, query, meta_batch_size=4)
      >>> jax.tree.map(jnp.shape, tasks.sample(jax.random.PRNGKey(0)))
      {'target': (4, 3)}
    """

    def __init__(
        self,
        sample_fn: Callable[[PyTree, jax.Array], PyTree],
        train_batch: Callable[[PyTree, jax.Array], Batch],
        val_batch: Callable[[PyTree, jax.Array], Batch],
        data: PyTree = None,
        *,
        meta_batch_size: int = 1,
    ):
        for name, fn in (
            ("sample_fn", sample_fn),
            ("train_batch", train_batch),
            ("val_batch", val_batch),
        ):
            if not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}")
        self.sample_fn, self.train_batch, self.val_batch = sample_fn, train_batch, val_batch
        self.data = data
        self.meta_batch_size = positive_int("meta_batch_size", meta_batch_size)

    def sample(self, key: jax.Array) -> PyTree:
        """``meta_batch_size`` tasks stacked along a leading axis, from ``split(key, B)``.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from gradhpo.training import Tasks
          >>> tasks = Tasks(lambda data, key: jax.random.normal(key, (2,)),
          ...               lambda task, key: task, lambda task, key: task, meta_batch_size=3)
          >>> tasks.sample(jax.random.PRNGKey(0)).shape
          (3, 2)
        """
        keys = jax.random.split(key, self.meta_batch_size)
        return jax.vmap(self.sample_fn, in_axes=(None, 0))(self.data, keys)

    def samplers(self, task: PyTree) -> tuple[Sampler, Sampler]:
        """The (training, validation) batch samplers of one task.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from gradhpo.training import Tasks
          >>> tasks = Tasks(lambda data, key: jnp.ones(2),
          ...               lambda task, key: 2 * task, lambda task, key: 3 * task)
          >>> train, val = tasks.samplers(jnp.ones(2))
          >>> train(jax.random.PRNGKey(0)), val(jax.random.PRNGKey(0))
          (Array([2., 2.], dtype=float32), Array([3., 3.], dtype=float32))
        """
        return Sampler(self.train_batch, task), Sampler(self.val_batch, task)

    def tree_flatten(self):
        aux = (self.sample_fn, self.train_batch, self.val_batch, self.meta_batch_size)
        return (self.data,), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.sample_fn, obj.train_batch, obj.val_batch, obj.meta_batch_size = aux
        obj.data = children[0]
        return obj
