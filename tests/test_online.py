"""HyperDistill (Algorithms 3 and 4) against the exact references, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import (
    l2_train_loss,
    l2_val_loss,
    logistic_loss,
    logreg_data,
    logreg_init,
    train_batches,
)

from gradhpo import OneStepOptimizer, OnlineHypergradientOptimizer, reverse_hypergradient
from gradhpo.algorithms._hyperdistill import ema_weights
from gradhpo.core.inner import InnerStep, validation_grads
from gradhpo.training import run
from gradhpo.utils import count_compilations, tree_add, tree_norm, tree_scale
from gradhpo.utils import tree_lerp as lerp


def rel_err(a, b):
    diff = jax.tree.map(jnp.subtract, a, b)
    return float(tree_norm(diff) / tree_norm(b))


def at(batches, t):
    """Batch ``t`` (0-based) of a stacked sequence."""
    return jax.tree.map(lambda x: x[t], batches)


def l2_val_with_lam(w, lam, batch):
    """A validation loss that λ enters directly (g_FO ≠ 0)."""
    return l2_val_loss(w, lam, batch) + 0.1 * jnp.sum(jnp.sin(lam))


def scaled_val(w, lam, batch):
    return 3.7 * l2_val_with_lam(w, lam, batch)


def logreg_setup(T=4, seed=0):
    train, val = logreg_data()
    return train_batches(train, T, seed=seed), val, logreg_init(), jnp.full(5, -1.0)


def closed_form_S(gamma, t):
    return float(sum(gamma ** (t - i) for i in range(1, t + 1)))  # with 0.0 ** 0 == 1


# -- the isotropic quadratic: A_t = γI --------------------------------------------------------

_M = np.random.default_rng(1).normal(size=(3, 2))
_TARGET = np.random.default_rng(2).normal(size=3)


def make_quadratic(k0):
    """``L_train = k/2 ‖w‖² - (M b + c)·w``, ``k = k0 + μ``; SGD of size η gives A = (1 - ηk)I.

    With μ among the hyperparameters, ``B_μ = -η w`` is affine in w, so the online ``g_t``
    and θ depend on the EMA points: a wrong ``p_t`` or ``p_s`` breaks these identities.
    """

    def train(w, lam, c):
        k = k0 + lam.get("mu", 0.0)
        return 0.5 * k * jnp.sum(w**2) - jnp.dot(_M @ lam["b"] + c, w)

    return train


def quad_val(w, lam, c):
    return 0.5 * jnp.sum((w - _TARGET) ** 2) + jnp.sum(jnp.sin(w)) + 0.05 * jnp.sum(lam["b"] ** 2)


@pytest.mark.parametrize(
    ("k0", "mu", "eta"),
    [(2.0, None, 0.25), (2.0, -1.5, 0.2), (2.0, -2.0, 0.1)],
    ids=["gamma0.5", "mu-gamma0.9", "mu-gamma1"],
)
def test_isotropic_quadratic_theta_is_one_and_online_equals_reverse_mode(x64, k0, mu, eta):
    gamma = 1.0 - eta * (k0 + (mu or 0.0))
    train = make_quadratic(k0)
    lam = {"b": jnp.array([0.3, -0.7])} | ({} if mu is None else {"mu": jnp.asarray(mu)})
    T, w0 = 20, jnp.array([0.5, -1.0, 2.0])
    cs = jnp.asarray(np.random.default_rng(3).normal(size=(T, 3)))
    # Φ as an optax optimizer, or (without μ) as an update_fn: no inner optimizer state.
    if mu is None:
        inner = {"update_fn": lambda w, lam, c: w - eta * jax.grad(train)(w, lam, c)}
    else:
        inner = {"inner_optimizer": optax.sgd(eta)}
    exact = {
        t: reverse_hypergradient(w0, lam, cs[:t], None, train, quad_val, **inner) for t in (1, 5, T)
    }
    for points in ("interpolated", "trajectory"):
        opt = OnlineHypergradientOptimizer(gamma=gamma, T=T, theta_points=points, **inner)
        fit = opt.fit_theta(opt.init(w0, lam), cs, None, train, quad_val)
        assert abs(float(fit.theta) - 1.0) < 1e-8, points
        np.testing.assert_allclose(fit.x, fit.y, rtol=1e-9)
        if points == "trajectory" or mu is None:  # DrMAD is exact when B does not depend on w
            assert rel_err(fit.hypergrad, exact[T]) < 1e-10
    state = opt.with_theta(opt.init(w0, lam), fit.theta)
    for t in range(1, T + 1):
        g_t = opt.compute_hypergradient(state, cs[t - 1], None, train, quad_val)
        if t in exact:
            assert rel_err(g_t, exact[t]) < 1e-10, t
        state = opt.step(state, cs[t - 1], None, train, quad_val, 0.0)


def test_inner_steps_between_hyper_updates_enter_the_distilled_point(x64):
    # Hyper-updates every 4th step: the 3 inner-only steps still count in w*, S_t and t.
    train, lam = make_quadratic(2.0), {"b": jnp.array([0.3, -0.7]), "mu": jnp.asarray(-1.5)}
    cs, w0 = jnp.asarray(np.random.default_rng(5).normal(size=(4, 3))), jnp.ones(3)
    opt = OnlineHypergradientOptimizer(optax.sgd(0.2), gamma=0.9, T=4)
    state = opt.init(w0, lam)
    for t in range(3):
        state = opt.inner_step(state, cs[t], train)
    assert int(state.metadata["episode_step"]) == 3 == int(state.step)
    g = opt.compute_hypergradient(state, cs[3], None, train, quad_val)
    exact = reverse_hypergradient(
        w0, lam, cs, None, train, quad_val, inner_optimizer=optax.sgd(0.2)
    )
    assert rel_err(g, exact) < 1e-10


def test_backward_pass_adjoint_runs_through_the_inner_optimizer_state(x64):
    # Momentum on a quadratic: A and B of the full (w, m) state do not depend on the point,
    # so the interpolated (DrMAD) pass is exact. With the stored trajectory it is exact anyway.
    train, lam = make_quadratic(2.0), {"b": jnp.array([0.3, -0.7])}
    cs, w0 = jnp.asarray(np.random.default_rng(4).normal(size=(6, 3))), jnp.ones(3)
    momentum = optax.sgd(0.1, momentum=0.8)
    opt = OnlineHypergradientOptimizer(momentum, gamma=0.8, T=6, theta_adjoint="state")
    fit = opt.fit_theta(opt.init(w0, lam), cs, None, train, quad_val)
    exact = reverse_hypergradient(w0, lam, cs, None, train, quad_val, inner_optimizer=momentum)
    assert rel_err(fit.hypergrad, exact) < 1e-10

    batches, val, w0, lam = logreg_setup(T=4)
    adam = optax.adam(0.05)
    opt = OnlineHypergradientOptimizer(
        adam, gamma=0.7, T=4, theta_points="trajectory", theta_adjoint="state"
    )
    fit = opt.fit_theta(opt.init(w0, lam), batches, val, l2_train_loss, l2_val_with_lam)
    exact = reverse_hypergradient(
        w0, lam, batches, val, l2_train_loss, l2_val_with_lam, inner_optimizer=adam
    )
    assert rel_err(fit.hypergrad, exact) < 1e-10


# -- Algorithm 3 ------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
def test_ema_point_equals_its_closed_form_and_restarts_every_T(x64, gamma):
    batches, val, w0, lam = logreg_setup(T=7)
    opt = OnlineHypergradientOptimizer(optax.sgd(0.5), gamma=gamma, T=3)
    state = opt.init(w0, lam)
    points = []  # w_0 .. w_{t-1} of the current horizon of T steps
    for n in range(1, 8):  # past T the distilled point restarts by itself: t = 1, 2, 3, 1, ...
        t = (n - 1) % 3 + 1
        if t == 1:
            points = []
        points.append(state.params)
        state = opt.step(state, at(batches, n - 1), val, l2_train_loss, l2_val_loss, 0.1)
        S_t = closed_form_S(gamma, t)
        weights = np.array([gamma ** (t - i) / S_t for i in range(1, t + 1)])
        expected = jax.tree.map(lambda *ws, c=weights: jnp.tensordot(c, jnp.stack(ws), 1), *points)
        assert rel_err(state.metadata["w_star"], expected) < 1e-13, n
        assert int(state.metadata["episode_step"]) == n == int(state.step)
        np.testing.assert_allclose(state.metadata["S_t"], S_t, rtol=1e-14)


@settings(max_examples=25, deadline=None)
@given(gamma=st.floats(0.0, 1.0), T=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_forward_and_backward_ema_recursions_match_the_closed_form(gamma, T, seed):
    # Identity 4: w*_T = Σ_i γ^{T-i} w_{i-1} / S_T from the forward recursion (Eq. 13) and from
    # the backward one (Eq. 17), with the coefficients the implementation uses.
    with jax.enable_x64(True):
        ws = np.random.default_rng(seed).normal(size=(T, 3))  # w_0 .. w_{T-1}
        S = closed_form_S(gamma, T)
        expected = sum(gamma ** (T - i) * ws[i - 1] for i in range(1, T + 1)) / S
        S_t, fwd = jnp.zeros(()), jnp.zeros(3)
        for t in range(1, T + 1):
            S_t, p_t = ema_weights(gamma, S_t)
            fwd = lerp(p_t, fwd, ws[t - 1])
        S_s, bwd = jnp.zeros(()), jnp.zeros(3)
        for s in range(1, T + 1):
            S_s, p_s = ema_weights(gamma, S_s, backward=True)
            bwd = lerp(p_s, bwd, ws[T - s])
        np.testing.assert_allclose(fwd, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bwd, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose([S_t, S_s], [S, S], rtol=1e-13)


@pytest.mark.parametrize(
    ("inner", "distill"), [(optax.sgd(0.3, momentum=0.9), False), (optax.adam(0.05), True)]
)
def test_gamma_zero_theta_one_is_one_step_at_every_step(x64, inner, distill):
    # Same λ before every step and lr 1: equal updates are equal hypergradients.
    batches, val, w0, lam = logreg_setup(T=5)
    online = OnlineHypergradientOptimizer(inner, gamma=0.0, T=5, distill_batch=distill)
    one_step = OneStepOptimizer(inner)
    extra = {"example_batch": at(batches, 0)} if distill else {}
    s_on, s_one = online.init(w0, lam, **extra), one_step.init(w0, lam)
    for t in range(5):
        b = at(batches, t)
        new_on = online.step(s_on, b, val, l2_train_loss, l2_val_with_lam, 1.0)
        new_one = one_step.step(s_one, b, val, l2_train_loss, l2_val_with_lam, 1.0)
        g_on = s_on.hyperparams - new_on.hyperparams
        assert rel_err(g_on, s_one.hyperparams - new_one.hyperparams) < 1e-12, t
        assert rel_err(new_on.params, new_one.params) < 1e-14
        s_on, s_one = new_on, new_one.update(hyperparams=new_on.hyperparams)


def test_step_applies_g_fo_plus_theta_S_t_v_t_at_w_star_and_the_distilled_batch(x64):
    # g_t re-derived from the state's w*_t and D*_t with the core pieces, and it is both what
    # compute_hypergradient returns and what step applies.
    batches, val, w0, lam = logreg_setup(T=5)
    opt = OnlineHypergradientOptimizer(optax.adam(0.05), gamma=0.9, T=5, distill_batch=True)
    state = opt.with_theta(opt.init(w0, lam, example_batch=at(batches, 0)), 0.7)
    phi = InnerStep(optax.adam(0.05))

    @jax.jit
    def distilled_v(w_star, s, lam, D_star, alpha):  # α_t ∂Φ(w*_t, s_{t-1}, λ; D*_t)/∂λ
        return phi.step_and_vjp(w_star, s, lam, D_star, l2_train_loss)[1](alpha)

    mixed = False
    for t in range(1, 6):
        b = at(batches, t - 1)
        g = opt.compute_hypergradient(state, b, val, l2_train_loss, l2_val_with_lam)
        new = opt.step(state, b, val, l2_train_loss, l2_val_with_lam, 0.3)
        np.testing.assert_allclose((state.hyperparams - new.hyperparams) / 0.3, g, rtol=1e-11)
        np.testing.assert_allclose(new.metadata["hypergrad_norm"], tree_norm(g), rtol=1e-13)
        w_star, D_star = new.metadata["w_star"], new.metadata["distilled_batch"]
        mixed |= not bool(jnp.all(D_star["x"] == b["x"]))
        lam = state.hyperparams
        _, alpha, g_fo = validation_grads(l2_val_with_lam, new.params, lam, val)
        v_t = distilled_v(w_star, state.inner_opt_state, lam, D_star, alpha)
        expected = tree_add(g_fo, tree_scale(0.7 * closed_form_S(0.9, t), v_t))
        assert rel_err(g, expected) < 1e-12, t
        state = new
    assert mixed  # D*_t really differs from D_t


@pytest.mark.parametrize("gamma", [0.9, 1.0])
def test_distilled_batch_keeps_a_share_p_t_of_the_previous_one(gamma):
    # Every example of D_t holds the value t, so D*_t tells where each example came from.
    n, T = 20_000, 6
    train = lambda w, lam, b: 0.5 * jnp.sum(w**2) - jnp.mean(b) * jnp.sum(lam * w)  # noqa: E731
    val = lambda w, lam, b: jnp.sum(w**2)  # noqa: E731
    opt = OnlineHypergradientOptimizer(optax.sgd(0.1), gamma=gamma, T=T, distill_batch=True)
    state = opt.init(
        jnp.zeros(2), jnp.ones(2), example_batch=jnp.zeros(n), key=jax.random.PRNGKey(7)
    )
    for t in range(1, T + 1):
        state = opt.step(state, jnp.full(n, float(t)), None, train, val, 0.1)
        D_star = np.asarray(state.metadata["distilled_batch"])
        p_t = (gamma - gamma**t) / (1 - gamma**t) if gamma < 1 else (t - 1) / t
        assert abs(np.mean(D_star != t) - p_t) < 5 * np.sqrt(p_t * (1 - p_t) / n) + 1e-12
        S_t = closed_form_S(gamma, t)
        for i in range(1, t + 1):  # the share of D_i in D*_t is γ^{t-i}/S_t
            share, expected = np.mean(D_star == i), gamma ** (t - i) / S_t
            assert abs(share - expected) < 5 * np.sqrt(expected * (1 - expected) / n) + 1e-12


def test_unit_direction_applies_only_where_g_fo_vanishes(x64):
    batches, val, w0, lam = logreg_setup(T=3)
    plain = OnlineHypergradientOptimizer(optax.sgd(0.5), gamma=0.7, T=3)
    unit = OnlineHypergradientOptimizer(optax.sgd(0.5), gamma=0.7, T=3, unit_direction=True)
    state = plain.init(w0, lam)
    for t in range(3):
        b = at(batches, t)
        if t == 2:  # at t = 3, with a nontrivial EMA point
            g_plain = plain.compute_hypergradient(state, b, val, l2_train_loss, l2_val_loss)
            g_unit = unit.compute_hypergradient(state, b, val, l2_train_loss, l2_val_loss)
            assert rel_err(g_unit, g_plain / tree_norm(g_plain)) < 1e-13
            g_fo_unit = unit.compute_hypergradient(state, b, val, l2_train_loss, l2_val_with_lam)
            g_fo_plain = plain.compute_hypergradient(state, b, val, l2_train_loss, l2_val_with_lam)
            assert rel_err(g_fo_unit, g_fo_plain) < 1e-15
        state = plain.step(state, b, val, l2_train_loss, l2_val_loss, 0.0)


# -- Algorithm 4 and the episode API -----------------------------------------------------------


def test_theta_is_one_at_T_1_for_any_gamma(x64):
    batches, val, w0, lam = logreg_setup(T=1)
    for points, gamma in (("interpolated", 0.3), ("trajectory", 1.0)):
        opt = OnlineHypergradientOptimizer(
            optax.sgd(0.5, momentum=0.5), gamma=gamma, T=1, theta_points=points
        )
        theta = opt.estimate_theta(opt.init(w0, lam), batches, val, l2_train_loss, l2_val_loss)
        assert abs(float(theta) - 1.0) < 1e-12, (points, gamma)


def test_theta_samples_at_gamma_zero_are_the_last_one_step_term(x64):
    # γ = 0: w*_s = w_{T-1} and each sample is the online estimate at the window's end, so
    # v_s = α_T B_T (at s_{T-1}, D_T) for every s: x_s = ‖α_T B_T‖ and y_1 = x_1. With Adam and
    # a λ that weighs the data, B_T depends on the inner state and on the batch.
    def train(w, lam, batch):
        return l2_train_loss(w, lam, batch) + jnp.tanh(lam[0]) * logistic_loss(w, batch)

    batches, val, w0, lam = logreg_setup(T=3)
    opt = OnlineHypergradientOptimizer(optax.adam(0.1), gamma=0.0, T=3, theta_points="trajectory")
    fit = opt.fit_theta(opt.init(w0, lam), batches, val, train, l2_val_loss)
    one_step = OneStepOptimizer(optax.adam(0.1))
    state = one_step.init(w0, lam)
    for t in range(2):
        state = one_step.step(state, at(batches, t), val, train, l2_val_loss, 0.0)
    alpha_B = one_step.compute_hypergradient(state, at(batches, 2), val, train, l2_val_loss)
    np.testing.assert_allclose(fit.x, np.full(3, tree_norm(alpha_B)), rtol=1e-12)
    np.testing.assert_allclose(fit.y[0], fit.x[0], rtol=1e-12)


def test_scaling_L_val_scales_the_hypergradient_and_leaves_theta(x64):
    batches, val, w0, lam = logreg_setup(T=4)
    opt = OnlineHypergradientOptimizer(
        optax.sgd(0.5, momentum=0.5), gamma=0.8, T=4, distill_batch=True
    )
    state = opt.init(w0, lam, example_batch=at(batches, 0))
    theta = opt.estimate_theta(state, batches, val, l2_train_loss, l2_val_with_lam)
    theta_c = opt.estimate_theta(state, batches, val, l2_train_loss, scaled_val)
    assert abs(float(theta) - 1.0) > 1e-3  # a nontrivial fit
    np.testing.assert_allclose(theta_c, theta, rtol=1e-12)
    state = opt.with_theta(state, theta)
    for t in range(3):
        state = opt.step(state, at(batches, t), val, l2_train_loss, l2_val_with_lam, 0.1)
    g = opt.compute_hypergradient(state, at(batches, 3), val, l2_train_loss, l2_val_with_lam)
    g_c = opt.compute_hypergradient(state, at(batches, 3), val, l2_train_loss, scaled_val)
    assert rel_err(g_c, 3.7 * g) < 1e-13


def test_new_episode_restarts_like_a_fresh_state(x64):
    batches, val, w0, lam = logreg_setup(T=3)
    opt = OnlineHypergradientOptimizer(optax.adam(0.05), gamma=0.6, T=3)
    state = opt.with_theta(opt.init(w0, lam), 0.8)
    for t in range(3):
        state = opt.step(state, at(batches, t), val, l2_train_loss, l2_val_loss, 0.2)
    phi = jax.tree.map(lambda x: 0.5 * x, w0)
    restarted = opt.new_episode(state, phi)
    fresh = opt.with_theta(opt.init(phi, state.hyperparams), 0.8)
    assert int(restarted.step) == 3 and int(restarted.metadata["episode_step"]) == 0
    for t in range(3):
        restarted = opt.step(restarted, at(batches, t), val, l2_train_loss, l2_val_loss, 0.2)
        fresh = opt.step(fresh, at(batches, t), val, l2_train_loss, l2_val_loss, 0.2)
        for key in ("w_star", "S_t", "episode_step", "theta"):
            assert rel_err(restarted.metadata[key], fresh.metadata[key]) < 1e-14
        assert rel_err(restarted.hyperparams, fresh.hyperparams) < 1e-14
        assert rel_err(restarted.params, fresh.params) < 1e-14
    continued = opt.new_episode(restarted)  # no φ: continue from the current weights
    assert rel_err(continued.params, restarted.params) == 0.0
    assert int(continued.inner_opt_state[0].count) == 0
    assert not jnp.any(continued.inner_opt_state[0].mu["w"])


def test_step_and_estimation_compile_once():
    train, val = logreg_data()
    w0, lam = logreg_init(), -jnp.ones(5)  # not weakly typed: λ keeps its type across steps
    opt = OnlineHypergradientOptimizer(optax.sgd(0.1, momentum=0.9), T=3, distill_batch=True)

    def episodes(state, seed, n):
        for m in range(n):
            bs = train_batches(train, 3, seed=seed + m)
            state = opt.refit_theta(opt.new_episode(state, w0), bs, val, l2_train_loss, l2_val_loss)
            for t in range(4):  # one step past T
                b = at(bs, t % 3)
                state = opt.step(state, b, val, l2_train_loss, l2_val_loss, 0.1 / (t + 1))
        return state

    state = episodes(opt.init(w0, lam, example_batch=at(train_batches(train, 1), 0)), 0, 1)
    with count_compilations() as c:
        state = episodes(state, 10, 3)
    assert c.count == 0
    assert int(state.step) == 16 and int(state.metadata["episode_step"]) == 4

    opt5 = OnlineHypergradientOptimizer(optax.sgd(0.1), T=5)
    state5 = opt5.init(w0, lam)
    with count_compilations() as c:
        opt5.estimate_theta(state5, train_batches(train, 5), val, l2_train_loss, l2_val_loss)
    assert c.count >= 1
    with count_compilations() as c:
        theta = opt5.estimate_theta(
            opt5.with_theta(state5, 0.3),
            train_batches(train, 5, 9),
            val,
            l2_train_loss,
            l2_val_loss,
        )
    assert c.count == 0 and theta.shape == ()


def test_estimate_theta_accepts_a_list_of_batches(x64):
    batches, val, w0, lam = logreg_setup(T=3)
    opt = OnlineHypergradientOptimizer(optax.sgd(0.5), gamma=0.5, T=3)
    state = opt.init(w0, lam)
    stacked = opt.estimate_theta(state, batches, val, l2_train_loss, l2_val_loss)
    listed = opt.estimate_theta(
        state, [at(batches, t) for t in range(3)], val, l2_train_loss, l2_val_loss
    )
    np.testing.assert_allclose(listed, stacked, rtol=1e-15)


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gamma": -0.1}, "gamma must be a number in"),
        ({"gamma": 1.5}, "gamma must be a number in"),
        ({"gamma": float("nan")}, "gamma must be a number in"),
        ({"T": 0}, "T must be an int >= 1"),
        ({"T": 2.5}, "T must be an int >= 1"),
        ({"estimation_period": 0}, "estimation_period must be an int >= 1"),
        ({"theta_points": "exact"}, "theta_points must be one of"),
    ],
)
def test_bad_configuration_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OnlineHypergradientOptimizer(optax.sgd(0.1), **kwargs)


def test_bad_calls_are_clear_errors():
    batches, val, w0, lam = logreg_setup(T=3)
    b0 = at(batches, 0)
    distill = OnlineHypergradientOptimizer(optax.sgd(0.1), T=3, distill_batch=True)
    with pytest.raises(ValueError, match="example_batch"):
        distill.init(w0, lam)
    with pytest.raises(ValueError, match="one shared leading axis"):
        distill.init(w0, lam, example_batch={"x": jnp.zeros((4, 5)), "y": jnp.zeros(3)})
    plain = OnlineHypergradientOptimizer(optax.sgd(0.1), T=3)
    with pytest.raises(ValueError, match="only with distill_batch=True"):
        plain.init(w0, lam, example_batch=b0)
    state = plain.init(w0, lam)
    with pytest.raises(ValueError, match="must hold T = 3 batches"):
        plain.estimate_theta(
            state, jax.tree.map(lambda x: x[:2], batches), val, l2_train_loss, l2_val_loss
        )
    with pytest.raises(ValueError, match="theta must be a scalar"):
        plain.with_theta(state, jnp.ones(2))
    with pytest.raises(ValueError, match="params"):
        plain.new_episode(state, jnp.zeros(5))
    with pytest.raises(ValueError, match="distilled_batch"):  # a state of another optimizer
        distill.step(state, b0, val, l2_train_loss, l2_val_loss, 0.1)
    d_state = distill.init(w0, lam, example_batch=b0)
    with pytest.raises(ValueError, match=r"distilled batch D\* keeps its shape"):
        distill.step(
            d_state,
            at(train_batches(logreg_data()[0], 1, size=3), 0),
            val,
            l2_train_loss,
            l2_val_loss,
            0.1,
        )


# -- θ's open choices: the adjoint, a fixed θ, clipping -----------------------------------


def _isotropic(k=0.5):
    def train(w, lam, b):  # A = (1 - lr k) I for plain SGD, B affine in w
        return 0.5 * k * jnp.sum(w**2) - jnp.sum(lam * w)

    def val(w, lam, b):
        return 0.5 * jnp.sum((w - 1.0) ** 2)

    return train, val


def test_theta_adjoint_weights_is_one_on_an_isotropic_quadratic_even_with_momentum(x64):
    train, val = _isotropic()
    lr, k = 0.2, 0.5
    inner = optax.sgd(lr, momentum=0.9)
    kw = dict(gamma=1 - lr * k, T=6, theta_points="trajectory")
    held = OnlineHypergradientOptimizer(inner, **kw)  # the default: theta_adjoint="weights"
    through = OnlineHypergradientOptimizer(inner, theta_adjoint="state", **kw)
    state = held.init(jnp.zeros(3), jnp.ones(3))
    batches = jnp.zeros((6, 1))
    # With the momentum state held fixed each step's Jacobian is (1 - lr k) I = γ I, the
    # distilled direction is exact for it and θ = 1; through the momentum buffer it is not.
    np.testing.assert_allclose(
        held.estimate_theta(state, batches, None, train, val), 1.0, rtol=1e-12
    )
    assert abs(float(through.estimate_theta(state, batches, None, train, val)) - 1.0) > 0.1


def test_theta_adjoint_makes_no_difference_without_an_optimizer_state(x64):
    train, val = _isotropic()

    def nonlinear(w, lam, b):
        return train(w, lam, b) + 0.1 * jnp.sum(jnp.sin(w) * lam)

    kw = dict(gamma=0.8, T=5)
    a = OnlineHypergradientOptimizer(optax.sgd(0.3), theta_adjoint="weights", **kw)
    b = OnlineHypergradientOptimizer(optax.sgd(0.3), **kw)
    state = a.init(jnp.full(3, 0.2), jnp.ones(3))
    batches = jnp.zeros((5, 1))
    fa = a.fit_theta(state, batches, None, nonlinear, val)
    fb = b.fit_theta(state, batches, None, nonlinear, val)
    np.testing.assert_allclose(fa.theta, fb.theta, rtol=1e-12)
    np.testing.assert_allclose(fa.y, fb.y, rtol=1e-12)


def test_a_fixed_theta_has_no_refit_and_a_clip_bounds_the_fit(x64):
    train, val = _isotropic()
    fixed = OnlineHypergradientOptimizer(optax.sgd(0.2, momentum=0.9), theta=0.5, T=4)
    assert fixed.refit is None
    state = fixed.init(jnp.zeros(2), jnp.ones(2))
    assert float(state.metadata["theta"]) == 0.5
    with pytest.raises(ValueError, match="episode_length is required"):
        run(fixed, state, None, None, train, val, lr_hyper=0.1, progress=False)
    kw = dict(gamma=0.9, T=6, theta_adjoint="state")
    free = OnlineHypergradientOptimizer(optax.sgd(0.2, momentum=0.9), **kw)
    clipped = OnlineHypergradientOptimizer(
        optax.sgd(0.2, momentum=0.9), theta_clip=(0.0, 0.7), **kw
    )
    batches = jnp.zeros((6, 1))
    theta = float(free.estimate_theta(state, batches, None, train, val))
    assert theta > 0.7  # the momentum adjoint: θ above 1 here
    assert float(clipped.estimate_theta(state, batches, None, train, val)) == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"theta_adjoint": "momentum"}, "theta_adjoint must be one of"),
        ({"theta": -1.0}, "theta"),
        ({"theta_clip": (1.0, 0.0)}, "theta_clip must have low <= high"),
        ({"theta": 0.5, "theta_clip": (0.0, 1.0)}, "theta_clip applies to a fitted θ"),
    ],
)
def test_bad_theta_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OnlineHypergradientOptimizer(optax.sgd(0.1), **kwargs)
