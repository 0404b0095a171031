"""``gradhpo bench regularization``: online tuning of per-layer L2 strengths from 5 starts.

Luketina et al. (2016)'s experiment on a small scale: a 64-64-10 ReLU MLP on scikit-learn's
digits (300 training examples, 300 validation, the remaining 1197 as test), L2 strengths
``exp(λ_1)``, ``exp(λ_2)`` on the two weight matrices, minibatches of 64. Each method tunes
λ online from 5 starting values; a grid search over fixed values (training from scratch at
every grid point for the same number of inner steps) maps the test loss. Does each
trajectory end where the grid finds the best test loss? Its end point is judged like a grid
point: the model is retrained from scratch with λ fixed there, and its test loss is compared
with the grid's best and ranked among the grid's points. Random search and Optuna's TPE
search the same box of fixed values with the gradient methods' mean training time per run as
budget.

References:
  Luketina, Berglund, Greff, Raiko. "Scalable Gradient-Based Tuning of Continuous
  Regularization Hyperparameters." ICML 2016 (Fig. 2: trajectories from several starts).
"""

from __future__ import annotations

import argparse
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from gradhpo_bench import report
from gradhpo_bench.data import digits
from gradhpo_bench.loop import Task, TaskFns, train
from gradhpo_bench.methods import Settings, build
from gradhpo_bench.models import cross_entropy, mlp
from gradhpo_bench.search import random_search, tpe_search

