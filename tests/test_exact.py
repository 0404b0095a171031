"""Exact reverse mode as an optimizer: ``gradhpo.ReverseModeOptimizer`` against the references."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import l2_train_loss, l2_val_loss, logreg_data, logreg_init, train_batches

import gradhpo
from gradhpo import OneStepOptimizer, ReverseModeOptimizer, Stacked


def test_reverse_mode_optimizer_is_the_exact_reference(x64):
    """With momentum (inner state differentiated through), it equals reverse_hypergradient."""
    inner = optax.sgd(0.1, momentum=0.9)
    opt = ReverseModeOptimizer(inner, optax.adam(0.1), unroll_steps=6)
    rng = np.random.default_rng(0)
    batches = jnp.asarray(rng.normal(size=(6, 3)))

    def train_loss(w, lam, b):
        return jnp.sum((w - b) ** 2 * jnp.exp(lam)) + jnp.sum(jnp.sin(w) * lam)

    def val_loss(w, lam, b):
        return jnp.sum((w - 1.0) ** 2)

    state = opt.init(jnp.asarray(rng.normal(size=3)), jnp.asarray(rng.normal(size=3)))
    state = opt.step(state, Stacked(batches), None, train_loss, val_loss)
    got = opt.compute_hypergradient(state, Stacked(batches), None, train_loss, val_loss)
    want = gradhpo.reverse_hypergradient(
        state.params,
        state.hyperparams,
        batches,
        None,
        train_loss,
        val_loss,
        inner_optimizer=inner,
        inner_opt_state=state.inner_opt_state,
    )
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert int(state.step) == 6


def test_reverse_mode_optimizer_runs_in_the_training_loop():
    from gradhpo.training import run

    opt = ReverseModeOptimizer(optax.sgd(0.1), optax.sgd(0.5), unroll_steps=4)
    train_loss = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)  # noqa: E731
    val_loss = lambda w, lam, b: jnp.sum((w - b) ** 2)  # noqa: E731
    state = opt.init(jnp.zeros(2), jnp.zeros(2))
    result = run(
        opt,
        state,
        jnp.ones(2),
        jnp.ones(2),
        train_loss,
        val_loss,
        num_episodes=3,
        episode_length=2,
        progress=False,
    )
    assert int(result.state.step) == 3 * 2 * 4
    assert bool(jnp.all(result.state.hyperparams < 0))  # L2 hurts the fit: strengths fall


@pytest.mark.parametrize("checkpoint_every", [None, 1, 2, 5])
@pytest.mark.parametrize(
    "inner",
    [optax.sgd(0.3), optax.sgd(0.3, momentum=0.9), optax.adam(0.05, eps_root=1e-12)],
    ids=["sgd", "momentum", "adam"],
)
def test_equals_reverse_hypergradient_and_finite_differences(x64, inner, checkpoint_every):
    train, val = logreg_data()
    batches = train_batches(train, 5, seed=2)
    opt = ReverseModeOptimizer(
        inner, optax.sgd(0.1), unroll_steps=5, checkpoint_every=checkpoint_every
    )
    state = opt.init(logreg_init(), jnp.full(5, -1.0))
    got = opt.compute_hypergradient(state, Stacked(batches), val, l2_train_loss, l2_val_loss)
    want = gradhpo.reverse_hypergradient(
        state.params,
        state.hyperparams,
        batches,
        val,
        l2_train_loss,
        l2_val_loss,
        inner_optimizer=inner,
        inner_opt_state=state.inner_opt_state,
    )
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    u = jnp.asarray(np.random.default_rng(0).normal(size=5))
    eps = 1e-5

    def objective(lam):
        return gradhpo.unrolled_val_loss(
            lam, state.params, batches, val, l2_train_loss, l2_val_loss, inner_optimizer=inner
        )

    fd = (objective(state.hyperparams + eps * u) - objective(state.hyperparams - eps * u)) / (
        2 * eps
    )
    np.testing.assert_allclose(jnp.dot(got, u), fd, rtol=1e-6)


def test_one_step_window_is_one_step(x64):
    train, val = logreg_data()
    exact = ReverseModeOptimizer(optax.sgd(0.3, momentum=0.5), optax.sgd(0.1), unroll_steps=1)
    one = OneStepOptimizer(optax.sgd(0.3, momentum=0.5))
    state = exact.init(logreg_init(), jnp.full(5, -1.0))
    a = exact.compute_hypergradient(state, train, val, l2_train_loss, l2_val_loss)
    b = one.compute_hypergradient(state, train, val, l2_train_loss, l2_val_loss)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_bad_checkpoint_every_is_a_clear_error():
    with pytest.raises(ValueError, match="checkpoint_every must be None or an int >= 1"):
        ReverseModeOptimizer(optax.sgd(0.1), optax.sgd(0.1), unroll_steps=3, checkpoint_every=0)
    with pytest.raises(ValueError, match="needs an outer_optimizer"):
        ReverseModeOptimizer(optax.sgd(0.1), unroll_steps=3)
