"""Data hyper-cleaning: one weight per training example, tuned on a clean validation set.

The training labels are noisy (a fraction replaced by a random wrong class); example i's
loss is scaled by ``σ(λ_i)``; the validation loss is the plain cross-entropy on clean
examples. A good λ gives the corrupted examples small weights: how well the learned
weights separate corrupted from clean examples is the AUROC of ``σ(λ)`` (clean = positive).
A separate clean test set measures the model; it enters no training or tuning computation
(``sample`` never reads it; only ``evaluate`` does).

References:
  Franceschi, Donini, Frasconi, Pontil. "Forward and Reverse Gradient-Based
  Hyperparameter Optimization." ICML 2017 (data hyper-cleaning). The Greedy paper
  (ICLR 2025 submission), Table 2.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradhpo_bench import report
from gradhpo_bench.data import CleaningData
from gradhpo_bench.loop import Task, TaskFns, cosine_and_ratio, horizon_hypergradients, train
from gradhpo_bench.methods import Method, Settings, build
from gradhpo_bench.metrics import auroc
from gradhpo_bench.models import Model, accuracy, convnet, cross_entropy, mlp
from gradhpo_bench.search import SearchResult, random_search, tpe_search

#: ``--model`` choices for the vector data sets, and their layer sizes after the input.
VECTOR_MODELS = {"softmax": (), "mlp": (64,)}


class MethodResult(NamedTuple):
    """One method's run on a cleaning task."""

    label: str
    test_acc: float
    val_acc: float
    auroc: float
    cosine: float
    seconds: float
    compile_seconds: float
    curve: np.ndarray
    weights: np.ndarray


@functools.cache
def model_for(model: str, input_shape: tuple[int, ...], classes: int) -> Model:
    """The model named ``model`` ("softmax", "mlp" or "conv") for inputs of ``input_shape``.

    Cached, so one model (and one set of loss functions) serves every seed.

    Example:
      >>> from gradhpo_bench.cleaning import model_for
      >>> model_for("mlp", (64,), 10).name
      'MLP 64-64-10'
    """
    if model == "conv":
        return convnet(input_shape[0], classes)
    return mlp([input_shape[0], *VECTOR_MODELS[model], classes])


@functools.cache
def task_fns(model: Model, batch_size: int | None) -> TaskFns:
    """The losses, sampler and metrics of hyper-cleaning with ``model`` (cached).

    Args:
      model: the classifier.
      batch_size: examples per inner step, or ``None`` for the full training set.

    Returns:
      :class:`~gradhpo_bench.loop.TaskFns`; the data they read is
      ``{"train": {"x", "y", "idx"}, "val": {"x", "y"}, "test": {"x", "y"}}``.
    """
    apply = model.apply

    def train_loss(params, lam, batch):  # mean_i σ(λ_i) ℓ_i
        weights = jax.nn.sigmoid(lam[batch["idx"]])
        return jnp.mean(weights * cross_entropy(apply(params, batch["x"]), batch["y"]))

    def val_loss(params, lam, batch):
        return jnp.mean(cross_entropy(apply(params, batch["x"]), batch["y"]))

    def sample(data, key, T):
        train_set = data["train"]
        if batch_size is None:
            batches = jax.tree.map(lambda a: jnp.broadcast_to(a, (T, *a.shape)), train_set)
        else:
            n = train_set["y"].shape[0]
            keys = jax.random.split(key, T)
            idx = jax.vmap(lambda k: jax.random.choice(k, n, (batch_size,), replace=False))(keys)
            batches = jax.tree.map(lambda a: a[idx], train_set)
        return batches, data["val"]

    def evaluate(data, params, lam):
        val_logits = apply(params, data["val"]["x"])
        return {
            "test_acc": accuracy(apply(params, data["test"]["x"]), data["test"]["y"]),
            "val_acc": accuracy(val_logits, data["val"]["y"]),
            "val_loss": jnp.mean(cross_entropy(val_logits, data["val"]["y"])),
        }

    return TaskFns(train_loss, val_loss, sample, evaluate)


def make_task(
    data: CleaningData,
    model: str,
    seed: int,
    batch_size: int | None = None,
    reptile_lr: float | None = None,
) -> tuple[Task, Model]:
    """The hyper-cleaning :class:`~gradhpo_bench.loop.Task` for ``data``.

    λ starts at 0 (every weight σ(0) = ½); the model's weights from ``PRNGKey(seed)``.
    ``reptile_lr=0.0`` restarts the weights from that initialisation every outer step
    (``None``: one continuing trajectory).

    Example:
      >>> import numpy as np
      >>> from gradhpo_bench.cleaning import make_task
      >>> from gradhpo_bench.data import cleaning_split
      >>> x, y = np.random.default_rng(0).normal(size=(60, 4)), np.arange(60) % 3
      >>> task, model = make_task(cleaning_split(x, y, n_train=30, n_val=10, noise=0.3,
      ...                                        seed=0), "softmax", 0)
      >>> task.hyper0.shape, model.name
      ((30,), 'softmax regression')
    """
    m = model_for(model, data.train.x.shape[1:], data.classes)
    arrays = {
        "train": {
            "x": jnp.asarray(data.train.x, jnp.float32),
            "y": jnp.asarray(data.train.y, jnp.int32),
            "idx": jnp.arange(len(data.train.y)),
        },
        "val": {"x": jnp.asarray(data.val.x, jnp.float32), "y": jnp.asarray(data.val.y)},
        "test": {"x": jnp.asarray(data.test.x, jnp.float32), "y": jnp.asarray(data.test.y)},
    }
    params0 = m.init(jax.random.PRNGKey(seed))
    hyper0 = jnp.zeros(len(data.train.y), jnp.float32)
    return Task(task_fns(m, batch_size), arrays, params0, hyper0, reptile_lr), m