METHOD_KEYS = ("one-step", "t1t2", "greedy", "hyperdistill", "exact")
STARTS = (-5.0, -4.0, -3.0, -2.0, -1.0)  # log10 of both strengths
BOX = (-6.0, 0.0)  # log10 range of the grid and the searches
MODEL = mlp([64, 64, 10])
LN10 = math.log(10.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options (besides ``--seed``, ``--out``, ``--quick``)."""
    parser.add_argument("--outer-steps", type=report.positive_int, default=300)
    parser.add_argument("--grid", type=report.positive_int, default=7, help="grid points per axis")


def _ce(params, batch):
    return jnp.mean(cross_entropy(MODEL.apply(params, batch["x"]), batch["y"]))


def train_loss(params, lam, batch):
    """Cross-entropy plus ``½ Σ_l exp(λ_l) ‖W_l‖²`` (weight matrices only)."""
    penalty = sum(jnp.exp(lam[i]) * jnp.sum(layer["w"] ** 2) for i, layer in enumerate(params))
    return _ce(params, batch) + 0.5 * penalty


def val_loss(params, lam, batch):
    """Cross-entropy (λ does not enter)."""
    return _ce(params, batch)


def _sample(data, key, T):
    n = data["train"]["y"].shape[0]
    idx = jax.random.randint(key, (T, 64), 0, n)
    return jax.tree.map(lambda a: a[idx], data["train"]), data["val"]


def _evaluate(data, params, lam):
    return {
        "test_loss": _ce(params, data["test"]),
        "val_loss": _ce(params, data["val"]),
        "log10_l2_1": lam[0] / LN10,
        "log10_l2_2": lam[1] / LN10,
    }


FNS = TaskFns(train_loss, val_loss, _sample, _evaluate)


def make_task(seed: int) -> Task:
    """The digits MLP task; λ in natural log (``hyper0`` is a placeholder start)."""
    x, y = digits()
    order = np.random.default_rng(seed).permutation(len(y))
    split = lambda sl: {"x": jnp.asarray(x[order[sl]]), "y": jnp.asarray(y[order[sl]])}  # noqa: E731
    data = {
        "train": split(slice(0, 300)),
        "val": split(slice(300, 600)),
        "test": split(slice(600, None)),
    }
    return Task(FNS, data, MODEL.init(jax.random.PRNGKey(seed)), jnp.zeros(2))


def _fixed_run(task, settings, steps, key, log10_lam):
    """Train from scratch with λ fixed at ``log10_lam``: the final history entry."""
    if settings not in _NONE:  # one optimizer per settings, so the program compiles once
        _NONE[settings] = build("none", settings)
    none = _NONE[settings]
    lam = jnp.asarray(np.asarray(log10_lam, np.float32) * LN10)
    run = train(none, task, settings.T, steps, key, hyper0=lam)
    return {k: float(v[-1]) for k, v in run.history.items()} | {"seconds": run.seconds}


_NONE: dict = {}


def main(args: argparse.Namespace, out: pathlib.Path) -> str:
    """Run the regularization bench; write ``regularization.md`` and ``.png``; return it."""
    quick = args.quick
    steps = report.quick_value(args, "outer_steps", 5)
    settings = Settings(T=4 if quick else 10, outer_lr=0.05)
    starts = STARTS[1::3] if quick else STARTS
    n_grid = report.quick_value(args, "grid", 3)
    task = make_task(args.seed)
    key = jax.random.PRNGKey(args.seed)
    methods = [build(k, settings) for k in METHOD_KEYS]
    bar = report.progress_bar(steps * (len(methods) * len(starts) + n_grid**2), "regularization")

    axis = np.linspace(*BOX, n_grid)
    grid = np.zeros((n_grid, n_grid))
    for i, a in enumerate(axis):
        for j, b in enumerate(axis):
            grid[i, j] = _fixed_run(task, settings, steps, key, (a, b))["test_loss"]
            bar.update(steps)
    best_ij = np.unravel_index(np.argmin(grid), grid.shape)
    best = float(grid[best_ij])

    rows, trajectories, seconds = [], {}, []
    for m in methods:
        for s in starts:
            run = train(
                m,
                task,
                settings.T,
                steps,
                key,
                hyper0=jnp.full(2, s * LN10, jnp.float32),
                progress=bar,
            )
            seconds.append(run.seconds)
            h = run.history
            end = (h["log10_l2_1"][-1], h["log10_l2_2"][-1])
            trajectories.setdefault(m.label, []).append((h["log10_l2_1"], h["log10_l2_2"]))
            retrained = _fixed_run(task, settings, steps, key, end)["test_loss"]
            gap = retrained / best - 1.0
            rows.append(
                [
                    m.label,
                    f"({s:.0f}, {s:.0f})",
                    f"({end[0]:.2f}, {end[1]:.2f})",
                    float(h["test_loss"][-1]),
                    retrained,
                    f"{100 * gap:+.1f} %",
                    f"{int(np.sum(grid > retrained))} of {grid.size}",
                    run.seconds,
                ]
            )
    bar.close()

    budget = float(np.mean(seconds))
    search_rows = []
    for search in (random_search, tpe_search):

        def trial(log10_lam):
            result = _fixed_run(task, settings, steps, key, log10_lam)
            return result["val_loss"], result["test_loss"], result["seconds"]

        found = search(trial, 2, *BOX, budget, args.seed)
        if found is None:
            continue
        gap = found.payload / best - 1.0
        search_rows.append(
            [
                found.name,
                found.trials,
                f"({found.best[0]:.2f}, {found.best[1]:.2f})",
                found.payload,
                f"{100 * gap:+.1f} %",
                f"{int(np.sum(grid > found.payload))} of {grid.size}",
                found.seconds,
            ]
        )

    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.8), squeeze=False)
    for ax, m in zip(axes[0], methods, strict=True):
        cs = ax.contourf(axis, axis, np.log10(grid.T), levels=14, cmap="viridis")
        ax.plot(axis[best_ij[0]], axis[best_ij[1]], "r*", markersize=12)
        for l1, l2 in trajectories[m.label]:
            ax.plot(l1, l2, "w-", linewidth=1)
            ax.plot(l1[0], l2[0], "wo", markersize=4)
            ax.plot(l1[-1], l2[-1], "ws", markersize=5)
        ax.set_title(m.label, fontsize=10)
        ax.set_xlabel("log10 L2, layer 1")
    axes[0][0].set_ylabel("log10 L2, layer 2")
    fig.colorbar(cs, ax=axes[0][-1], label="log10 test loss (fixed λ, grid)")
    return report.publish(
        out,
        "regularization",
        fig,
        "Per-layer L2 strengths of a digits MLP, tuned online from several starts",
        [
            f"{MODEL.name}, 300 training / 300 validation / 1197 test examples, minibatches of "
            f"64, {steps} outer steps ({steps * settings.T} inner steps). Settings: "
            f"{settings.describe()}. λ in log10 below. Grid: {n_grid}×{n_grid} fixed values in "
            f"[{BOX[0]:.0f}, {BOX[1]:.0f}]² (log10), each trained from scratch for the same inner "
            f"steps; best test loss {best:.4f} at ({axis[best_ij[0]]:.1f}, "
            f"{axis[best_ij[1]]:.1f}). Each end point is judged like a grid point: the model "
            "retrained from scratch with λ fixed there; *grid points beaten* counts the grid's "
            "fixed values with a higher test loss. The methods descend the validation loss, "
            "so a small gap to the grid's best test loss is the val/test mismatch.",
            "",
            report.markdown_table(
                [
                    "method",
                    "start",
                    "end",
                    "test loss (online model)",
                    "test loss (retrained at end λ)",
                    "gap to grid best",
                    "grid points beaten",
                    "time (s)",
                ],
                rows,
            ),
            "",
            f"## The baselines, budget {budget:.2f} s each (the gradient runs' mean training time)",
            "",
            report.markdown_table(
                [
                    "search",
                    "trials",
                    "best λ (by val loss)",
                    "test loss (retrained)",
                    "gap to grid best",
                    "grid points beaten",
                    "time (s)",
                ],
                search_rows,
            ),
        ],
    )
