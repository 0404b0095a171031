"""Overhead of gradhpo.training.run: compilations, per-step cost, population throughput.

Usage: ``python benchmarks/loop_overhead.py [--quick]``

1. Programs compiled during a 20-episode ``run`` with a decaying hyper learning rate (an
   optax schedule) and Reptile restarts, by program name: each should compile once.
2. Steady-state time per inner step of ``run`` with a jittable sampler, relative to a
   hand-written jitted ``lax.scan`` of the same math (sample a minibatch, ``opt.step``).
3. Throughput of a 32-member population (``run_population``, one vmapped program) relative to
   32 sequential ``run`` calls, for a small MLP.
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
from common import markdown_table, mlp_apply, mlp_init

import gradhpo
from gradhpo.training import minibatches, run, run_population
from gradhpo.utils import count_compilations


def regression_data(key, n, d):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    y = jnp.sin(x @ jax.random.normal(kw, (d,)))
    return {"x": x, "y": y}


def mse(params, batch):
    return jnp.mean((mlp_apply(params, batch["x"])[:, 0] - batch["y"]) ** 2)


def train_loss(params, log_l2, batch):
    """MSE plus one L2 strength per layer, ``exp(λ_l)``."""
    penalty = sum(jnp.exp(h) * jnp.sum(p["w"] ** 2) for p, h in zip(params, log_l2, strict=True))
    return mse(params, batch) + penalty


def val_loss(params, log_l2, batch):
    return mse(params, batch)


def setup(sizes, n=512, seed=0):
    k_p, k_t, k_v = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = mlp_init(k_p, sizes)
    log_l2 = [jnp.asarray(-4.0, jnp.float32) for _ in params]
    return params, log_l2, regression_data(k_t, n, sizes[0]), regression_data(k_v, 128, sizes[0])


def compilations(opt, params, log_l2, train, val):
    schedule = optax.exponential_decay(0.1, 50, 0.5)
    state = opt.init(params, log_l2)
    with count_compilations() as counter:
        out = run(
            opt,
            state,
            minibatches(train, 32),
            val,
            train_loss,
            val_loss,
            num_episodes=20,
            episode_length=25,
            lr_hyper=schedule,
            lr_reptile=1.0,
            progress=False,
        )
        jax.block_until_ready(out)
    return counter


def per_step_ratio(opt, params, log_l2, train, val, steps, repeats):
    sampler = minibatches(train, 32)
    lr = 0.05

    @jax.jit
    def hand_scan(state, key):
        def body(s, k):
            return opt.step(s, sampler(k), val, train_loss, val_loss, lr), None

        return jax.lax.scan(body, state, jax.random.split(key, steps))[0]

    state = opt.init(params, log_l2)
    jax.block_until_ready(hand_scan(state, jax.random.PRNGKey(0)))
    run(
        opt,
        state,
        sampler,
        val,
        train_loss,
        val_loss,
        episode_length=steps,
        lr_hyper=lr,
        progress=False,
    )
    t_run, t_hand = [], []
    for r in range(repeats):  # interleaved, best of
        start = time.perf_counter()
        jax.block_until_ready(
            run(
                opt,
                state,
                sampler,
                val,
                train_loss,
                val_loss,
                episode_length=steps,
                lr_hyper=lr,
                progress=False,
                key=jax.random.PRNGKey(r),
            ).state
        )
        t_run.append(time.perf_counter() - start)
        start = time.perf_counter()
        jax.block_until_ready(hand_scan(state, jax.random.PRNGKey(r)))
        t_hand.append(time.perf_counter() - start)
    return min(t_run) / steps, min(t_hand) / steps


def population_ratio(opt, params, log_l2, train, val, members, episodes, length):
    sampler = minibatches(train, 16)
    lams = [
        [jnp.asarray(-6.0 + 4.0 * i / members, jnp.float32) for _ in params] for i in range(members)
    ]
    keys = jax.random.split(jax.random.PRNGKey(1), members)
    kw = dict(
        num_episodes=episodes, episode_length=length, lr_hyper=0.05, lr_reptile=1.0, progress=False
    )
    states = jax.vmap(lambda lam: opt.init(params, lam))(
        jax.tree.map(lambda *xs: jnp.stack(xs), *lams)
    )

    def population():
        out = run_population(opt, states, sampler, val, train_loss, val_loss, keys=keys, **kw)
        return jax.block_until_ready(out.state)

    def sequential():
        for i in range(members):
            out = run(
                opt,
                opt.init(params, lams[i]),
                sampler,
                val,
                train_loss,
                val_loss,
                key=keys[i],
                **kw,
            )
            jax.block_until_ready(out.state)

    population()
    sequential()  # compile both first
    start = time.perf_counter()
    population()
    t_pop = time.perf_counter() - start
    start = time.perf_counter()
    sequential()
    t_seq = time.perf_counter() - start
    return t_seq / t_pop, t_pop, t_seq


def population_window_cost(opt, params, log_l2, train, val, members, length):
    """Per-inner-step population cost with hyper_update_every = 1, 3 and ``length``.

    A window of k steps is k - 1 inner steps and one full step, so the expected cost of
    k = 3 is ``(2 c_inner + c_full) / 3``, with ``c_full`` the k = 1 cost and ``c_inner``
    measured with one hyper-update per episode (k = ``length``). A ``lax.cond`` under
    ``vmap`` would instead cost ``c_full`` at every step.
    """
    sampler = minibatches(train, 16)
    keys = jax.random.split(jax.random.PRNGKey(2), members)
    states = jax.vmap(lambda i: opt.init(params, [jnp.full((), -3.0) for _ in params]))(
        jnp.arange(members)
    )

    def timed(every):
        kw = dict(episode_length=length, hyper_update_every=every, lr_hyper=0.05, progress=False)
        run_population(opt, states, sampler, val, train_loss, val_loss, keys=keys, **kw)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            out = run_population(opt, states, sampler, val, train_loss, val_loss, keys=keys, **kw)
            jax.block_until_ready(out.state)
            best = min(best, time.perf_counter() - start)
        return best / length

    c_full, c_three, c_inner = timed(1), timed(3), timed(length)
    return c_three / ((2 * c_inner + c_full) / 3), c_three / c_full


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    args = parser.parse_args(argv)
    steps, repeats = (100, 2) if args.quick else (1000, 5)
    members, episodes, length = (8, 2, 20) if args.quick else (32, 5, 50)

    opt = gradhpo.OneStepOptimizer(inner_optimizer=optax.sgd(0.05, momentum=0.9))
    params, log_l2, train, val = setup((16, 64, 64, 1))
    counter = compilations(opt, params, log_l2, train, val)
    print("Programs compiled during a 20-episode run (decaying hyper LR, Reptile):")
    print(markdown_table(("program", "compilations"), sorted(counter.by_name.items())))
    print()

    t_run, t_hand = per_step_ratio(opt, params, log_l2, train, val, steps, repeats)
    rows = [
        (
            "run / hand-written lax.scan, per inner step",
            t_run / t_hand,
            "≤ 1.2×",
            f"{t_run * 1e6:.1f} µs vs {t_hand * 1e6:.1f} µs",
        )
    ]
    for sizes in ((1, 8, 8, 1), (1, 40, 40, 1)):
        small = setup(sizes, n=256)
        ratio, t_pop, t_seq = population_ratio(opt, *small, members, episodes, length)
        rows.append(
            (
                f"{members} sequential runs / one {members}-member population, MLP {sizes}",
                ratio,
                "≥ 10×",
                f"{t_seq:.2f} s vs {t_pop:.2f} s",
            )
        )
    small = setup((1, 40, 40, 1), n=256)
    vs_expected, vs_full = population_window_cost(opt, *small, members, 48)
    rows.append(
        (
            f"{members}-member population, hyper_update_every=3: cost per inner step / "
            "(2 inner + 1 full step)/3",
            vs_expected,
            "≤ 1.3×",
            f"{vs_full:.2f}× the hyper_update_every=1 cost per step",
        )
    )
    print(
        f"One-Step, SGD momentum inner, float32, {jax.devices()[0].platform}, "
        f"{os.cpu_count()} CPU cores"
    )
    print(markdown_table(("ratio", "value", "target", "times"), rows))


if __name__ == "__main__":
    main()
