"""``gradhpo bench cost``: step time and compiled memory of every estimator against the horizon.

Problem: a 64-256-256-10 ReLU MLP (84k weights; ``--quick``: 64-32-10) on random
minibatches of 128 digits, with one L2 strength ``exp(λ)`` per weight (as many
hyperparameters as weights), plain SGD lr 0.05, float32.

For each horizon T, each method's compiled outer step (T inner steps and its hypergradient,
see :mod:`~gradhpo_bench.methods`) is timed after compilation and divided by T times
the time of one plain jitted SGD step measured in the same run: *cost per inner step in
plain-step units*. The exact rows time ``gradhpo.reverse_hypergradient`` through T steps
alone, without and with ``checkpoint_every = ⌈√T⌉``; the HyperDistill θ row times one run of
Algorithm 4 over T steps. Memory is the compiled program's temporary buffers
(``memory_analysis().temp_size_in_bytes``, XLA's own count; arguments and outputs excluded).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradhpo.reference import reverse_hypergradient
from gradhpo_bench import report
from gradhpo_bench.data import digits
from gradhpo_bench.loop import Task, TaskFns, init_state, outer_step
from gradhpo_bench.methods import LABELS, METHODS, Settings, build
from gradhpo_bench.models import cross_entropy, mlp

HORIZONS = (1, 10, 100, 1000)
INNER_LR = 0.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options (besides ``--seed``, ``--out``, ``--quick``)."""
    parser.add_argument(
        "--repeats", type=report.positive_int, default=3, help="timed runs per cell (median)"
    )


_MODEL = {True: mlp([64, 32, 10]), False: mlp([64, 256, 256, 10])}


def _make_fns(apply) -> TaskFns:
    def train_loss(params, log_l2, batch):
        penalty = sum(
            jnp.sum(jnp.exp(h) * p**2)
            for p, h in zip(jax.tree.leaves(params), jax.tree.leaves(log_l2), strict=True)
        )
        return jnp.mean(cross_entropy(apply(params, batch["x"]), batch["y"])) + 0.5 * penalty

    def val_loss(params, log_l2, batch):
        return jnp.mean(cross_entropy(apply(params, batch["x"]), batch["y"]))

    def sample(data, key, T):
        n = data["y"].shape[0]
        idx = jax.random.randint(key, (T, 128), 0, n)
        return jax.tree.map(lambda a: a[idx], data), jax.tree.map(lambda a: a[:256], data)

    return TaskFns(train_loss, val_loss, sample, None)


_FNS = {q: _make_fns(m.apply) for q, m in _MODEL.items()}


