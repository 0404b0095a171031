"""``gradhpo bench toys``: the Greedy toy and the DARTS toy, loss curves and fixed points.

* **Greedy toy** (the Greedy paper's two-dimensional example): ``L_train = ½ (w-λ)ᵀ G (w-λ)``,
  ``G = diag(1, ½)``, plain SGD lr 0.1 (``A = diag(0.9, 0.95)``), ``L_val = ‖w‖² +
  10 ‖sin w‖²``. Every outer step restarts from ``w_0 = 0`` and takes T inner steps, so the
  objective is ``L_val(w_T(λ))`` with ``w_T = (I - A^T) λ``. Methods that weight the
  trajectory differently stop at different points: the exact method and One-Step where
  ``∇L_val(w_T) = 0``, Greedy where its γ-weighted sum of ``α_t B_t`` vanishes.
* **DARTS toy** (Liu et al. 2019, Fig. 2): ``L_train = w² - 2λw + λ²``,
  ``L_val = λw - 2λ + 1``, one inner step per hyper-update (T = 1, SGD lr 0.5). Alternating
  updates with a virtual step ξ settle at ``λ = w = 2/(1 + 2ξ)``: FO is ξ = 0 (→ 2), One-Step
  is ξ = the inner lr (→ 1), and T1-T2 with ξ = 0.3 / 0.7 → 1.25 / 0.833.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import jax
import jax.numpy as jnp

from gradhpo_bench import report
from gradhpo_bench.loop import Task, TaskFns, train
from gradhpo_bench.methods import METHODS, Method, Settings, build, build_all

G = jnp.array([1.0, 0.5])
GREEDY_SETTINGS = Settings(
    T=10,
    gamma=0.9,
    inner_lr=0.1,
    momentum=0.0,
    outer="sgd",
    outer_lr=0.05,
    estimation_period=10,
    distill_batch=False,
)
DARTS_SETTINGS = dataclasses.replace(GREEDY_SETTINGS, T=1, inner_lr=0.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options (besides ``--seed``, ``--out``, ``--quick``)."""
    parser.add_argument(
        "--outer-steps", type=report.positive_int, default=400, help="hyper-updates per method"
    )


def _unit_batches(data, key, T):
    return jnp.zeros((T, 1)), jnp.zeros(1)


def greedy_train(w, lam, batch):
    """``½ (w - λ)ᵀ G (w - λ)``, ``G = diag(1, ½)``."""
    d = w - lam
    return 0.5 * jnp.sum(G * d * d)


def greedy_val(w, lam, batch):
    """``‖w‖² + 10 ‖sin w‖²``: a global minimum at 0, local ones near ±2.84."""
    return jnp.sum(w**2) + 10.0 * jnp.sum(jnp.sin(w) ** 2)


def _greedy_eval(data, w0, lam):
    A = 1.0 - GREEDY_SETTINGS.inner_lr * G
    w_T = (1.0 - A**GREEDY_SETTINGS.T) * lam + A**GREEDY_SETTINGS.T * w0  # closed form
    return {
        "val_loss": greedy_val(w_T, lam, None),
        "lam_1": lam[0],
        "lam_2": lam[1],
        "w_T_1": w_T[0],
        "w_T_2": w_T[1],
    }


def darts_train(w, lam, batch):
    """``w² - 2λw + λ²``: the inner optimum is ``w = λ``."""
    return jnp.sum(w**2 - 2.0 * lam * w + lam**2)


def darts_val(w, lam, batch):
    """``λw - 2λ + 1``: λ enters directly, so FO is not zero."""
    return jnp.sum(lam * w - 2.0 * lam + 1.0)


def _darts_eval(data, w, lam):
    return {"val_loss": darts_val(w, lam, None), "lam": lam[0], "w": w[0]}


GREEDY_TOY = TaskFns(greedy_train, greedy_val, _unit_batches, _greedy_eval)
DARTS_TOY = TaskFns(darts_train, darts_val, _unit_batches, _darts_eval)


