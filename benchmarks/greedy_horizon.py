"""Greedy's cost against its horizon T: compile time, compiled memory, step time.

Usage: ``python benchmarks/greedy_horizon.py [--quick]``

``GreedyOptimizer.step`` runs its ``unroll_steps`` inner steps in one ``lax.scan``, so the
compiled program — hence compile time and temporary memory — should not depend on T, while
the step time grows linearly in T (per unrolled step: one inner step, one VJP, one validation
gradient). On the model of ``step_cost.py`` (a float32 MLP with more than 100k parameters and
as many per-parameter L2 hyperparameters), with one training batch per unrolled step
(``Stacked``), this prints for T in {1, 5, 20, 50}, measured in one run:

* compile: seconds to trace, lower and compile a fresh optimizer's ``step`` (the least over
  interleaved rounds: load on a shared machine only ever adds), relative to T = 1;
* temp memory: ``lower(...).compile().memory_analysis().temp_size_in_bytes`` in MiB (at
  T = 1 XLA removes the one-trip loop and its carry buffers);
* step: the steady-state time of one ``step`` call in plain SGD steps (the unit of
  ``step_cost.py``, measured just before), and that divided by T;
* jaxpr eqns: equations of the step's jaxpr, nested jaxprs included (the program size).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import optax
from common import (
    classification_batch,
    markdown_table,
    n_params,
    per_parameter_l2_train_loss,
    seconds_per_call,
    val_loss,
)
from jax.extend.core import jaxprs_in_params
from step_cost import INNER_LR, plain_sgd_seconds, setup

from gradhpo import GreedyOptimizer, Stacked

HORIZONS = (1, 5, 20, 50)


def count_eqns(jaxpr) -> int:
    """Equations of ``jaxpr`` and, recursively, of the jaxprs nested in its equations."""
    return sum(1 + sum(count_eqns(j) for j in jaxprs_in_params(e.params)) for e in jaxpr.eqns)


def make_opt(T: int) -> GreedyOptimizer:
    return GreedyOptimizer(optax.sgd(INNER_LR), optax.adam(1e-3), unroll_steps=T, gamma=0.9)


def jitted_step(opt: GreedyOptimizer, val):
    return jax.jit(lambda s, b: opt.step(s, b, val, per_parameter_l2_train_loss, val_loss))


def compile_seconds(T, params, hyperparams, batches, val) -> float:
    """Trace, lower and compile the step of a fresh optimizer (nothing cached for it)."""
    opt = make_opt(T)
    state = opt.init(params, hyperparams)
    start = time.perf_counter()
    jitted_step(opt, val).lower(state, batches).compile()
    return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few repeats")
    args = parser.parse_args(argv)
    number, repeats, rounds = (2, 3, 2) if args.quick else (10, 5, 5)

    params, hyperparams, train, val = setup(args.quick)
    n, d = train["x"].shape
    keys = jax.random.split(jax.random.PRNGKey(1), max(HORIZONS))
    all_batches = jax.vmap(lambda k: classification_batch(k, n, d, 10))(keys)
    batches = {T: Stacked(jax.tree.map(lambda a, T=T: a[:T], all_batches)) for T in HORIZONS}

    # One-time compiler costs first (a horizon not in the table), then rounds over all T so
    # that load drift on a shared machine hits every T alike.
    warm = Stacked(jax.tree.map(lambda a: a[:3], all_batches))
    compile_seconds(3, params, hyperparams, warm, val)
    times = {T: [] for T in HORIZONS}
    for _ in range(rounds):
        for T in HORIZONS:
            times[T].append(compile_seconds(T, params, hyperparams, batches[T], val))

    rows, first = [], None
    for T in HORIZONS:
        opt = make_opt(T)
        state = opt.init(params, hyperparams)
        step = jitted_step(opt, val)
        compiled = step.lower(state, batches[T]).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        eqns = count_eqns(jax.make_jaxpr(step)(state, batches[T]).jaxpr)
        unit = plain_sgd_seconds(params, hyperparams, train, 5 * number, repeats)
        calls = max(1, number * 5 // T)
        seconds = seconds_per_call(
            lambda s, c=compiled, b=batches[T]: c(s, b), state, number=calls, repeats=repeats
        )
        compile_s = min(times[T])
        first = first or compile_s
        rows.append((T, compile_s / first, temp / 2**20, seconds / unit, seconds / unit / T, eqns))

    print(
        f"GreedyOptimizer, MLP with {n_params(params)} parameters and as many hyperparameters, "
        f"batch {n} per unrolled step, float32, {jax.devices()[0].platform}; compile at T = 1: "
        f"{first:.2f} s"
    )
    header = (
        "T",
        "compile / T=1",
        "temp memory (MiB)",
        "step / plain SGD step",
        "per inner step",
        "jaxpr eqns",
    )
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
