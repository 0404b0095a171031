"""Fault injection: nothing is silently corrupted, nothing silently stalls.

A step is committed whole or not at all; a finite blow-up cannot poison the outer state; a
stalled run says so; a failed θ fit is kept out and counted.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import l2_train_loss, logreg_data, logreg_init, train_batches
from test_contract import OPTIMIZERS, val_loss

import gradhpo
from gradhpo import WindowOptimizer
from gradhpo.training import StalledRunError, run

METRICS = ("train_loss", "val_loss", "hypergrad_norm")
COUNTERS = ("skipped_hyper_updates", "skipped_inner_updates", "consecutive_skips")


def assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def assert_same_run(a, b):
    """Two states equal bitwise, but for the step counter, the metrics and the counters."""
    for field in ("params", "hyperparams", "inner_opt_state", "outer_opt_state"):
        assert_equal(getattr(a, field), getattr(b, field))
    assert set(a.metadata) == set(b.metadata)
    for key in set(a.metadata) - set(METRICS) - set(COUNTERS):
        assert_equal(a.metadata[key], b.metadata[key])


# -- one bad batch, every optimizer -----------------------------------------------------------

CASES = {**OPTIMIZERS, "hyperdistill-distill": None}


def make(name):
    if name == "hyperdistill-distill":
        opt = gradhpo.OnlineHypergradientOptimizer(
            optax.sgd(0.3, momentum=0.5), gamma=0.9, T=4, distill_batch=True
        )
    else:
        opt = OPTIMIZERS[name]()
    train, val = logreg_data()
    batches = train_batches(train, 16, size=8)
    batches = [jax.tree.map(lambda a, i=i: a[i], batches) for i in range(16)]
    if name == "hyperdistill-distill":
        state = opt.init(logreg_init(), jnp.full(5, -1.0), example_batch=batches[0])
    else:
        state = opt.init(logreg_init(), jnp.full(5, -1.0))
    return opt, state, batches, val


def run_on(opt, state, batches, val, num_episodes):
    lr = None if isinstance(opt, WindowOptimizer) else 0.1
    return run(
        opt,
        state,
        iter(batches),
        val,
        l2_train_loss,
        val_loss,
        num_episodes=num_episodes,
        episode_length=1,
        lr_hyper=lr,
        progress=False,
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_nan_batch_leaves_the_run_as_if_it_never_came(name):
    opt, state, batches, val = make(name)
    k = opt.unroll_steps if isinstance(opt, WindowOptimizer) else 1
    refit = opt.refit.num_batches if opt.refit is not None else 0  # θ's batches come first
    at = refit + k  # the second window
    poisoned = list(batches)
    poisoned[at + k - 1] = dict(batches[at + k - 1])
    poisoned[at + k - 1]["x"] = poisoned[at + k - 1]["x"].at[0, 0].set(jnp.nan)
    windows = (len(batches) - refit) // k
    clean = run_on(opt, state, batches[:at] + batches[at + k :], val, windows - 1)
    dirty = run_on(opt, state, poisoned, val, windows)
    assert_same_run(dirty.state, clean.state)
    md = dirty.state.metadata
    assert int(md["skipped_hyper_updates"]) == int(md["skipped_inner_updates"]) == 1
    assert int(md["consecutive_skips"]) == 0
    updates = np.asarray(dirty.history["hyper_update"]).ravel()
    assert updates.tolist() == [i != 1 for i in range(windows)]


# -- finite blow-ups ------------------------------------------------------------------------


def spiky_val(w, lam, scale):
    """A validation loss whose λ-gradient is ``scale`` (the hypergradient spike)."""
    return jnp.sum((w - 1.0) ** 2) + jnp.sum(scale * lam.astype(jnp.float32))


def quad_train(w, lam, batch):
    return jnp.sum((w - lam.astype(w.dtype)) ** 2)


@pytest.mark.parametrize(
    ("dtype", "spike", "outer"),
    [
        (jnp.float32, 1e20, "adam"),
        (jnp.float32, 1e20, "sgd"),
        (jnp.float16, 300.0, "adam"),
    ],
)
def test_a_huge_finite_hypergradient_cannot_poison_the_outer_state(dtype, spike, outer):
    tx = optax.adam(0.1) if outer == "adam" else optax.sgd(0.1)
    opt = gradhpo.GreedyOptimizer(optax.sgd(0.1), tx, unroll_steps=1)
    state = opt.init(jnp.zeros(2), jnp.zeros(2, dtype))
    state = opt.step(state, None, 1.0, quad_train, spiky_val)
    hit = opt.step(state, None, spike, quad_train, spiky_val)
    assert int(hit.metadata["skipped_hyper_updates"]) == 1
    assert_equal(hit.hyperparams, state.hyperparams)
    assert_equal(hit.outer_opt_state, state.outer_opt_state)
    assert not np.isfinite(float(hit.metadata["hypergrad_norm"]))  # the spike shows
    after = opt.step(hit, None, 1.0, quad_train, spiky_val)
    assert int(after.metadata["consecutive_skips"]) == 0
    assert bool(jnp.all(after.hyperparams < state.hyperparams))  # λ still moves


# -- stalls ---------------------------------------------------------------------------------


def exp_train(w, lam, batch):
    return jnp.sum(jnp.exp(lam) * w**2) + jnp.sum((w - batch) ** 2)


def exp_val(w, lam, batch):
    return -jnp.sum(lam) + 0.0 * jnp.sum(w)  # pushes λ up until exp(λ) overflows


def stalling_run(**kwargs):
    opt = gradhpo.OneStepOptimizer(optax.sgd(0.01))
    state = opt.init(jnp.ones(2), jnp.zeros(2))
    return run(
        opt,
        state,
        jnp.ones(2),
        jnp.ones(2),
        exp_train,
        exp_val,
        num_episodes=4,
        episode_length=30,
        lr_hyper=10.0,  # one step to λ = 10, then 20, ... exp(λ) overflows at ~89
        progress=False,
        **kwargs,
    )


def test_a_stalled_run_warns_once_and_records_the_skips(caplog):
    with caplog.at_level(logging.WARNING, logger="gradhpo"):
        out = stalling_run(stall_after=20)
    warnings = [r for r in caplog.records if "were all skipped" in r.getMessage()]
    assert len(warnings) == 1
    assert "episode 0" in warnings[0].getMessage()
    updates = np.asarray(out.history["hyper_update"]).ravel()
    first_skip = int(np.argmin(updates))
    assert first_skip > 0 and not updates[first_skip:].any()
    md = out.state.metadata
    assert int(md["consecutive_skips"]) == int(md["skipped_hyper_updates"]) == 120 - first_skip
    assert bool(jnp.all(jnp.isfinite(out.state.hyperparams)))


def test_a_stalled_run_raises_with_strict_and_keeps_the_partial_result():
    with pytest.raises(StalledRunError, match="consecutive_skips") as info:
        stalling_run(stall_after=20, strict=True)
    partial = info.value.result
    assert partial.history["hyper_update"].shape == (1, 30)  # stopped after episode 0
    assert int(partial.state.step) == 30


def test_no_stall_no_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="gradhpo"):
        stalling_run(stall_after=1000)
    assert not [r for r in caplog.records if "skipped" in r.getMessage()]


# -- a failed θ fit -------------------------------------------------------------------------


def test_a_failed_theta_fit_keeps_theta_and_is_counted(caplog):
    opt = gradhpo.OnlineHypergradientOptimizer(optax.sgd(0.1), gamma=0.9, T=3)
    train, val = logreg_data()
    state = opt.with_theta(opt.init(logreg_init(), jnp.full(5, -1.0)), 0.7)
    bad = train_batches(train, 3, size=8)
    bad = {**bad, "x": bad["x"].at[1, 0, 0].set(jnp.nan)}
    new = opt.refit_theta(state, bad, val, l2_train_loss, val_loss)
    assert float(new.metadata["theta"]) == pytest.approx(0.7)
    assert int(new.metadata["failed_theta_fits"]) == 1
    # In a run, the loop says so.
    refit_batches = [jax.tree.map(lambda a, i=i: a[i], bad) for i in range(3)]
    good = train_batches(train, 4, seed=1, size=8)
    good = [jax.tree.map(lambda a, i=i: a[i], good) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="gradhpo"):
        out = run(
            opt,
            state,
            iter(refit_batches + good),
            val,
            l2_train_loss,
            val_loss,
            episode_length=4,
            lr_hyper=0.1,
            progress=False,
        )
    assert any("refit gave non-finite" in r.getMessage() for r in caplog.records)
    assert float(out.history["theta"][0]) == pytest.approx(0.7)
