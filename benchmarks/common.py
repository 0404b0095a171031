"""Shared pieces of the benchmark scripts: a float32 MLP problem, timing, Markdown tables.

The model, the loss and the tables are gradhpo_bench's (the ``gradhpo`` command's), so the
scripts and the benches measure the same things.

Benchmarks report ratios measured in one run (machines are shared and noisy); absolute
times are printed only as context.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradhpo_bench import models
from gradhpo_bench.models import mlp
from gradhpo_bench.report import markdown_table

__all__ = ["markdown_table"]  # re-exported for the scripts


def mlp_init(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
    """He-initialised MLP weights for layer ``sizes`` (float32): gradhpo_bench's MLP."""
    return mlp(sizes).init(key)


def mlp_apply(params, x):
    return mlp([0] * (len(params) + 1)).apply(params, x)  # apply reads only the weights


def cross_entropy(params, batch):
    return jnp.mean(models.cross_entropy(mlp_apply(params, batch["x"]), batch["y"]))


def per_parameter_l2_train_loss(params, hyperparams, batch):
    """Cross-entropy plus per-parameter L2 with strengths ``exp(λ)`` (λ shaped like params)."""
    penalty = sum(
        jnp.sum(jnp.exp(h) * p**2)
        for p, h in zip(jax.tree.leaves(params), jax.tree.leaves(hyperparams), strict=True)
    )
    return cross_entropy(params, batch) + 0.5 * penalty


def val_loss(params, hyperparams, batch):
    return cross_entropy(params, batch)


def classification_batch(key: jax.Array, n: int, d: int, classes: int) -> dict[str, jax.Array]:
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (n, d), jnp.float32),
        "y": jax.random.randint(ky, (n,), 0, classes),
    }


def n_params(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def seconds_per_call(
    fn: Callable[[Any], Any], carry: Any, *, number: int = 20, repeats: int = 5
) -> float:
    """Median over ``repeats`` of the time per call of ``carry = fn(carry)``, run ``number`` times.

    ``fn`` is called once first (compilation and warm-up are not timed); each timed block
    ends with ``block_until_ready`` so asynchronous dispatch is included.
    """
    carry = jax.block_until_ready(fn(carry))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            carry = fn(carry)
        jax.block_until_ready(carry)
        times.append((time.perf_counter() - start) / number)
    return float(np.median(times))
