"""Cost of one bilevel step in units of one plain jitted SGD step, and compilations.

Usage: ``python benchmarks/step_cost.py [--quick]``

An MLP with more than 100k parameters, batch 256, float32, per-parameter L2 strengths as
hyperparameters (as many hyperparameters as weights). Each optimizer's ``step`` is timed at
steady state (after compilation) and divided by the time of a plain jitted SGD step on the
same model and batch, measured in the same run. Compilations are counted over 200 steps
whose ``lr_hyper`` changes every step.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import optax
from common import (
    classification_batch,
    markdown_table,
    mlp_init,
    n_params,
    per_parameter_l2_train_loss,
    seconds_per_call,
    val_loss,
)

import gradhpo
from gradhpo.utils import count_compilations

INNER_LR = 0.05


def setup(quick: bool):
    sizes = (784, 128, 128, 10)
    batch_size = 64 if quick else 256
    key_p, key_t, key_v = jax.random.split(jax.random.PRNGKey(0), 3)
    params = mlp_init(key_p, sizes)
    hyperparams = jax.tree.map(lambda p: jnp.full_like(p, -4.0), params)
    train = classification_batch(key_t, batch_size, sizes[0], sizes[-1])
    val = classification_batch(key_v, batch_size, sizes[0], sizes[-1])
    return params, hyperparams, train, val


def plain_sgd_seconds(params, hyperparams, train, number, repeats) -> float:
    """Time of one jitted SGD step ``w ← w - η ∇_w L_train(w, λ)``: the unit of cost."""

    @jax.jit
    def sgd_step(w):
        g = jax.grad(per_parameter_l2_train_loss)(w, hyperparams, train)
        return jax.tree.map(lambda p, gi: p - INNER_LR * gi, w, g)

    return seconds_per_call(sgd_step, params, number=number, repeats=repeats)


def optimizer_seconds(opt, params, hyperparams, train, val, number, repeats) -> float:
    state = opt.init(params, hyperparams)

    def step(s):
        return opt.step(s, train, val, per_parameter_l2_train_loss, val_loss, 1e-3)

    return seconds_per_call(step, state, number=number, repeats=repeats)


def compilations_over(make_opt, params, hyperparams, train, val, n_steps: int) -> int:
    """Programs compiled during ``n_steps`` steps from a fresh state, ``lr_hyper`` decaying."""
    opt = make_opt()  # a new optimizer: nothing is compiled for it yet
    state = opt.init(params, hyperparams)
    with count_compilations() as counter:
        for i in range(n_steps):
            lr = 1e-3 / (1.0 + i)
            state = opt.step(state, train, val, per_parameter_l2_train_loss, val_loss, lr)
        jax.block_until_ready(state)
    return counter.count


def baseline_rows(params, hyperparams, train, val, unit, number, repeats, n_compile):
    rows = []
    for name, cls, target in (
        ("FO", gradhpo.FOOptimizer, 2.5),
        ("One-Step", gradhpo.OneStepOptimizer, 5.0),
    ):

        def make_opt(cls=cls):
            return cls(inner_optimizer=optax.sgd(INNER_LR))

        seconds = optimizer_seconds(make_opt(), params, hyperparams, train, val, number, repeats)
        compiles = compilations_over(make_opt, params, hyperparams, train, val, n_compile)
        rows.append((name, seconds / unit, f"≤ {target}×", compiles))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few repeats")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="the hyperparameters do not enter")
    number, repeats, n_compile = (5, 3, 20) if args.quick else (50, 7, 200)

    params, hyperparams, train, val = setup(args.quick)
    unit = plain_sgd_seconds(params, hyperparams, train, number, repeats)
    rows = baseline_rows(params, hyperparams, train, val, unit, number, repeats, n_compile)

    print(
        f"MLP with {n_params(params)} parameters and as many hyperparameters, batch "
        f"{train['y'].shape[0]}, float32, {jax.devices()[0].platform}; plain SGD step = "
        f"{unit * 1e3:.3f} ms"
    )
    header = ("step", "time / plain SGD step", "target", f"compilations over {n_compile} steps")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
