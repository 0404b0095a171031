"""``gradhpo bench cost``: step time and compiled memory of every estimator against the horizon.

Problem: a 64-256-256-10 ReLU MLP (84k weights; ``--quick``: 64-32-10) on random
minibatches of 128 digits, with one L2 strength ``exp(λ)`` per weight (as many
hyperparameters as weights), plain SGD lr 0.05, float32.

For each horizon T ∈ {10, 100, 400, 1000}, each method's compiled outer step (T inner
steps and its hypergradient, see :mod:`~gradhpo_bench.methods`, the long-horizon estimators
included) is timed after compilation and divided by T times the time of one plain jitted
SGD step measured in the same run: *cost per inner step in plain-step units*. The memory
strategy rows time ``gradhpo.reverse_hypergradient`` through T steps alone, for every
``checkpoint`` (``None``, ``"step"``, ``"sqrt"``, ``"binomial"``: equinox's checkpointed
scan with ⌈log₂T⌉ checkpoints) without and with ``mixed_mode``; the HyperDistill θ row times
one run of Algorithm 4 over T steps. Forward mode is refused here (84k hyperparameters:
dim λ JVPs per step). Memory is the compiled program's temporary buffers
(``memory_analysis().temp_size_in_bytes``, XLA's own count; arguments and outputs excluded).

Two more measurements: mixed mode at T = 100 with batch 1024 (where the inner gradient's
activations dominate), and the implicit hypergradient (CG, 20 iterations, after 20,000
inner steps) against reverse mode through the same 20,000-step unroll on ridge regression
with one L2 strength per feature (scikit-learn's diabetes data, float64).
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

from gradhpo import ImplicitOptimizer, ReverseModeOptimizer
from gradhpo.reference import reverse_hypergradient
from gradhpo_bench import report
from gradhpo_bench.data import digits
from gradhpo_bench.loop import Task, TaskFns, init_state, outer_step
from gradhpo_bench.methods import LABELS, LONG_HORIZON, METHODS, Settings, build
from gradhpo_bench.models import cross_entropy, mlp

HORIZONS = (10, 100, 400, 1000)
#: The memory strategies of reverse mode, ``(checkpoint, mixed_mode)``.
STRATEGIES = tuple((c, m) for m in (False, True) for c in (None, "step", "sqrt", "binomial"))
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

    def sample(data, key, T, batch=128):
        n = data["y"].shape[0]
        idx = jax.random.randint(key, (T, batch), 0, n)
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


def measure(
    task: Task, T: int, repeats: int, strategies=STRATEGIES, methods=(*METHODS, *LONG_HORIZON)
) -> dict[str, tuple[float, int]]:
    """``row -> (seconds per outer step, temporary bytes)`` at horizon T, plus ``"plain"``."""
    fns = task.fns
    settings = Settings(T=T, inner_lr=INNER_LR, momentum=0.0, distill_batch=False)
    key = jax.random.PRNGKey(0)
    batches, val_batch = fns.sample(task.data, key, T)
    tl, vl = fns.train_loss, fns.val_loss
    inner = optax.sgd(INNER_LR)
    out = {}

    def args(batches):
        return (task.params0, task.hyper0, batches, val_batch)

    def plain(params, hyper, batches):
        def body(w, batch):
            g = jax.grad(tl)(w, hyper, batch)
            return jax.tree.map(lambda a, b: a - INNER_LR * b, w, g), None

        return jax.lax.scan(body, params, batches)[0]

    compiled, mem = _compile(plain, task.params0, task.hyper0, batches)
    out["plain"] = (_seconds(compiled, task.params0, task.hyper0, batches, repeats=repeats), mem)
    for name in methods:
        if name == "forward":  # refused: dim λ = P here
            continue
        method = build(name, settings)
        state = init_state(method, task, key, T)
        step = partial(outer_step, method, train_loss=tl, val_loss=vl)
        compiled, mem = _compile(step, state, batches, val_batch)
        out[name] = (_seconds(compiled, state, batches, val_batch, repeats=repeats), mem)
        if name == "hyperdistill":
            theta = partial(method.opt.estimate_theta, train_loss_fn=tl, val_loss_fn=vl)
            compiled, mem = _compile(theta, state, batches, val_batch)
            out["theta"] = (_seconds(compiled, state, batches, val_batch, repeats=repeats), mem)
    for checkpoint, mixed in strategies:
        compiled, mem = _compile(_rmd(tl, vl, inner, checkpoint, mixed), *args(batches))
        seconds = _seconds(compiled, *args(batches), repeats=repeats)
        out[_strategy_row(checkpoint, mixed)] = (seconds, mem)
    return out


def _rmd(tl, vl, inner, checkpoint, mixed):
    return partial(
        reverse_hypergradient,
        train_loss_fn=tl,
        val_loss_fn=vl,
        inner_optimizer=inner,
        checkpoint=checkpoint,
        mixed_mode=mixed,
    )


def _strategy_row(checkpoint, mixed) -> str:
    return f"rmd:{checkpoint}:{mixed}"


def _strategy_label(checkpoint, mixed) -> str:
    name = {None: "store all", "step": '"step"', "sqrt": '"sqrt"', "binomial": '"binomial"'}
    return f"reverse_hypergradient, {name[checkpoint]}" + (", mixed mode" if mixed else "")


def mixed_mode_memory(
    task: Task, T: int, batch: int, strategies=STRATEGIES
) -> list[tuple[str, int, float]]:
    """``(strategy, temporary bytes, seconds)`` of reverse mode at horizon T, batch ``batch``."""
    fns = task.fns
    batches, val_batch = fns.sample(task.data, jax.random.PRNGKey(1), T, batch)
    args = (task.params0, task.hyper0, batches, val_batch)
    rows = []
    for checkpoint, mixed in strategies:
        fn = _rmd(fns.train_loss, fns.val_loss, optax.sgd(INNER_LR), checkpoint, mixed)
        compiled, mem = _compile(fn, *args)
        rows.append((_strategy_label(checkpoint, mixed), mem, _seconds(compiled, *args, repeats=1)))
    return rows


def ridge_implicit(steps: int) -> dict[str, float]:
    """The implicit hypergradient after ``steps`` GD steps against reverse mode through them.

    Ridge regression on scikit-learn's diabetes data (standardised, 10 features), one L2
    strength per feature, plain GD with lr ``1/λ_max(H)`` (stable), float64. Returns the
    relative max-error of CG(20) and of N.IFT(5) against the unrolled reverse-mode
    hypergradient, the errors against the closed form, and each one's temporary memory.
    """
    from sklearn.datasets import load_diabetes

    with jax.enable_x64(True):
        X, y = load_diabetes(return_X_y=True)
        X = (X - X.mean(0)) / X.std(0)
        y = (y - y.mean()) / y.std()
        half = X.shape[0] // 2
        D = (jnp.asarray(X[:half]), jnp.asarray(y[:half]))
        V = (jnp.asarray(X[half:]), jnp.asarray(y[half:]))
        lam = jnp.full(X.shape[1], 0.1)

        def train(w, lam, b):
            X, y = b
            return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.sum(lam * w**2)

        def val(w, lam, b):
            X, y = b
            return 0.5 * jnp.mean((X @ w - y) ** 2)

        A = D[0].T @ D[0] / half + jnp.diag(lam)
        w_star = jnp.linalg.solve(A, D[0].T @ D[1] / half)
        alpha = V[0].T @ (V[0] @ w_star - V[1]) / V[0].shape[0]
        closed = -jnp.linalg.solve(A, alpha) * w_star  # the implicit-function closed form
        eigs = jnp.linalg.eigvalsh(A)
        lr = float(1.0 / eigs[-1])
        out = {"lr": lr, "kappa": float(eigs[-1] / eigs[0])}
        rmd = ReverseModeOptimizer(optax.sgd(lr), optax.sgd(0.1), steps, checkpoint="sqrt")
        state = rmd.init(jnp.zeros(X.shape[1]), lam)
        cg = ImplicitOptimizer(optax.sgd(lr), optax.sgd(0.1), steps, solver_steps=20)
        neumann = ImplicitOptimizer(
            optax.sgd(lr), optax.sgd(0.1), steps, "neumann", 5, neumann_lr=lr
        )
        results = {}
        for name, opt in (("rmd", rmd), ("cg", cg), ("neumann", neumann)):
            fn = partial(opt.compute_hypergradient, train_loss_fn=train, val_loss_fn=val)
            compiled, mem = _compile(fn, state, D, V)
            results[name] = compiled(state, D, V)
            out[f"{name}_bytes"] = mem
        err = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))  # noqa: E731
        out["cg_vs_rmd"] = err(results["cg"], results["rmd"])
        out["neumann_vs_rmd"] = err(results["neumann"], results["rmd"])
        out["rmd_vs_closed"] = err(results["rmd"], closed)
        out["cg_vs_closed"] = err(results["cg"], closed)
    return out


def _rows(strategies, methods) -> dict[str, str]:
    return {
        **{k: LABELS[k] + " (outer step)" for k in methods if k != "forward"},
        "theta": "HyperDistill θ estimation (Algorithm 4)",
        **{_strategy_row(c, m): _strategy_label(c, m) for c, m in strategies},
    }


def main(args: argparse.Namespace, out: pathlib.Path) -> str:
    """Run the cost bench; write ``cost.md`` and ``cost.png``; return the report."""
    horizons = (4,) if args.quick else HORIZONS
    repeats = report.quick_value(args, "repeats", 1)
    # --quick (the CI smoke test): fewer methods, two strategies, a short ridge unroll.
    strategies = ((None, False), ("binomial", True)) if args.quick else STRATEGIES
    methods = (*METHODS, *LONG_HORIZON)
    if args.quick:
        methods = ("none", "greedy", "hyperdistill", "exact", "drmad", "implicit")
    ROWS = _rows(strategies, methods)
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
    bar = report.progress_bar(len(horizons) + 2, "cost")
    results = {}
    for T in horizons:
        results[T] = measure(task, T, repeats, strategies, methods)
        bar.update(1)
    mixed_T, mixed_batch = (4, 64) if args.quick else (100, 1024)
    mixed = mixed_mode_memory(task, mixed_T, mixed_batch, strategies)
    bar.update(1)
    ridge_steps = 200 if args.quick else 20_000
    ridge = ridge_implicit(ridge_steps)
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
            "",
            f"## Mixed mode: T = {mixed_T}, batch {mixed_batch}",
            "",
            "Reverse mode through the unroll alone; time of one run after compilation, in "
            "plain SGD steps of batch 128 (the first horizon's unit).",
            "",
            report.markdown_table(
                ["strategy", "temporary MiB", "time (plain steps)"],
                [
                    [
                        label,
                        mib(mem),
                        f"{sec / (results[horizons[0]]['plain'][0] / horizons[0]):.1f}",
                    ]
                    for label, mem, sec in mixed
                ],
            ),
            "",
            f"## Implicit differentiation against a {ridge_steps}-step unroll (ridge, float64)",
            "",
            "Ridge regression on scikit-learn's diabetes data (10 standardised features, one L2 "
            f"strength 0.1 each, 221 training and 221 validation examples; κ(H) = "
            f"{ridge['kappa']:.0f}), plain GD lr 1/λ_max(H) = {ridge['lr']:.3f} from "
            f"w = 0 for {ridge_steps} steps. Relative max-error of each hypergradient, and the "
            "compiled temporary memory of each optimizer's whole hypergradient computation "
            "(the unroll included).",
            "",
            report.markdown_table(
                ["hypergradient", "relative error", "temporary KiB"],
                [
                    [
                        f'reverse mode through {ridge_steps} steps ("sqrt") vs closed form',
                        f"{ridge['rmd_vs_closed']:.1e}",
                        f"{ridge['rmd_bytes'] / 1024:.1f}",
                    ],
                    [
                        "implicit, CG (20) vs that reverse mode",
                        f"{ridge['cg_vs_rmd']:.1e}",
                        f"{ridge['cg_bytes'] / 1024:.1f}",
                    ],
                    ["implicit, CG (20) vs closed form", f"{ridge['cg_vs_closed']:.1e}", ""],
                    [
                        "N.IFT(5), η = the GD lr, vs that reverse mode",
                        f"{ridge['neumann_vs_rmd']:.1e}",
                        f"{ridge['neumann_bytes'] / 1024:.1f}",
                    ],
                ],
            ),
        ],
    )
