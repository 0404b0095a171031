"""Small bilevel problems used across the tests (float64 when the x64 fixture is active)."""

import jax
import jax.numpy as jnp
import numpy as np


def logreg_data(n=40, d=5, seed=0):
    """Synthetic binary classification: (train, val) batches as dicts of arrays."""
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d)
    x = rng.normal(size=(2 * n, d))
    y = (x @ w_true + 0.5 * rng.normal(size=2 * n) > 0).astype(np.float64)
    as_batch = lambda sl: {"x": jnp.asarray(x[sl]), "y": jnp.asarray(y[sl])}  # noqa: E731
    return as_batch(slice(0, n)), as_batch(slice(n, 2 * n))


def logistic_loss(w, batch):
    logits = batch["x"] @ w["w"] + w["b"]
    return jnp.mean(jnp.logaddexp(0.0, logits) - batch["y"] * logits)


def l2_train_loss(w, lam, batch):
    """Logistic loss + per-parameter L2 with strengths exp(λ)."""
    return logistic_loss(w, batch) + 0.5 * jnp.sum(jnp.exp(lam) * w["w"] ** 2)


def l2_val_loss(w, lam, batch):
    return logistic_loss(w, batch)


def logreg_init(d=5):
    return {"w": jnp.zeros(d) + 0.1, "b": jnp.zeros(())}


def train_batches(batch, T, seed=0, size=None):
    """T resampled minibatches of ``batch`` stacked along a leading axis."""
    n = batch["y"].shape[0]
    size = size or n // 2
    idx = jax.random.randint(jax.random.PRNGKey(seed), (T, size), 0, n)
    return jax.tree.map(lambda a: a[idx], batch)
