"""Shared pieces of the benchmark scripts: a float32 MLP problem, timing, Markdown tables.

Benchmarks report ratios measured in one run (machines are shared and noisy); absolute
times are printed only as context.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def mlp_init(key: jax.Array, sizes: Sequence[int]) -> list[dict[str, jax.Array]]:
    """He-initialised MLP weights for layer ``sizes`` (float32)."""
    params = []
    for k, (n_in, n_out) in zip(
        jax.random.split(key, len(sizes) - 1), itertools.pairwise(sizes), strict=True
    ):
        w = jax.random.normal(k, (n_in, n_out), jnp.float32) * jnp.sqrt(2.0 / n_in)
        params.append({"w": w, "b": jnp.zeros(n_out, jnp.float32)})
    return params


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(params, batch):
    logits = mlp_apply(params, batch["x"])
    return jnp.mean(
        jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, batch["y"][:, None], -1)[:, 0]
    )


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


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats are printed with three significant digits."""

    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