def _seconds(fn, *args, repeats: int) -> float:
    """Median wall time of ``fn(*args)`` over ``repeats`` runs (after one warm-up run)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _compile(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, compiled.memory_analysis().temp_size_in_bytes


def measure(task: Task, T: int, repeats: int) -> dict[str, tuple[float, int]]:
    """``row -> (seconds per outer step, temporary bytes)`` at horizon T, plus ``"plain"``."""
    fns = task.fns
    settings = Settings(T=T, inner_lr=INNER_LR, momentum=0.0, distill_batch=False)
    key = jax.random.PRNGKey(0)
    batches, val_batch = fns.sample(task.data, key, T)
    tl, vl = fns.train_loss, fns.val_loss
    inner = optax.sgd(INNER_LR)
    out = {}

    def plain(params, hyper, batches):
        def body(w, batch):
            g = jax.grad(tl)(w, hyper, batch)
            return jax.tree.map(lambda a, b: a - INNER_LR * b, w, g), None

        return jax.lax.scan(body, params, batches)[0]

    compiled, mem = _compile(plain, task.params0, task.hyper0, batches)
    out["plain"] = (_seconds(compiled, task.params0, task.hyper0, batches, repeats=repeats), mem)
    for name in METHODS:
        method = build(name, settings)
        state = init_state(method, task, key, T)
        step = partial(outer_step, method, train_loss=tl, val_loss=vl)
        compiled, mem = _compile(step, state, batches, val_batch)
        out[name] = (_seconds(compiled, state, batches, val_batch, repeats=repeats), mem)
        if name == "hyperdistill":
            theta = partial(method.opt.estimate_theta, train_loss_fn=tl, val_loss_fn=vl)
            compiled, mem = _compile(theta, state, batches, val_batch)
            out["theta"] = (_seconds(compiled, state, batches, val_batch, repeats=repeats), mem)
    for label, every in (("rmd", None), ("rmd-ckpt", max(1, math.ceil(math.sqrt(T))))):
        rmd = partial(
            reverse_hypergradient,
            train_loss_fn=tl,
            val_loss_fn=vl,
            inner_optimizer=inner,
            checkpoint_every=every,
        )
        args = (task.params0, task.hyper0, batches, val_batch)
        compiled, mem = _compile(rmd, *args)
        out[label] = (_seconds(compiled, *args, repeats=repeats), mem)
    return out


ROWS = {
    **{k: LABELS[k] + " (outer step)" for k in METHODS},
    "theta": "HyperDistill θ estimation (Algorithm 4)",
    "rmd": "reverse_hypergradient",
    "rmd-ckpt": "reverse_hypergradient, checkpoint_every = ⌈√T⌉",
}


def main(args: argparse.Namespace, out: pathlib.Path) -> str:
    """Run the cost bench; write ``cost.md`` and ``cost.png``; return the report."""
    horizons = (4,) if args.quick else HORIZONS
    repeats = 1 if args.quick else args.repeats
    model = _MODEL[args.quick]
    x, y = digits()
    params0 = model.init(jax.random.PRNGKey(args.seed))
    task = Task(
        _FNS[args.quick],
        {"x": jnp.asarray(x), "y": jnp.asarray(y)},
        params0,
        jax.tree.map(lambda p: jnp.full_like(p, math.log(1e-4)), params0),
    )
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params0))
    bar = report.progress_bar(len(horizons), "cost")
    results = {}
    for T in horizons:
        results[T] = measure(task, T, repeats)
        bar.update(1)
    bar.close()

    def units(T, row):
        plain = results[T]["plain"][0] / T
        return results[T][row][0] / (T * plain)

    header = ["estimator", *[f"T = {T}" for T in horizons]]
    time_rows = [
        [label, *[f"{units(T, row):.2f}" for T in horizons]] for row, label in ROWS.items()
    ]
    mib = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    mem_rows = [["plain SGD, T steps", *[mib(results[T]["plain"][1]) for T in horizons]]]
    mem_rows += [
        [label, *[mib(results[T][row][1]) for T in horizons]] for row, label in ROWS.items()
    ]
    unit_ms = [f"T = {T}: {1e3 * results[T]['plain'][0] / T:.3f} ms" for T in horizons]

    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for row, label in ROWS.items():
        axes[0].plot(horizons, [units(T, row) for T in horizons], "o-", label=label)
        axes[1].plot(
            horizons, [max(results[T][row][1], 1) / 2**20 for T in horizons], "o-", label=label
        )
    report.label_axes(
        axes[0],
        "horizon T",
        "time per inner step (plain SGD steps)",
        xlog=True,
        ylog=True,
        legend=0,
    )
    report.label_axes(axes[1], "horizon T", "temporary MiB", xlog=True, ylog=True, legend=6)
    return report.publish(
        out,
        "cost",
        fig,
        "Cost against the horizon",
        [
            f"{model.name} ({n_params} weights, as many hyperparameters), batch 128, float32, "
            f"plain SGD lr {INNER_LR}; median of {repeats} timed run(s) after compilation. One "
            f"plain SGD step: {'; '.join(unit_ms)}.",
            "",
            "## Time per inner step, in plain SGD steps",
            "",
            "An outer step is T inner steps and one hypergradient; its time is divided by T "
            "plain steps. The exact rows and θ are the hypergradient computation alone.",
            "",
            report.markdown_table(header, time_rows),
            "",
            "## Compiled temporary memory (MiB)",
            "",
            report.markdown_table(header, mem_rows),
        ],
    )
