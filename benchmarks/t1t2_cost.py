"""Cost of one T1-T2 step in units of one plain SGD step, for the three finite-difference modes.

Usage: ``python benchmarks/t1t2_cost.py [--quick]``

An MLP (16 → 4096 → 8, 102 408 parameters), batch 32, float32; the hyperparameters are
per-parameter L2 strengths ``exp(λ_j)`` on the first ``dim λ`` weights (``dim λ`` ∈ {10, 10³,
10⁵}). Each ``T1T2Optimizer.step`` (``fd="weights"``, ``"coordinates"``, ``None``) and a
plain jitted SGD step on the same loss, model, batch and λ are compiled ahead of time, then
timed in interleaved rounds (best of the rounds), so every ratio comes from one run.

Expected: weights and exact mode flat in dim λ, coordinates mode growing linearly
(2·dim λ evaluations of Φ). Here λ enters only the penalty, so ``vmap`` computes the
λ-independent part of Φ (the network's gradient) once per chunk of coordinates and each
coordinate costs O(P + dim λ) (the penalty, the perturbed λ), not a full backward pass.
``--quick`` skips coordinates mode at dim λ = 10⁵ and repeats less.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import optax
from common import (
    classification_batch,
    cross_entropy,
    markdown_table,
    mlp_init,
    n_params,
)
from jax.flatten_util import ravel_pytree

from gradhpo import T1T2Optimizer

SIZES = (16, 4096, 8)
BATCH = 32
INNER_LR = 0.05
DIMS = (10, 1_000, 100_000)
MODES = ("weights", "coordinates", None)


def train_loss(params, hyperparams, batch):
    """Cross-entropy plus ``½ Σ_j exp(λ_j) w_j²`` over the first ``dim λ`` weights."""
    w_flat = ravel_pytree(params)[0][: hyperparams.shape[0]]
    return cross_entropy(params, batch) + 0.5 * jnp.sum(jnp.exp(hyperparams) * w_flat**2)


def val_loss(params, hyperparams, batch):
    return cross_entropy(params, batch)


def plain_sgd_step(hyperparams, train):
    """One SGD step ``w ← w - η ∇_w L_train(w, λ)``: the unit of cost."""

    def sgd_step(w):
        g = jax.grad(train_loss)(w, hyperparams, train)
        return jax.tree.map(lambda p, gi: p - INNER_LR * gi, w, g)

    return sgd_step


def t1t2_step(fd, train, val):
    """One ``T1T2Optimizer.step`` (weights and λ) as a function of the state."""
    opt = T1T2Optimizer(optax.sgd(INNER_LR), fd=fd)

    def step(state):
        return opt.step(state, train, val, train_loss, val_loss, 1e-3)

    return opt, step


def seconds(compiled, arg, number: int) -> float:
    """Mean time of ``number`` calls of an ahead-of-time compiled function."""
    start = time.perf_counter()
    for _ in range(number):
        out = compiled(arg)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / number


def measure(params, hyperparams, train, val, rounds, number, skip_coordinates):
    """Best-of-``rounds`` seconds per call of the plain step and of each mode, interleaved.

    Every function is compiled ahead of time (compilation is not timed), then each round
    times every function once, so load from other processes affects them alike; the
    minimum over rounds filters out interruptions. Coordinates mode, whose call can take
    seconds, runs one call per round, and only in the first round beyond dim λ = 10³.
    """
    calls = {"plain": (jax.jit(plain_sgd_step(hyperparams, train)), params)}
    for fd in MODES:
        if fd == "coordinates" and skip_coordinates:
            continue
        opt, step = t1t2_step(fd, train, val)
        calls[fd] = (jax.jit(step), opt.init(params, hyperparams))
    compiled = {name: (fn.lower(arg).compile(), arg) for name, (fn, arg) in calls.items()}
    best = {name: float("inf") for name in compiled}
    for r in range(rounds):
        for name, (fn, arg) in compiled.items():
            if name == "coordinates":
                if r > 0 and hyperparams.size > 1_000:
                    continue
                best[name] = min(best[name], seconds(fn, arg, 1))
            else:
                best[name] = min(best[name], seconds(fn, arg, number))
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip coordinates at 10⁵, repeat less")
    args = parser.parse_args(argv)
    rounds, number = (3, 5) if args.quick else (7, 20)

    key_p, key_t, key_v = jax.random.split(jax.random.PRNGKey(0), 3)
    params = mlp_init(key_p, SIZES)
    train = classification_batch(key_t, BATCH, SIZES[0], SIZES[-1])
    val = classification_batch(key_v, BATCH, SIZES[0], SIZES[-1])

    rows = []
    for dim in DIMS:
        hyperparams = jnp.full(dim, -4.0, jnp.float32)
        skip = args.quick and dim > 1_000
        best = measure(params, hyperparams, train, val, rounds, number, skip)
        unit = best["plain"]
        coords = best["coordinates"] / unit if "coordinates" in best else None
        rows.append(
            (
                dim,
                unit * 1e3,
                best["weights"] / unit,
                "skipped (--quick)" if coords is None else coords,
                "—" if coords is None else coords / dim,
                best[None] / unit,
            )
        )
    print(
        f"MLP {SIZES} ({n_params(params)} parameters), batch {BATCH}, float32, "
        f"{jax.devices()[0].platform}; cost of one T1T2Optimizer.step / one plain SGD step"
    )
    header = (
        "dim λ",
        "plain step (ms)",
        'fd="weights"',
        'fd="coordinates"',
        "coordinates / dim λ",
        "fd=None (exact)",
    )
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
