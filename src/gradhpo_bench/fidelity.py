"""``gradhpo bench fidelity``: how close each estimator is to the exact hypergradient.

For horizons T ∈ {1, 10, 100, 1000}, from one state ``(w_0, λ)`` and T batches, each
method's hypergradient for that outer step (see
:func:`~gradhpo_bench.loop.horizon_hypergradients`) is compared with the exact
reverse-mode hypergradient through the same T inner steps: the cosine, and the norm ratio
``‖estimate‖ / ‖exact‖``. HyperDistill's θ is fitted by Algorithm 4 on the same T batches.

Problems:

* **quadratic, κ ∈ {1, 10, 100}** — ``L_train = ½ wᵀHw - (Mλ + b_t)·w`` with ``H``'s
  eigenvalues log-spaced in [1/κ, 1] (random rotation), ``M`` random, ``b_t`` a fresh
  N(0, 0.1²) vector per step; ``L_val = ½ ‖w - c‖²``; 20 weights, 20 hyperparameters; plain
  SGD lr 0.5, so ``A = I - ½H`` has eigenvalues in [½, 1 - 1/(2κ)].
* **logistic** — per-feature L2 strengths ``exp(λ_j)`` of a logistic regression on
  scikit-learn's breast-cancer data (200 training examples in minibatches of 32, 200
  validation examples), plain SGD lr 0.1, ``λ_j = log 0.01``, ``w_0`` after 100 full-batch
  gradient steps from zero (at ``w = 0`` every ``B_t`` vanishes).

λ does not enter either validation loss, so FO is zero throughout (cosine 0).
"""

from __future__ import annotations

import argparse
import pathlib
import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from gradhpo import Stacked
from gradhpo.diagnostics import compare, reference_hypergradient
from gradhpo_bench import report
from gradhpo_bench.data import breast_cancer
from gradhpo_bench.loop import Task, TaskFns, init_state
from gradhpo_bench.methods import LABELS, LONG_HORIZON, METHODS, Settings, build

HORIZONS = (1, 10, 100, 1000)
KAPPAS = (1, 10, 100)
ESTIMATORS = (*(k for k in METHODS if k != "none"), *LONG_HORIZON)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options (besides ``--seed``, ``--out``, ``--quick``)."""
    parser.add_argument("--gamma", type=float, default=0.9, help="γ of Greedy and HyperDistill")


def check_arguments(args: argparse.Namespace) -> str | None:
    """An error message for bad arguments, or ``None``."""
    if not 0.0 < args.gamma <= 1.0:
        return f"argument --gamma: must be in (0, 1], got {args.gamma}"
    return None


# -- the quadratic -------------------------------------------------------------------------


def quad_train(w, lam, batch):
    """``½ wᵀHw - (Mλ + b_t)·w`` (H, M, b_t in the batch)."""
    return 0.5 * w @ batch["H"] @ w - (batch["M"] @ lam + batch["b"]) @ w


def quad_val(w, lam, batch):
    """``½ ‖w - c‖²``."""
    return 0.5 * jnp.sum((w - batch["c"]) ** 2)


def _quad_sample(data, key, T):
    b = 0.1 * jax.random.normal(key, (T, data["M"].shape[0]))
    stack = partial(jnp.broadcast_to, shape=(T, *data["H"].shape))
    return {"H": stack(data["H"]), "M": stack(data["M"]), "b": b}, {"c": data["c"]}


def quadratic(kappa: float, seed: int, dim: int = 20) -> Task:
    """The quadratic problem with condition number ``kappa`` (see the module docstring).

    Example:
      >>> from gradhpo_bench.fidelity import quadratic
      >>> import numpy as np
      >>> task = quadratic(10.0, 0)
      >>> round(float(np.linalg.eigvalsh(np.asarray(task.data["H"])).min()), 3)
      0.1
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eig = np.logspace(0.0, -np.log10(kappa), dim)
    data = {
        "H": jnp.asarray(q @ np.diag(eig) @ q.T, jnp.float32),
        "M": jnp.asarray(rng.normal(size=(dim, dim)) / np.sqrt(dim), jnp.float32),
        "c": jnp.asarray(rng.normal(size=dim), jnp.float32),
    }
    w0 = jnp.asarray(rng.normal(size=dim), jnp.float32)
    lam0 = jnp.asarray(rng.normal(size=dim), jnp.float32)
    return Task(TaskFns(quad_train, quad_val, _quad_sample, None), data, w0, lam0)


