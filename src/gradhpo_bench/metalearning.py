"""``gradhpo bench metalearning``: ANIL on sinusoid regression, Lee et al. 2022, App. G.

The protocol of the paper's Appendix G, every setting as stated there:

* tasks ``y = a sin(x - p)``, ``a ~ U(0.1, 5)``, ``p ~ U(0, π)``, ``x ~ U(-5, 5)``; 10-shot
  support sets (the inner steps' full batch), 10-point query sets (the hypergradients);
* ANIL on a 1-100-100-100-1 ReLU network: the first three layers are λ, the last layer
  (the head) is adapted to each task from its meta-initialisation φ;
* inner SGD with momentum 0.9, lr 0.01, T = 30 steps; outer Adam, lr 1e-3;
* M = 30 episodes on meta-batches of 10 tasks (:class:`gradhpo.training.Tasks`): λ shared
  by the meta-batch (the mean hypergradient), Reptile with η = 1 (φ ← the meta-batch mean
  of the adapted heads);
* online methods update λ after every inner step (FO, One-Step, HyperDistill, with γ
  chosen on a meta-validation set from {0.9, 0.99, 0.999, 0.9999} and θ estimated every
  50 episodes, so once here); DrMAD is offline (one hyper-update per episode, through the
  30 steps); N.IFT(3, 5) makes online hyper-updates in the last 5 inner steps, each with
  3 Neumann terms;
* meta-test: 1000 new tasks, the same 30-step adaptation from φ, the query MSE (100
  points per task); 5 meta-training runs, mean ± 95 % Student-t interval.

The stability column is the largest ``lr·λ_max`` seen at the end of every episode, with
``λ_max`` the largest eigenvalue of the head's training Hessian on a support set (200
probe tasks): heavy-ball SGD with momentum μ diverges beyond ``2(1 + μ) = 3.8``.

References:
  Lee, Lee, Hwang. "Online Hyperparameter Meta-Learning with Hypergradient Distillation."
  ICLR 2022, Appendix G (Table 4, Figure 8). Raghu et al., ICLR 2020 (ANIL). Nichol et al.
  2018 (Reptile). Finn et al., ICML 2017 (the sinusoid tasks).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gradhpo
from gradhpo.training import Tasks, run
from gradhpo_bench import report
from gradhpo_bench.methods import Settings
from gradhpo_bench.metrics import format_interval, mean_interval

#: Lee et al. 2022, Table 4: meta-test MSE (mean ± 95 % interval over 5 runs).
PAPER = {
    "fo": (0.567, 0.193),
    "one-step": (0.670, 0.283),
    "drmad": (1.086, 0.176),
    "nift": (0.502, 0.146),
    "hyperdistill": (0.327, 0.052),
}
LABELS = {
    "fo": "FO",
    "one-step": "One-Step",
    "drmad": "DrMAD (offline)",
    "nift": "N.IFT(3, 5)",
    "hyperdistill": "HyperDistill",
}
#: γ values the paper tunes HyperDistill over.
GAMMAS = (0.9, 0.99, 0.999, 0.9999)
#: HyperDistill's open choices (see ``hyperdistill``): name -> optimizer options.
VARIANTS = {
    "θ by Algorithm 4, optimizer state held fixed in its adjoint (the default)": {},
    "θ by Algorithm 4, adjoint through the momentum buffer": {"theta_adjoint": "state"},
    "θ by Algorithm 4 through the momentum, clipped to [0, 1]": {
        "theta_adjoint": "state",
        "theta_clip": (0.0, 1.0),
    },
    "θ fixed at 0.5 (the paper's Fig. 4d)": {"theta": 0.5},
}
#: The variant the main table reports for HyperDistill (the library's default options).
DEFAULT_VARIANT = "θ by Algorithm 4, optimizer state held fixed in its adjoint (the default)"
#: The variant that diverges, run again with the safeguard.
MOMENTUM_VARIANT = "θ by Algorithm 4, adjoint through the momentum buffer"
#: Heavy-ball SGD with momentum μ on a quadratic is stable for lr·λ_max < 2(1 + μ).
TEST_SEED, VAL_SEED, PROBE_SEED = 10_000, 20_000, 30_000


#: App. G's optimisation: inner SGD (momentum 0.9, lr 0.01, T = 30), outer Adam 1e-3, θ
#: every 50 episodes.
APP_G = Settings(
    T=30, inner_lr=0.01, momentum=0.9, outer_lr=1e-3, estimation_period=50, distill_batch=False
)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The settings of App. G (the defaults) or of ``--quick``.

    ``settings`` holds the optimisation; the rest sizes the experiment: episodes M, tasks
    per meta-batch, the network's width, shots and query points, the meta-test,
    meta-validation and probe task sets, and N.IFT's (Neumann terms N, online steps K).
    """

    settings: Settings = APP_G
    episodes: int = 30
    meta_batch: int = 10
    width: int = 100
    shots: int = 10
    query: int = 10
    sets: tuple[int, int, int] = (1000, 200, 200)  # meta-test, meta-validation, probe tasks
    test_query: int = 100
    nift: tuple[int, int] = (3, 5)

    @property
    def T(self) -> int:
        return self.settings.T

    def stability_limit(self) -> float:
        """Heavy-ball SGD with momentum μ is stable on a quadratic for lr·λ_max < 2(1 + μ)."""
        return 2.0 * (1.0 + self.settings.momentum)