def probe_steps(outer_steps: int, count: int = 4) -> list[int]:
    """The outer steps at which hypergradients are compared with the exact one.

    Example:
      >>> from gradhpo_bench.cleaning import probe_steps
      >>> probe_steps(200)
      [0, 50, 100, 150]
    """
    return sorted({int(k) for k in np.arange(count) * outer_steps // count})


def run_method(
    method: Method,
    task: Task,
    data: CleaningData,
    settings: Settings,
    outer_steps: int,
    key: jax.Array,
    progress=None,
    probes: bool = True,
    evaluate_adapted: bool = False,
) -> MethodResult:
    """Train ``method`` on the cleaning task and measure it.

    The cosine is the mean, over :func:`probe_steps`, of the cosine between the method's
    hypergradient and the exact one for that outer step (see
    :func:`~gradhpo_bench.loop.horizon_hypergradients`); NaN for no tuning or
    without ``probes``.

    Returns:
      A :class:`MethodResult` (accuracies in [0, 1]).
    """
    cosines: list[float] = []
    at = set(probe_steps(outer_steps)) if probes and method.kind != "none" else set()
    fns = task.fns

    def probe(k, state, key_k):
        if k in at:
            batches, val_batch = fns.sample(task.data, key_k, settings.T)
            est, exact = horizon_hypergradients(
                method, state, batches, val_batch, fns.train_loss, fns.val_loss
            )
            cosines.append(cosine_and_ratio(est, exact)[0])

    run = train(
        method,
        task,
        settings.T,
        outer_steps,
        key,
        callback=probe,
        progress=progress,
        evaluate_adapted=evaluate_adapted,
    )
    weights = np.asarray(jax.nn.sigmoid(run.state.hyperparams))
    return MethodResult(
        method.label,
        float(run.history["test_acc"][-1]),
        float(run.history["val_acc"][-1]),
        auroc(weights, ~data.corrupted),
        float(np.mean(cosines)) if cosines else float("nan"),
        run.seconds,
        run.compile_seconds,
        run.history["test_acc"],
        weights,
    )


def run_search(
    kind: str,
    task: Task,
    data: CleaningData,
    settings: Settings,
    outer_steps: int,
    key: jax.Array,
    budget_s: float,
    seed: int,
) -> tuple[SearchResult, MethodResult] | None:
    """Random search (``kind="random"``) or TPE (``"tpe"``) over the example weights.

    Each trial draws every λ_i uniformly in [-4, 4] (weights σ(λ_i) in [0.02, 0.98]),
    trains from scratch for the same outer steps with λ fixed, and scores the final
    validation loss. ``None`` for TPE without optuna.
    """
    none = build("none", settings)
    n = int(task.hyper0.shape[0])

    def trial(lam):
        run = train(none, task, settings.T, outer_steps, key, hyper0=jnp.asarray(lam))
        return float(run.history["val_loss"][-1]), run, run.seconds

    search = random_search if kind == "random" else tpe_search
    found = search(trial, n, -4.0, 4.0, budget_s, seed)
    if found is None:
        return None
    run, weights = found.payload, 1.0 / (1.0 + np.exp(-found.best))
    result = MethodResult(
        f"{found.name} ({found.trials} trials)",
        float(run.history["test_acc"][-1]),
        float(run.history["val_acc"][-1]),
        auroc(weights, ~data.corrupted),
        float("nan"),
        found.seconds,
        0.0,
        run.history["test_acc"],
        weights,
    )
    return found, result


def plot(results: Sequence[MethodResult], corrupted: np.ndarray, title: str, path) -> None:
    """Test accuracy against outer steps per method, and each method's learned weights.

    Left: one curve per method. Right: for each tuned method, histograms of ``σ(λ_i)`` over
    the clean and the corrupted training examples.
    """
    plt = report.pyplot()
    tuned = [r for r in results if not np.allclose(r.weights, r.weights[0])] or list(results)
    cols = 2
    rows = max(1, -(-len(tuned) // cols))
    fig = plt.figure(figsize=(13, max(4.5, 2.2 * rows)))
    grid = fig.add_gridspec(rows, 2 + cols)
    ax = fig.add_subplot(grid[:, :2])
    styles = ("-", "--", "-.", ":")
    for i, r in enumerate(results):  # line styles tell apart methods whose curves coincide
        ax.plot(100 * r.curve, styles[i % len(styles)], label=r.label)
    settled = min(float(np.min(r.curve[len(r.curve) // 10 :])) for r in results)
    ax.set_ylim(max(0.0, 100 * settled - 3.0), 100.0)
    fig.suptitle(textwrap.fill(title, 130), fontsize=10)
    report.label_axes(ax, f"outer step ({len(results[0].curve) - 1} in all)", "test accuracy (%)")
    bins = np.linspace(0, 1, 26)
    for i, r in enumerate(tuned):
        h = fig.add_subplot(grid[i // cols, 2 + i % cols])
        h.hist(r.weights[~corrupted], bins, alpha=0.6, label="clean", color="tab:blue")
        h.hist(r.weights[corrupted], bins, alpha=0.6, label="corrupted", color="tab:red")
        h.set_title(f"{r.label}: AUROC {r.auroc:.2f}", fontsize=9)
        h.set_yticks([])
        if i == 0:
            h.legend(fontsize=7)
        if i // cols == rows - 1:
            h.set_xlabel("learned weight σ(λ_i)", fontsize=8)
    report.save_figure(fig, path)
