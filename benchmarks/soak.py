"""Soak: a long run must not grow memory, compile again, or pay more than linearly for history.

Usage: ``python benchmarks/soak.py [--quick]``

1. 20,000 ``step`` calls of One-Step on one problem: resident memory (RSS) and programs
   compiled, sampled every 2,000 steps (after a warm-up).
2. ``run`` over 2,000 episodes of 10 inner steps (a jittable sampler): RSS and compilations
   every 200 episodes, from a callback.
3. The cost of the history against the number of episodes: the time ``run`` spends after
   its last episode (stacking the per-episode records), for 250 / 500 / 1,000 / 2,000
   episodes, with λ of 250,000 scalars kept every episode and with ``hyperparams_every=None``;
   printed as time per episode relative to the 250-episode run (flat = linear).

RSS is read from ``/proc/self/statm`` (Linux); elsewhere the column is empty.
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
from common import markdown_table

import gradhpo
from gradhpo.training import Sampler, run
from gradhpo.utils import count_compilations


def rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def train_loss(w, lam, batch):
    return jnp.mean((batch["x"] @ w - batch["y"]) ** 2) + jnp.mean(jnp.exp(lam) * w**2)


def val_loss(w, lam, batch):
    return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)


def sampler(d: int, n: int = 32) -> Sampler:
    def draw(data, key):
        x = jax.random.normal(key, (n, d))
        return {"x": x, "y": x @ data}

    return Sampler(draw, jnp.linspace(-1.0, 1.0, d))


def steps_soak(total: int, every: int) -> list[list[str]]:
    opt = gradhpo.OneStepOptimizer(optax.sgd(0.05))
    d = 64
    state = opt.init(jnp.zeros(d), jnp.zeros(d))
    draw = sampler(d)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    batch, val = draw(keys[0]), draw(keys[1])
    for _ in range(100):  # warm-up: compile, settle the allocator
        state = opt.step(state, batch, val, train_loss, val_loss, 0.01)
    jax.block_until_ready(state)
    base = rss_mib()
    rows = []
    with count_compilations() as counter:
        for i in range(1, total + 1):
            state = opt.step(state, batch, val, train_loss, val_loss, 0.01)
            if i % every == 0:
                jax.block_until_ready(state)
                rss = rss_mib()
                grown = "" if rss is None else f"{rss - base:+.1f}"
                rows.append([str(i), grown, str(counter.count)])
    return rows


def episodes_soak(total: int, every: int) -> list[list[str]]:
    opt = gradhpo.OneStepOptimizer(optax.sgd(0.05))
    d = 64
    state = opt.init(jnp.zeros(d), jnp.zeros(d))
    kwargs = dict(episode_length=10, lr_hyper=0.01, progress=False)
    train, val = sampler(d), sampler(d)  # made once: a new sampler is a new program
    run(opt, state, train, val, train_loss, val_loss, num_episodes=2, **kwargs)
    base = rss_mib()
    rows = []

    def callback(episode, state, records):
        if (episode + 1) % every == 0:
            rss = rss_mib()
            grown = "" if rss is None else f"{rss - base:+.1f}"
            rows.append([str(episode + 1), grown, str(counter.count)])

    with count_compilations() as counter:
        run(
            opt,
            state,
            train,
            val,
            train_loss,
            val_loss,
            num_episodes=total,
            callback=callback,
            **kwargs,
        )
    return rows


def history_cost(counts, size: int) -> list[list[str]]:
    """Seconds ``run`` spends after the last episode, per episode, relative to the first count."""
    opt = gradhpo.FOOptimizer(optax.sgd(0.05))

    def tl(w, lam, batch):
        return jnp.sum((w - batch) ** 2) + 1e-6 * jnp.sum(lam) * jnp.sum(w)

    def vl(w, lam, batch):
        return jnp.sum(w**2) + 1e-3 * jnp.sum(lam**2)

    rows, first = [], {}
    for every in (1, None):
        for n in counts:
            state = opt.init(jnp.zeros(8), jnp.zeros(size))
            last = {}

            def callback(episode, state, records, n=n, last=last):
                if episode == n - 1:
                    jax.block_until_ready(state)
                    last["t"] = time.perf_counter()

            kwargs = dict(num_episodes=n, episode_length=1, lr_hyper=0.1, progress=False)
            out = run(
                opt,
                state,
                jnp.ones(8),
                jnp.ones(8),
                tl,
                vl,
                callback=callback,
                hyperparams_every=every,
                **kwargs,
            )
            jax.block_until_ready(out.history)
            tail = time.perf_counter() - last["t"]
            per = tail / n
            first.setdefault(every, per)
            label = "every episode" if every == 1 else "none"
            rows.append([label, str(n), f"{tail * 1e3:.1f}", f"{per / first[every]:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps and episodes")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s)\n")

    print(f"## {20_000 // scale} step calls (One-Step, 64 weights)\n")
    rows = steps_soak(20_000 // scale, 2_000 // scale)
    print(markdown_table(["steps", "RSS growth (MiB)", "compilations"], rows))

    print(f"\n## run: {2_000 // scale} episodes of 10 inner steps\n")
    rows = episodes_soak(2_000 // scale, 200 // scale)
    print(markdown_table(["episodes", "RSS growth (MiB)", "compilations"], rows))

    counts = [c // scale for c in (250, 500, 1_000, 2_000)]
    print("\n## history after the last episode (λ of 250,000 scalars)\n")
    rows = history_cost(counts, 250_000 // scale)
    headers = ["λ snapshots", "episodes", "time after last episode (ms)", "per episode, ratio"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