QUICK = Protocol(
    dataclasses.replace(APP_G, T=5), episodes=2, meta_batch=2, width=16, sets=(20, 10, 10)
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options (besides ``--seed``, ``--out``, ``--quick``)."""
    parser.add_argument(
        "--seeds", type=report.positive_int, default=5, help="meta-training runs (default 5)"
    )
    parser.add_argument(
        "--max-loss",
        type=float,
        default=None,
        metavar="LOSS",
        help="also run HyperDistill (the default and the momentum-adjoint variant) with the "
        "safeguard max_loss=LOSS",
    )


# -- the task ---------------------------------------------------------------------------


def _sinusoid(key, shots, query):
    ka, kp, kx, kq = jax.random.split(key, 4)
    a = jax.random.uniform(ka, (), minval=0.1, maxval=5.0)
    p = jax.random.uniform(kp, (), minval=0.0, maxval=jnp.pi)
    xs = jax.random.uniform(kx, (shots, 1), minval=-5.0, maxval=5.0)
    xq = jax.random.uniform(kq, (query, 1), minval=-5.0, maxval=5.0)
    return {"a": a, "p": p, "xs": xs, "xq": xq}


def _curve(task, x):
    return {"x": x, "y": task["a"] * jnp.sin(x[:, 0] - task["p"])}


@dataclasses.dataclass(frozen=True)
class _Sample:
    """``Tasks.sample_fn``: a sinusoid with its support inputs (hashable by value)."""

    shots: int

    def __call__(self, data, key):
        return _sinusoid(key, self.shots, 1)


def support(task, key):
    """The task's support set: the inner steps' full batch (``key`` unused)."""
    return _curve(task, task["xs"])


@dataclasses.dataclass(frozen=True)
class _Query:
    """``Tasks.val_batch``: fresh query points of the task at every hyper-update."""

    points: int

    def __call__(self, task, key):
        return _curve(task, jax.random.uniform(key, (self.points, 1), minval=-5.0, maxval=5.0))


def features(lam, x):
    """The shared feature extractor ``f_λ(x)``: the first three ReLU layers.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo_bench.metalearning import features
      >>> features([{"w": jnp.ones((1, 2)), "b": jnp.zeros(2)}], -jnp.ones((3, 1))).shape
      (3, 2)
    """
    h = x
    for layer in lam:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h


def mse(head, lam, batch):
    """Mean squared error of the head on ``f_λ(x)``: both losses of the task.

    Example:
      >>> import jax.numpy as jnp
      >>> from gradhpo_bench.metalearning import mse
      >>> lam = [{"w": jnp.ones((1, 2)), "b": jnp.zeros(2)}]
      >>> head = {"w": jnp.ones(2), "b": jnp.zeros(())}
      >>> float(mse(head, lam, {"x": jnp.ones((3, 1)), "y": jnp.full(3, 2.0)}))
      0.0
    """
    pred = features(lam, batch["x"]) @ head["w"] + head["b"]
    return jnp.mean((pred - batch["y"]) ** 2)


def tasks(protocol: Protocol) -> Tasks:
    """The meta-training task distribution: meta-batches of ``protocol.meta_batch``."""
    return Tasks(
        _Sample(protocol.shots),
        support,
        _Query(protocol.query),
        meta_batch_size=protocol.meta_batch,
    )


def _linear(key, fan_in, fan_out):
    """PyTorch's default ``nn.Linear`` initialisation, U(±1/√fan_in) for weights and bias."""
    kw, kb = jax.random.split(key)
    bound = 1.0 / np.sqrt(fan_in)
    w = jax.random.uniform(kw, (fan_in, fan_out), minval=-bound, maxval=bound)
    return {"w": w, "b": jax.random.uniform(kb, (fan_out,), minval=-bound, maxval=bound)}


def initial(protocol: Protocol, seed: int):
    """``(φ_0, λ_0)`` of one meta-training run: the network at PyTorch's initialisation."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    sizes = (1, protocol.width, protocol.width, protocol.width)
    lam = [_linear(keys[i], sizes[i], sizes[i + 1]) for i in range(3)]
    head = _linear(keys[3], protocol.width, 1)
    return {"w": head["w"][:, 0], "b": head["b"][0]}, lam


# -- evaluation ---------------------------------------------------------------------------


def task_set(protocol: Protocol, seed: int, n: int):
    """``n`` fixed tasks with ``protocol.test_query`` query points each."""
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    raw = jax.vmap(lambda k: _sinusoid(k, protocol.shots, protocol.test_query))(keys)
    return {
        "support": jax.vmap(lambda t: _curve(t, t["xs"]))(raw),
        "query": jax.vmap(lambda t: _curve(t, t["xq"]))(raw),
    }


@partial(jax.jit, static_argnums=0)
def meta_test(protocol: Protocol, phi, lam, tasks_):
    """The query MSE of every task after T steps of the inner optimizer from φ, λ fixed."""
    inner = protocol.settings.inner_optimizer()

    def one(support_b, query_b):
        def step(carry, _):
            head, s = carry
            g = jax.grad(mse)(head, lam, support_b)
            u, s = inner.update(g, s, head)
            return (optax.apply_updates(head, u), s), None

        head = jax.lax.scan(step, (phi, inner.init(phi)), None, length=protocol.T)[0][0]
        return mse(head, lam, query_b)

    return jax.vmap(one)(tasks_["support"], tasks_["query"])


@partial(jax.jit, static_argnums=0)
def sharpness(protocol: Protocol, lam, probe):
    """``lr·λ_max`` of the head's training Hessian, the largest over the probe tasks.

    The Hessian of the support MSE in the head ``(w, b)`` is ``(2/n) ZᵀZ`` with
    ``Z = [f_λ(x), 1]``; its nonzero eigenvalues are those of the n×n Gram matrix ``ZZᵀ``.
    """

    def one(batch):
        z = features(lam, batch["x"])
        z = jnp.concatenate([z, jnp.ones((z.shape[0], 1), z.dtype)], axis=1)
        return jnp.linalg.eigvalsh(z @ z.T)[-1] * 2.0 / z.shape[0]

    return protocol.settings.inner_lr * jnp.max(jax.vmap(one)(probe["support"]))


# -- the methods --------------------------------------------------------------------------


def method(protocol: Protocol, key: str, gamma: float | None = None, **options):
    """``(optimizer, run options)`` of method ``key`` under ``protocol``.

    Example:
      >>> from gradhpo_bench.metalearning import QUICK, method
      >>> opt, kwargs = method(QUICK, "nift")
      >>> type(opt).__name__, kwargs
      ('ImplicitOptimizer', {'episode_length': 5, 'warmup_steps': 0})
    """
    s = protocol.settings
    inner, outer, T = s.inner_optimizer(), s.outer_optimizer(), s.T
    online = {"episode_length": T}
    if key == "fo":
        return gradhpo.FOOptimizer(inner, outer), online
    if key == "one-step":
        return gradhpo.OneStepOptimizer(inner, outer), online
    if key == "hyperdistill":
        opt = gradhpo.OnlineHypergradientOptimizer(
            inner, outer, gamma=gamma, estimation_period=s.estimation_period, T=T, **options
        )
        return opt, online
    if key == "drmad":
        return gradhpo.DrMADOptimizer(inner, outer, unroll_steps=T), {"episode_length": 1}
    if key == "nift":
        terms, steps = protocol.nift
        steps = min(steps, T)
        opt = gradhpo.ImplicitOptimizer(
            inner, outer, 1, solver="neumann", solver_steps=terms, neumann_lr=s.inner_lr
        )
        return opt, {"episode_length": steps, "warmup_steps": T - steps}
    raise ValueError(f"unknown method {key!r}")


class Outcome(NamedTuple):
    """One meta-training run: its meta-val and meta-test MSE, curve, stability, θ, time."""

    val_mse: float
    test_mse: float
    curve: np.ndarray  # meta-test MSE after each episode (0: before training)
    sharpness: float  # the largest lr·λ_max seen after an episode
    max_hypergrad_norm: float
    skipped: int
    safeguard_skips: int
    theta: float
    seconds: float


def train_and_test(protocol, opt, kwargs, seed, sets, max_loss=None) -> Outcome:
    """Meta-train ``opt`` on one seed through ``gradhpo.training.run``; evaluate."""
    phi, lam = initial(protocol, seed)
    state = opt.init(phi, lam)
    if max_loss is not None:
        state = opt.with_safeguard(state, max_loss=max_loss)
    curve = [float(jnp.mean(meta_test(protocol, phi, lam, sets["test"])))]
    sharp = [float(sharpness(protocol, lam, sets["probe"]))]

    def after(episode, new_state, records):
        phi_e, lam_e = records["meta_params"], new_state.hyperparams
        curve.append(float(jnp.mean(meta_test(protocol, phi_e, lam_e, sets["test"]))))
        sharp.append(float(sharpness(protocol, lam_e, sets["probe"])))

    start = time.perf_counter()
    result = run(
        opt,
        state,
        tasks(protocol),
        None,
        mse,
        mse,
        num_episodes=protocol.episodes,
        lr_reptile=1.0,
        key=jax.random.PRNGKey(seed),
        callback=after,
        progress=False,
        hyperparams_every=None,
        **kwargs,
    )
    seconds = time.perf_counter() - start
    phi_t, lam_t = result.meta_params, result.state.hyperparams
    val = float(jnp.mean(meta_test(protocol, phi_t, lam_t, sets["val"])))
    md = result.state.metadata
    theta = float(md["theta"]) if "theta" in md else float("nan")
    return Outcome(
        val,
        curve[-1],
        np.asarray(curve),
        float(np.nanmax(sharp)) if np.isfinite(sharp).any() else float("inf"),
        float(np.nanmax(np.asarray(result.history["hypergrad_norm"]))),
        int(md["skipped_hyper_updates"]),
        int(md["safeguard_skips"]),
        theta,
        seconds,
    )


def _sets(protocol: Protocol) -> dict[str, Any]:
    return {
        name: task_set(protocol, seed, n)
        for name, seed, n in zip(
            ("test", "val", "probe"), (TEST_SEED, VAL_SEED, PROBE_SEED), protocol.sets, strict=True
        )
    }


def _runs(protocol, key, seeds, sets, gamma=None, max_loss=None, **options):
    opt, kwargs = method(protocol, key, gamma, **options)
    return [train_and_test(protocol, opt, kwargs, s, sets, max_loss) for s in seeds]


def _choose_gamma(by_gamma: dict[float, list[Outcome]]) -> float:
    """The γ with the lowest mean meta-validation MSE over the seeds (NaN counts as worst)."""
    scores = {g: np.mean([o.val_mse for o in outs]) for g, outs in by_gamma.items()}
    return min(scores, key=lambda g: np.inf if not np.isfinite(scores[g]) else scores[g])


def _row(label, outs: list[Outcome], paper, limit, gamma="—"):
    tests = [o.test_mse for o in outs]
    paper_text = f"{paper[0]:.3f} ± {paper[1]:.3f}" if paper else "—"
    stable = sum(o.sharpness < limit for o in outs)
    return [
        label,
        gamma,
        format_interval(tests, digits=3),
        paper_text,
        ", ".join(f"{t:.3g}" for t in tests),
        f"{max(o.sharpness for o in outs):.3g}",
        f"{stable}/{len(outs)}",
        f"{max(o.max_hypergrad_norm for o in outs):.3g}",
        f"{sum(o.skipped for o in outs)} ({sum(o.safeguard_skips for o in outs)})",
        f"{np.mean([o.seconds for o in outs]):.1f}",
    ]


HEADER = [
    "method",
    "γ",
    "meta-test MSE",
    "paper",
    "per seed",
    "max lr·λ_max",
    "stable runs",
    "max ‖hypergradient‖",
    "skipped updates (safeguard)",
    "time / run (s)",
]


def main(args: argparse.Namespace, out: pathlib.Path) -> str:
    """Run the meta-learning bench; write ``metalearning.md`` and ``.png``; return it."""
    protocol = QUICK if args.quick else Protocol()
    n_seeds = report.quick_value(args, "seeds", 1)
    seeds = [args.seed + i for i in range(n_seeds)]
    gammas = GAMMAS[:1] if args.quick else GAMMAS
    variants = dict(list(VARIANTS.items())[:2]) if args.quick else VARIANTS
    sets = _sets(protocol)
    limit = protocol.stability_limit()
    total = len(seeds) * (4 + len(gammas) * len(variants))
    guarded = [DEFAULT_VARIANT, MOMENTUM_VARIANT] if args.max_loss else []
    bar = report.progress_bar(total + len(guarded) * len(seeds), "metalearning")

    def runs(key, gamma=None, max_loss=None, **options):
        outs = _runs(protocol, key, seeds, sets, gamma, max_loss, **options)
        bar.update(len(seeds))
        return outs

    results: dict[str, list[Outcome]] = {}
    curves: dict[str, np.ndarray] = {}
    choices_rows, chosen = [], {}
    for name, options in variants.items():
        by_gamma = {g: runs("hyperdistill", g, **options) for g in gammas}
        best = _choose_gamma(by_gamma)
        chosen[name] = (best, by_gamma[best])
        for g, outs in by_gamma.items():
            thetas = ", ".join(f"{o.theta:.2f}" for o in outs)
            val = mean_interval([o.val_mse for o in outs])[0]
            choices_rows.append(
                [
                    name,
                    g,
                    f"{val:.3f}",
                    format_interval([o.test_mse for o in outs], digits=3),
                    thetas,
                    f"{max(o.sharpness for o in outs):.3g}",
                    "yes" if g == best else "",
                ]
            )
    rows = []
    for key in ("fo", "one-step", "drmad", "nift"):
        results[key] = runs(key)
        rows.append(_row(LABELS[key], results[key], PAPER[key], limit))
        curves[LABELS[key]] = np.mean([o.curve for o in results[key]], axis=0)
    gamma, outs = chosen[DEFAULT_VARIANT]
    rows.append(_row(LABELS["hyperdistill"], outs, PAPER["hyperdistill"], limit, gamma))
    curves[LABELS["hyperdistill"]] = np.mean([o.curve for o in outs], axis=0)
    for name, (g, v_outs) in chosen.items():
        if name != DEFAULT_VARIANT:
            rows.append(_row(f"HyperDistill: {name}", v_outs, None, limit, g))

    guard_rows = []
    for name in guarded:
        g = chosen[name][0]
        outs_g = runs("hyperdistill", g, max_loss=args.max_loss, **VARIANTS[name])
        guard_rows.append(_row(f"HyperDistill: {name}", outs_g, None, limit, g))
    bar.close()

    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curve in curves.items():
        ax.plot(np.arange(len(curve)), curve, label=label)
    report.label_axes(ax, "episodes (inner optimisations) solved", "meta-test MSE", ylog=True)
    p = protocol
    lines = [
        " ".join(
            [
                f"Lee et al. 2022, App. G, as stated there: a "
                f"1-{p.width}-{p.width}-{p.width}-1 ReLU network, the first three layers λ,",
                f"the head adapted by inner SGD (momentum {p.settings.momentum},",
                f"lr {p.settings.inner_lr}, T = {p.T} steps, full batch on {p.shots}-shot",
                f"support sets); outer Adam lr {p.settings.outer_lr}; M = {p.episodes}",
                f"episodes on meta-batches of {p.meta_batch} tasks sharing λ (the mean",
                "hypergradient), Reptile η = 1 on the head's initialisation;",
                f"{p.query}-point query sets at every hyper-update. Online methods update λ",
                "after every inner step; DrMAD once per episode;",
                f"N.IFT({p.nift[0]}, {min(p.nift[1], p.T)}) at each of the last",
                f"{min(p.nift[1], p.T)} steps. HyperDistill: θ by Algorithm 4 every",
                f"{p.settings.estimation_period} episodes, γ chosen by the mean",
                f"meta-validation MSE ({p.sets[1]} tasks) over the seeds from {list(gammas)}.",
                f"Meta-test: {p.sets[0]} fixed new tasks, {p.test_query} query points each,",
                f"after the same {p.T}-step adaptation; {len(seeds)} meta-training runs",
                f"(seeds {seeds[0]}..{seeds[-1]}), mean ± 95 % Student-t interval.",
                "Stability: the largest lr·λ_max of the head's training Hessian after any",
                f"episode ({p.sets[2]} probe tasks); heavy-ball SGD diverges beyond",
                f"{limit:.1f}.",
            ]
        ),
        "",
        report.markdown_table(HEADER, rows),
        "",
        "## HyperDistill's open choices",
        "",
        "Meta-validation and meta-test MSE of every variant and γ (θ per seed at the end).",
        "",
        report.markdown_table(
            [
                "variant",
                "γ",
                "meta-val MSE",
                "meta-test MSE",
                "θ per seed",
                "max lr·λ_max",
                "chosen",
            ],
            choices_rows,
        ),
    ]
    if guard_rows:
        lines += [
            "",
            f"## With the safeguard (max_loss = {args.max_loss:g})",
            "",
            "Each variant at the γ chosen for it above; every hyper-update whose training or "
            "validation loss exceeds the limit is skipped (`with_safeguard(state, max_loss=...)`).",
            "",
            report.markdown_table(HEADER, guard_rows),
        ]
    return report.publish(
        out, "metalearning", fig, "Meta-learning: ANIL on sinusoid regression (App. G)", lines
    )
