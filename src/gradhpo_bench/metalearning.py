"""``gradhpo bench metalearning``: ANIL on sinusoid regression (Lee et al. 2022, App. G).

Tasks ``y = a sin(x - p)`` with amplitude ``a ~ U(0.1, 5)``, phase ``p ~ U(0, π)``,
``x ~ U(-5, 5)``; 10-shot support sets, 10-point query sets. ANIL: the hyperparameters λ
are a shared feature extractor (a 1-40-40 ReLU MLP); the inner weights are a linear head
trained by T = 30 plain SGD steps on the support set from a meta-initialisation φ, which
Reptile moves towards each episode's adapted head. The validation loss is the query MSE,
so λ enters it directly and FO is not zero here. Every method makes one update of λ per
episode (outer Adam). Meta-test MSE: the mean query MSE over 200 new tasks, after 30 steps
of adaptation from φ with the learned λ.

References:
  Lee, Lee, Hwang. "Online Hyperparameter Meta-Learning with Hypergradient Distillation."
  ICLR 2022, Appendix G (Table 4). Raghu et al. "Rapid Learning or Feature Reuse?" ICLR
  2020 (ANIL). Nichol et al. 2018 (Reptile).
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp

from gradhpo_bench import report
from gradhpo_bench.loop import Task, TaskFns, train
from gradhpo_bench.methods import METHODS, Settings, build_all

#: Lee et al. 2022, Table 4: meta-test MSE on sinusoid regression (T = 30).
PAPER = {"hyperdistill": 0.327, "fo": 0.567, "one-step": 0.670}
PAPER_ONLY = {"N.IFT": 0.502, "DrMAD": 1.086}
SHOTS, QUERY, TEST_TASKS = 10, 10, 200
SETTINGS = Settings(
    T=30,
    gamma=0.9,
    inner_lr=0.01,
    momentum=0.0,
    outer_lr=1e-2,
    estimation_period=50,
    distill_batch=False,
)
REPTILE_LR = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options (besides ``--seed``, ``--out``, ``--quick``)."""
    parser.add_argument(
        "--episodes",
        type=report.positive_int,
        default=2000,
        help="meta-training episodes M (one hyper-update each)",
    )


def features(lam, x):
    """The shared feature extractor ``f_λ(x)``: a 1-40-40 ReLU MLP."""
    h = x
    for layer in lam:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h


def _predict(head, lam, x):
    return features(lam, x) @ head["w"] + head["b"]


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
    return jnp.mean((_predict(head, lam, batch["x"]) - batch["y"]) ** 2)


def _tasks(key, n, points):
    ka, kp, kx = jax.random.split(key, 3)
    a = jax.random.uniform(ka, (n, 1, 1), minval=0.1, maxval=5.0)
    p = jax.random.uniform(kp, (n, 1, 1), minval=0.0, maxval=jnp.pi)
    x = jax.random.uniform(kx, (n, points, 1), minval=-5.0, maxval=5.0)
    return {"x": x, "y": (a * jnp.sin(x - p))[..., 0]}, a, p


def _sample(data, key, T):
    k_task, k_query = jax.random.split(key)
    support, a, p = _tasks(k_task, 1, SHOTS)
    xq = jax.random.uniform(k_query, (QUERY, 1), minval=-5.0, maxval=5.0)
    query = {"x": xq, "y": (a[0] * jnp.sin(xq - p[0]))[:, 0]}
    batches = jax.tree.map(lambda s: jnp.broadcast_to(s[0], (T, *s.shape[1:])), support)
    return batches, query


def _adapt_and_test(phi, lam, support, query):
    def step(head, _):
        g = jax.grad(mse)(head, lam, support)
        return jax.tree.map(lambda h, gi: h - SETTINGS.inner_lr * gi, head, g), None

    head = jax.lax.scan(step, phi, None, length=SETTINGS.T)[0]
    return mse(head, lam, query)


def _evaluate(data, phi, lam):
    test = data["test"]
    losses = jax.vmap(_adapt_and_test, in_axes=(None, None, 0, 0))(
        phi, lam, test["support"], test["query"]
    )
    return {"meta_test_mse": jnp.mean(losses)}


FNS = TaskFns(mse, mse, _sample, _evaluate)


def make_task(seed: int) -> Task:
    """The sinusoid ANIL task: fixed meta-test tasks, λ = the feature MLP, head at zero."""
    key = jax.random.PRNGKey(10_000 + seed)
    k_body, k_test = jax.random.split(key)
    ks, kq = jax.random.split(k_test)
    support, a, p = _tasks(ks, TEST_TASKS, SHOTS)
    xq = jax.random.uniform(kq, (TEST_TASKS, 100, 1), minval=-5.0, maxval=5.0)
    query = {"x": xq, "y": (a * jnp.sin(xq - p))[..., 0]}
    k1, k2 = jax.random.split(k_body)
    # PyTorch's default initialisation, U(±1/√fan_in), as in the ANIL sinusoid code.
    lam0 = [
        {"w": jax.random.uniform(k1, (1, 40), minval=-1.0, maxval=1.0), "b": jnp.zeros(40)},
        {
            "w": jax.random.uniform(k2, (40, 40), minval=-1.0, maxval=1.0) / jnp.sqrt(40.0),
            "b": jnp.zeros(40),
        },
    ]
    head0 = {"w": jnp.zeros(40), "b": jnp.zeros(())}
    data = {"test": {"support": support, "query": query}}
    return Task(FNS, data, head0, lam0, reptile_lr=REPTILE_LR)


def main(args: argparse.Namespace, out: pathlib.Path) -> str:
    """Run the meta-learning bench; write ``metalearning.md`` and ``.png``; return it."""
    episodes = report.quick_value(args, "episodes", 5)
    task = make_task(args.seed)
    methods = build_all(METHODS, SETTINGS)
    key = jax.random.PRNGKey(args.seed)
    bar = report.progress_bar(episodes * len(methods), "metalearning")
    runs = [train(m, task, SETTINGS.T, episodes, key, progress=bar) for m in methods]
    bar.close()

    rows = [
        [m.label, float(r.history["meta_test_mse"][-1]), PAPER.get(m.key, "—"), r.seconds]
        for m, r in zip(methods, runs, strict=True)
    ]
    rows += [[f"{name} (paper only)", "—", value, "—"] for name, value in PAPER_ONLY.items()]

    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, r in zip(methods, runs, strict=True):
        ax.plot(r.history["meta_test_mse"], label=m.label)
    report.label_axes(ax, "episode (one hyper-update each)", "meta-test MSE", ylog=True)
    return report.publish(
        out,
        "metalearning",
        fig,
        "Meta-learning: ANIL on sinusoid regression",
        [
            f"M = {episodes} episodes (the paper trains longer), one task each: {SHOTS}-shot "
            f"support, {QUERY}-point query; T = {SETTINGS.T} inner steps. Settings: "
            f"{SETTINGS.describe()}. "
            f"Reptile on the head's initialisation, η = {REPTILE_LR}. Meta-test: {TEST_TASKS} "
            "new tasks, 100 query points each. The paper's numbers (Lee et al. 2022, Table 4) are "
            "beside ours; its N.IFT and DrMAD are not implemented here.",
            "",
            report.markdown_table(["method", "meta-test MSE", "paper", "time (s)"], rows),
        ],
    )