def darts_methods() -> list[tuple[Method, float]]:
    """The DARTS toy's methods with their predicted fixed point ``2/(1 + 2ξ)``.

    Example:
      >>> from gradhpo_bench.toys import darts_methods
      >>> [(m.label, round(p, 3)) for m, p in darts_methods()][-1]
      ('T1-T2 (DARTS, ξ = 0.7)', 0.833)
    """
    s = DARTS_SETTINGS
    methods = [(build(k, s), 2.0 / (1.0 + 2.0 * s.inner_lr)) for k in METHODS if k != "none"]
    methods[0] = (methods[0][0], 2.0)  # FO: ξ = 0
    methods += [(build("t1t2", s, xi=xi), 2.0 / (1.0 + 2.0 * xi)) for xi in (0.0, 0.3, 0.7)]
    return methods


def _plot_curves(ax, runs, title):
    for label, run in runs:
        ax.plot(run.history["val_loss"], label=label)
    ax.set_title(title, fontsize=10)
    report.label_axes(ax, "outer step", "validation loss", legend=7)


def main(args: argparse.Namespace, out: pathlib.Path) -> str:
    """Run both toys; write ``toys.md`` and ``toys.png``; return the report."""
    steps = report.quick_value(args, "outer_steps", 40)
    key = jax.random.PRNGKey(args.seed)
    bar = report.progress_bar(steps * (len(METHODS) - 1 + len(darts_methods())), "toys")

    greedy_task = Task(GREEDY_TOY, None, jnp.zeros(2), jnp.array([3.0, 3.0]), reptile_lr=0.0)
    greedy_runs, greedy_rows = [], []
    for m in build_all([k for k in METHODS if k != "none"], GREEDY_SETTINGS):
        run = train(m, greedy_task, GREEDY_SETTINGS.T, steps, key, progress=bar)
        h = run.history
        greedy_runs.append((m.label, run))
        greedy_rows.append(
            [
                m.label,
                f"({h['lam_1'][-1]:.3f}, {h['lam_2'][-1]:.3f})",
                f"({h['w_T_1'][-1]:.3f}, {h['w_T_2'][-1]:.3f})",
                float(h["val_loss"][-1]),
            ]
        )

    darts_task = Task(DARTS_TOY, None, jnp.zeros(1), jnp.zeros(1))
    darts_runs, darts_rows = [], []
    for m, expected in darts_methods():
        run = train(m, darts_task, DARTS_SETTINGS.T, steps, key, progress=bar)
        h = run.history
        darts_runs.append((m.label, run))
        darts_rows.append(
            [
                m.label,
                float(h["lam"][-1]),
                float(h["w"][-1]),
                expected,
                abs(float(h["lam"][-1]) - expected),
            ]
        )
    bar.close()

    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    _plot_curves(axes[0], greedy_runs, "Greedy toy: L_val(w_T) per outer step (T = 10)")
    axes[0].set_yscale("log")
    _plot_curves(axes[1], darts_runs, "DARTS toy: L_val per hyper-update (T = 1)")
    return report.publish(
        out,
        "toys",
        fig,
        "Toy problems: loss curves and fixed points",
        [
            "## Greedy toy (the Greedy paper's two-dimensional example)",
            "",
            f"Settings: {GREEDY_SETTINGS.describe()}. Every outer step restarts from w_0 = 0; "
            f"λ_0 = (3, 3); {steps} outer steps. L_val(w_T) uses the closed form "
            "w_T = (I - A^T) λ.",
            "",
            report.markdown_table(["method", "λ reached", "w_T", "L_val(w_T)"], greedy_rows),
            "",
            "## DARTS toy (Liu et al. 2019, Fig. 2)",
            "",
            f"Settings: {DARTS_SETTINGS.describe()}. λ_0 = w_0 = 0; {steps} hyper-updates. "
            "Predicted fixed point λ = w = 2/(1 + 2ξ), ξ = 0 for FO, ξ = inner lr (0.5) for the "
            "exact one-step methods.",
            "",
            report.markdown_table(
                ["method", "λ reached", "w reached", "predicted", "error of λ"], darts_rows
            ),
        ],
    )