# -- per-feature L2 logistic regression ----------------------------------------------------


def _logistic(params, batch):
    logits = batch["x"] @ params["w"] + params["b"]
    return jnp.mean(jnp.logaddexp(0.0, logits) - batch["y"] * logits)


def logistic_train(params, log_l2, batch):
    """Logistic loss plus ``½ Σ_j exp(λ_j) w_j²``."""
    return _logistic(params, batch) + 0.5 * jnp.sum(jnp.exp(log_l2) * params["w"] ** 2)


def logistic_val(params, log_l2, batch):
    """Logistic loss (λ does not enter)."""
    return _logistic(params, batch)


def _logistic_sample(data, key, T):
    n = data["train"]["y"].shape[0]
    idx = jax.vmap(lambda k: jax.random.choice(k, n, (32,), replace=False))(
        jax.random.split(key, T)
    )
    return jax.tree.map(lambda a: a[idx], data["train"]), data["val"]


@jax.jit
def _pretrain(params, lam, train):
    def gd(_, p):
        g = jax.grad(logistic_train)(p, lam, train)
        return jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

    return jax.lax.fori_loop(0, 100, gd, params)


def logistic(seed: int) -> Task:
    """Per-feature L2 logistic regression on breast cancer (see the module docstring)."""
    x, y = breast_cancer()
    order = np.random.default_rng(seed).permutation(len(y))
    split = lambda sl: {"x": jnp.asarray(x[order[sl]]), "y": jnp.asarray(y[order[sl]])}  # noqa: E731
    data = {"train": split(slice(0, 200)), "val": split(slice(200, 400))}
    lam0 = jnp.full(x.shape[1], float(np.log(1e-2)), jnp.float32)
    params0 = _pretrain({"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}, lam0, data["train"])
    return Task(TaskFns(logistic_train, logistic_val, _logistic_sample, None), data, params0, lam0)


# -- the measurement -----------------------------------------------------------------------


@partial(jax.jit, static_argnums=(0, 4, 5))
def _estimate(method, state, batches, val_batch, train_loss, val_loss):
    window = Stacked(batches)  # the hypergradient the method applies over this window
    return method.opt.compute_hypergradient(state, window, val_batch, train_loss, val_loss)


def measure(task: Task, T: int, gamma: float, key: jax.Array, inner_lr: float) -> dict:
    """``method -> (cosine, norm ratio, sign agreement)`` at horizon T from the task's start.

    The exact hypergradient is :func:`gradhpo.diagnostics.reference_hypergradient` of the
    ``exact`` method over the T batches (reverse mode, memory strategy chosen for 1 GiB);
    each method's estimate of the same window is scored by
    :func:`gradhpo.diagnostics.compare`.

    Example:
      >>> import jax
      >>> from gradhpo_bench.fidelity import measure, quadratic
      >>> res = measure(quadratic(10.0, 0), 1, 0.9, jax.random.PRNGKey(0), 0.5)
      >>> round(res["one-step"][0], 4), round(res["exact"][1], 4), round(res["drmad"][0], 4)
      (1.0, 1.0, 1.0)
    """
    settings = Settings(T=T, gamma=gamma, inner_lr=inner_lr, momentum=0.0, distill_batch=False)
    fns = task.fns
    batches, val_batch = fns.sample(task.data, key, T)
    window = Stacked(batches)
    reference = build("exact", settings)
    exact = reference_hypergradient(
        reference.opt,
        init_state(reference, task, key, T),
        window,
        val_batch,
        fns.train_loss,
        fns.val_loss,
        reference="reverse",
    )
    out = {}
    for name in ESTIMATORS:
        method = build(name, settings)
        state = init_state(method, task, key, T)
        if name == "hyperdistill":  # θ by Algorithm 4 on the same T batches
            theta = method.opt.estimate_theta(
                state, batches, val_batch, fns.train_loss, fns.val_loss
            )
            state = method.opt.with_theta(state, theta)
        with warnings.catch_warnings():  # FO's zero hypergradient is expected here
            warnings.filterwarnings("ignore", message="the hyperparameters do not enter")
            est = _estimate(method, state, batches, val_batch, fns.train_loss, fns.val_loss)
        out[name] = tuple(float(x) for x in compare(est, exact))
    return out


def main(args: argparse.Namespace, out: pathlib.Path) -> str:
    """Run the fidelity bench; write ``fidelity.md`` and ``fidelity.png``; return the report."""
    horizons = (1, 10) if args.quick else HORIZONS
    kappas = (10,) if args.quick else KAPPAS
    problems = [(f"quadratic κ = {k}", quadratic(float(k), args.seed), 0.5) for k in kappas]
    if not args.quick:
        problems.append(("logistic (breast cancer)", logistic(args.seed), 0.1))
    key = jax.random.PRNGKey(args.seed)
    bar = report.progress_bar(len(problems) * len(horizons), "fidelity")
    results = {}
    for label, task, lr in problems:
        for T in horizons:
            results[label, T] = measure(task, T, args.gamma, key, lr)
            bar.update(1)
    bar.close()

    header = ["problem", "method", *[f"T = {T}" for T in horizons]]
    rows = []
    for label, _, _ in problems:
        for name in ESTIMATORS:
            cells = []
            for T in horizons:
                cos, ratio, signs = results[label, T][name]
                cells.append(f"{cos:.3f} ({ratio:.2f}; {signs:.2f})")
            rows.append([label, LABELS[name], *cells])

    plt = report.pyplot()
    fig, axes = plt.subplots(2, len(problems), figsize=(4 * len(problems), 7), squeeze=False)
    styles = ("o-", "s--", "^-.", "v:", "D-", "x--", "P-", "*--", "h-.", "<:", ">-")
    for col, (label, _, _) in enumerate(problems):
        for row, (what, ylog) in enumerate(
            (("cosine with exact", False), ("‖estimate‖ / ‖exact‖", True))
        ):
            ax = axes[row][col]
            for style, name in zip(styles, ESTIMATORS, strict=True):
                values = [results[label, T][name][row] for T in horizons]
                if ylog:  # FO's zero ratio has no place on a log axis
                    values = [v if v > 0 else float("nan") for v in values]
                ax.plot(horizons, values, style, label=LABELS[name])
            ax.set_title(label, fontsize=10)
            legend = 7 if (row, col) == (0, len(problems) - 1) else 0
            report.label_axes(
                ax, "horizon T", what if col == 0 else None, xlog=True, ylog=ylog, legend=legend
            )
    return report.publish(
        out,
        "fidelity",
        fig,
        "Fidelity: every estimator against the exact hypergradient",
        [
            f"γ = {args.gamma} for Greedy and HyperDistill; HyperDistill's θ fitted by Algorithm 4 "
            "on the same batches (no batch distillation); T1-T2's ξ = the inner lr. Each cell: "
            "cosine with the exact reverse-mode hypergradient through the same T inner steps "
            "(in brackets: the norm ratio ‖estimate‖/‖exact‖; the fraction of coordinates whose "
            "signs agree), as `gradhpo.diagnostics.compare` computes them. The online methods' "
            "estimate is the one "
            "they make at the last of the T steps; Greedy's covers the T steps. FO is 0: λ does "
            "not enter the validation loss. Truncated reverse mode differentiates the last "
            "⌈T/4⌉ steps; the implicit rows take w_T as the inner optimum and use the last "
            "training batch for the Hessian.",
            "",
            report.markdown_table(header, rows),
        ],
    )
