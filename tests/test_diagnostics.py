"""Fidelity diagnostics: exact estimators score 1, the others agree with a direct computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import l2_train_loss, l2_val_loss, logreg_data, logreg_init, train_batches

import gradhpo
from gradhpo import Stacked
from gradhpo.diagnostics import compare, fidelity, reference_hypergradient
from gradhpo.training import run
from gradhpo.utils import tree_cosine

K = 6
INNER = optax.sgd(0.3, momentum=0.5)
OUTER = optax.sgd(0.1)


def problem():
    train, val = logreg_data()
    window = Stacked(train_batches(train, K))
    return window, val, logreg_init(), jnp.full(5, -1.0)


@pytest.mark.parametrize("reference", ["forward", "reverse"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: gradhpo.ReverseModeOptimizer(INNER, OUTER, K, checkpoint="sqrt"),
        lambda: gradhpo.ForwardModeOptimizer(INNER, OUTER, K),
        lambda: gradhpo.TruncatedReverseOptimizer(INNER, OUTER, K, truncation=K),
    ],
)
def test_exact_estimators_score_one(x64, make, reference):
    window, val, w0, lam = problem()
    opt = make()
    f = fidelity(
        opt, opt.init(w0, lam), window, val, l2_train_loss, l2_val_loss, reference=reference
    )
    np.testing.assert_allclose([f.cosine, f.norm_ratio, f.sign_agreement], 1.0, rtol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda: gradhpo.OneStepOptimizer(INNER),
        lambda: gradhpo.GreedyOptimizer(INNER, OUTER, K, gamma=0.9),
        lambda: gradhpo.OnlineHypergradientOptimizer(INNER, gamma=0.9, T=K),
        lambda: gradhpo.DrMADOptimizer(INNER, OUTER, K),
    ],
)
def test_short_horizon_values_agree_with_a_direct_computation(x64, make):
    window, val, w0, lam = problem()
    opt = make()
    state = opt.init(w0, lam)
    f = fidelity(opt, state, window, val, l2_train_loss, l2_val_loss)
    estimate = opt.compute_hypergradient(state, window, val, l2_train_loss, l2_val_loss)
    exact = gradhpo.reverse_hypergradient(
        w0, lam, window.batches, val, l2_train_loss, l2_val_loss, inner_optimizer=INNER
    )
    np.testing.assert_allclose(f.estimate, estimate, rtol=1e-12)
    np.testing.assert_allclose(f.reference, exact, rtol=1e-12)
    np.testing.assert_allclose(f.cosine, tree_cosine(estimate, exact), rtol=1e-12)
    np.testing.assert_allclose(f.norm_ratio, jnp.linalg.norm(estimate) / jnp.linalg.norm(exact))
    assert f.sign_agreement == jnp.mean(jnp.sign(estimate) == jnp.sign(exact))
    assert f.cosine < 1 - 1e-6  # a short horizon (or DrMAD's path) is not the exact direction


def test_reference_modes_agree_and_cost_is_measured(x64):
    window, val, w0, lam = problem()
    opt = gradhpo.GreedyOptimizer(INNER, OUTER, K)
    state = opt.init(w0, lam)
    args = (opt, state, window, val, l2_train_loss, l2_val_loss)
    fwd = reference_hypergradient(*args, reference="forward")
    rev = reference_hypergradient(*args, reference="reverse", memory_budget="64 MiB")
    np.testing.assert_allclose(fwd, rev, rtol=1e-12)
    f = fidelity(*args, reference="reverse", cost=True)
    assert f.cost.reference.startswith("reverse(checkpoint=")
    assert f.cost.estimate_temp_bytes > 0 and f.cost.reference_temp_bytes > 0
    assert f.cost.estimate_steps > 0 and f.cost.reference_steps > 0
    with pytest.raises(ValueError, match='reference must be "auto", "forward" or "reverse"'):
        fidelity(*args, reference="exact")


def test_compare_handles_a_zero_reference():
    cos, ratio, signs = compare(jnp.ones(2), jnp.zeros(2))
    assert float(cos) == 0.0 and bool(jnp.isnan(ratio)) and float(signs) == 0.0


def test_run_records_fidelity_every_n_episodes():
    train, val = logreg_data()
    opt = gradhpo.GreedyOptimizer(INNER, optax.adam(0.05), unroll_steps=4)
    state = opt.init(logreg_init(), jnp.full(5, -1.0))
    out = run(
        opt,
        state,
        train,
        val,
        l2_train_loss,
        l2_val_loss,
        num_episodes=4,
        episode_length=2,
        fidelity_every=2,
        progress=False,
    )
    assert out.history["fidelity_episode"].tolist() == [1, 3]
    cos = out.history["fidelity_cosine"]
    assert cos.shape == (2,) and bool(jnp.all((cos > 0.5) & (cos <= 1 + 1e-6)))
    assert out.history["fidelity_norm_ratio"].shape == (2,)
    with pytest.raises(ValueError, match="fidelity_every must be"):
        run(opt, state, train, val, l2_train_loss, l2_val_loss, fidelity_every=0)
    # online optimizers: the window of hyper_update_every steps
    one = gradhpo.OneStepOptimizer(INNER)
    out = run(
        one,
        one.init(logreg_init(), jnp.full(5, -1.0)),
        train,
        val,
        l2_train_loss,
        l2_val_loss,
        num_episodes=2,
        episode_length=6,
        hyper_update_every=3,
        lr_hyper=0.1,
        fidelity_every=1,
        progress=False,
    )
    assert bool(jnp.all(out.history["fidelity_cosine"] < 1.0))
    assert jax.tree.leaves(out.history["fidelity_signs"])[0].shape == (2,)
