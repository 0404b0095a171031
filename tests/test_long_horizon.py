"""Long-horizon estimators against exact float64 references: memory strategies, mixed mode,
truncated reverse, DrMAD, forward mode (RTRL) and implicit differentiation."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import gradhpo
from gradhpo import Stacked
from gradhpo.core.memory import CANDIDATES, temp_bytes

T = 12


def flat(tree):
    return ravel_pytree(tree)[0]


def rel_err(got, want):
    got, want = flat(got), flat(want)
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


@functools.cache
def mlp_problem(T=T, seed=0):
    """A 4-8-1 tanh MLP, one log-L2 per weight, T minibatches of 16."""
    k = jax.random.split(jax.random.PRNGKey(seed), 5)
    X = jax.random.normal(k[0], (T, 16, 4))
    Y = jnp.sin(X.sum(-1))
    params = {"a": 0.5 * jax.random.normal(k[1], (4, 8)), "b": 0.5 * jax.random.normal(k[2], (8,))}
    lam = {"a": 0.3 * jax.random.normal(k[3], (4, 8)), "b": 0.3 * jax.random.normal(k[4], (8,))}

    def predict(w, x):
        return jnp.tanh(x @ w["a"]) @ w["b"]

    def train_loss(w, lam, batch):
        x, y = batch
        l2 = sum(jnp.sum(jnp.exp(lam[n]) * w[n] ** 2) for n in w)
        return jnp.mean((predict(w, x) - y) ** 2) + 1e-2 * l2

    def val_loss(w, lam, batch):
        x, y = batch
        return jnp.mean((predict(w, x) - y) ** 2)

    return params, lam, Stacked((X, Y)), (X[0], Y[0]), train_loss, val_loss


INNER = optax.sgd(0.1, momentum=0.9)


def reverse_reference(params, lam, window, val, tl, vl, inner=INNER, state=None):
    return gradhpo.reverse_hypergradient(
        params, lam, window.batches, val, tl, vl, inner_optimizer=inner, inner_opt_state=state
    )


@pytest.mark.parametrize("mixed_mode", [False, True])
@pytest.mark.parametrize("checkpoint", [None, "step", "sqrt", "binomial", 5])
def test_every_memory_strategy_is_exact(x64, checkpoint, mixed_mode):
    params, lam, window, val, tl, vl = mlp_problem()
    want = reverse_reference(params, lam, window, val, tl, vl)
    got = gradhpo.reverse_hypergradient(
        params,
        lam,
        window.batches,
        val,
        tl,
        vl,
        inner_optimizer=INNER,
        checkpoint=checkpoint,
        mixed_mode=mixed_mode,
    )
    assert rel_err(got, want) <= 1e-12
    opt = gradhpo.ReverseModeOptimizer(
        INNER, optax.sgd(0.1), T, checkpoint=checkpoint, mixed_mode=mixed_mode
    )
    state = opt.init(params, lam)
    assert rel_err(opt.compute_hypergradient(state, window, val, tl, vl), want) <= 1e-12


def test_mixed_mode_differentiates_a_tuned_learning_rate(x64):
    """With a factory inner optimizer λ enters the optimizer too; mixed mode stays exact."""
    params, _, window, val, tl, vl = mlp_problem()

    def train(w, lam, batch):
        return tl(w, {"a": jnp.zeros((4, 8)), "b": jnp.zeros(8)}, batch)

    def factory(lam):
        return optax.sgd(jnp.exp(lam["log_lr"]), momentum=0.9)

    lam = {"log_lr": jnp.asarray(-2.0)}
    outer = optax.sgd(0.1)
    want = gradhpo.ReverseModeOptimizer(factory, outer, T)
    got = gradhpo.ReverseModeOptimizer(factory, outer, T, checkpoint="sqrt", mixed_mode=True)
    state = want.init(params, lam)
    assert (
        rel_err(
            got.compute_hypergradient(state, window, val, train, vl),
            want.compute_hypergradient(state, window, val, train, vl),
        )
        <= 1e-12
    )


def test_memory_budget_picks_the_fastest_strategy_that_fits(x64):
    params, lam, window, val, tl, vl = mlp_problem(T=16)
    plain = gradhpo.ReverseModeOptimizer(INNER, optax.sgd(0.1), 16)
    state = plain.init(params, lam)

    def memory(checkpoint, mixed):
        opt = gradhpo.ReverseModeOptimizer(
            INNER, optax.sgd(0.1), 16, checkpoint=checkpoint, mixed_mode=mixed
        )
        return temp_bytes(
            lambda s, w, v: opt.compute_hypergradient(s, w, v, tl, vl), state, window, val
        )

    fastest = CANDIDATES[:1]  # store everything
    budget = memory(*fastest[0]) - 1  # it does not fit: the plan must move on
    opt = gradhpo.ReverseModeOptimizer(INNER, optax.sgd(0.1), 16, memory_budget=budget)
    plan = opt.memory_plan(state, window, val, tl, vl)
    chosen = (plan.checkpoint, plan.mixed_mode)
    assert chosen not in fastest and memory(*chosen) <= budget
    tried = [(c, m) for c, m, _ in plan.table]
    assert tried == list(CANDIDATES[: CANDIDATES.index(chosen) + 1])
    assert all(used > budget for *_, used in plan.table[:-1])  # every faster one is too big
    want = reverse_reference(params, lam, window, val, tl, vl)
    assert rel_err(opt.compute_hypergradient(state, window, val, tl, vl), want) <= 1e-12
    got = gradhpo.reverse_hypergradient(
        params, lam, window.batches, val, tl, vl, inner_optimizer=INNER, memory_budget=budget
    )
    assert rel_err(got, want) <= 1e-12
    with pytest.raises(ValueError, match="memory_budget = 1 B is below"):
        gradhpo.ReverseModeOptimizer(INNER, optax.sgd(0.1), 16, memory_budget=1).step(
            state, window, val, tl, vl
        )


def test_truncated_reverse_ends(x64):
    params, lam, window, val, tl, vl = mlp_problem()
    outer = optax.sgd(0.1)
    state = gradhpo.ReverseModeOptimizer(INNER, outer, T).init(params, lam)
    full = gradhpo.TruncatedReverseOptimizer(INNER, outer, T, truncation=T)
    want = reverse_reference(params, lam, window, val, tl, vl)
    assert rel_err(full.compute_hypergradient(state, window, val, tl, vl), want) <= 1e-12

    # K = 1: the exact one-step term g_FO + α_T B_T of the last step, by hand.
    phi = gradhpo.InnerStep(INNER)
    head, last = window.split(T - 1)
    out, _ = phi.unroll(params, state.inner_opt_state, lam, head, tl)
    new, vjp_B = phi.step_and_vjp(out.params, out.inner_opt_state, lam, last.last(), tl)
    alpha_T, g_FO = jax.grad(vl, argnums=(0, 1))(new.params, lam, val)
    one_step = jax.tree.map(jnp.add, g_FO, vjp_B(alpha_T))
    K1 = gradhpo.TruncatedReverseOptimizer(INNER, outer, T, truncation=1)
    assert rel_err(K1.compute_hypergradient(state, window, val, tl, vl), one_step) <= 1e-12

    # In between, truncation drops terms: K = 4 is neither end.
    K4 = gradhpo.TruncatedReverseOptimizer(INNER, outer, T, truncation=4).compute_hypergradient(
        state, window, val, tl, vl
    )
    assert rel_err(K4, want) > 1e-6 and rel_err(K4, one_step) > 1e-6


def linear_problem(seed=0, d=3):
    """Quadratic L_train with a λ-linear term: A and B do not depend on w (identity 8)."""
    rng = np.random.default_rng(seed)
    Q = rng.normal(size=(d, d))
    G = jnp.asarray(Q @ Q.T / d + np.eye(d))
    M = jnp.asarray(rng.normal(size=(d, d)))

    def train(w, lam, b):
        return 0.5 * w @ G @ w - (M @ lam) @ w + b @ w

    def val(w, lam, b):
        return jnp.sum(jnp.sin(w)) + 0.1 * jnp.sum(lam**2)

    w0, lam = jnp.asarray(rng.normal(size=d)), jnp.asarray(rng.normal(size=d))
    return w0, lam, train, val, jnp.asarray(rng.normal(size=(40, d)))


@pytest.mark.parametrize("steps", [1, 7, 40])
def test_drmad_is_exact_for_linear_dynamics(x64, steps):
    w0, lam, train, val, batches = linear_problem()
    inner = optax.sgd(0.1, momentum=0.5)
    window = Stacked(batches[:steps])
    opt = gradhpo.DrMADOptimizer(inner, optax.sgd(0.1), steps)
    state = opt.init(w0, lam)
    want = gradhpo.reverse_hypergradient(
        w0, lam, window.batches, None, train, val, inner_optimizer=inner
    )
    assert rel_err(opt.compute_hypergradient(state, window, None, train, val), want) <= 1e-12


def test_drmad_on_the_isotropic_quadratic_and_off_it(x64):
    k, eta, steps = 2.0, 0.1, 25
    M = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3)))

    def train(w, lam, b):  # L = k/2 ‖w‖² - (Mλ)·w: A_t = (1 - ηk) I
        return 0.5 * k * jnp.sum(w**2) - (M @ lam) @ w

    def val(w, lam, b):
        return jnp.sum(jnp.cos(w))

    opt = gradhpo.DrMADOptimizer(optax.sgd(eta), optax.sgd(0.1), steps)
    w0, lam = jnp.ones(3), jnp.asarray([0.3, -0.2, 0.5])
    want = gradhpo.reverse_hypergradient(
        w0, lam, jnp.zeros((steps, 1)), None, train, val, inner_optimizer=optax.sgd(eta)
    )
    got = opt.compute_hypergradient(opt.init(w0, lam), None, None, train, val)
    assert rel_err(got, want) <= 1e-12

    # On a nonlinear problem the interpolated path is an approximation, not the reference.
    params, lam, window, val_b, tl, vl = mlp_problem()
    drmad = gradhpo.DrMADOptimizer(INNER, optax.sgd(0.1), T)
    got = drmad.compute_hypergradient(drmad.init(params, lam), window, val_b, tl, vl)
    assert rel_err(got, reverse_reference(params, lam, window, val_b, tl, vl)) > 1e-6


def small_lambda_problem(steps):
    params, _, window, val, tl, vl = mlp_problem(T=steps)

    def train(w, lam, batch):  # four hyperparameters: per-layer log-L2 and two shifts
        x, _y = batch
        return tl(w, {"a": jnp.full((4, 8), lam[0]), "b": jnp.full(8, lam[1])}, batch) + (
            lam[2] * jnp.mean(x @ w["a"]) + lam[3] * jnp.sum(w["b"])
        )

    return params, jnp.asarray([0.1, -0.3, 0.2, 0.05]), window, val, train, vl


@pytest.mark.parametrize("steps", [10, 50])
def test_forward_mode_equals_reverse_mode(x64, steps):
    params, lam, window, val, train, vl = small_lambda_problem(steps)
    opt = gradhpo.ForwardModeOptimizer(INNER, optax.sgd(0.1), steps)
    got = opt.compute_hypergradient(opt.init(params, lam), window, val, train, vl)
    assert rel_err(got, reverse_reference(params, lam, window, val, train, vl)) <= 1e-12


def test_forward_mode_online_is_rtrl(x64):
    """unroll_steps=1, a hyper-update every step: the hand-written RTRL loop with λ moving."""
    steps, lr = 6, 0.05
    params, lam, window, val, train, vl = small_lambda_problem(steps)
    opt = gradhpo.ForwardModeOptimizer(INNER, optax.sgd(lr), 1)
    state = opt.init(params, lam)

    phi = gradhpo.InnerStep(INNER)
    x, unravel = ravel_pytree((params, INNER.init(params)))  # (w, s): all float leaves here
    lam_h, Z = lam, jnp.zeros((x.size, lam.size))  # Z = d(w, s)/dλ
    for t in range(steps):
        batch = jax.tree.map(lambda a, t=t: a[t], window.batches)

        def F(x, lam, batch=batch):
            out = phi(*unravel(x), lam, batch, train)
            return ravel_pytree((out.params, out.inner_opt_state))[0]

        J_x, J_lam = jax.jacfwd(F, argnums=(0, 1))(x, lam_h)
        x, Z = F(x, lam_h), J_x @ Z + J_lam  # Z_t = A_t Z_{t-1} + B_t
        w = unravel(x)[0]
        alpha, g_FO = jax.grad(vl, argnums=(0, 1))(w, lam_h, val)
        lam_h = lam_h - lr * (g_FO + flat(alpha) @ Z[: flat(alpha).size])
        state = opt.step(state, batch, val, train, vl)
        np.testing.assert_allclose(state.hyperparams, lam_h, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(flat(state.params), flat(w), rtol=1e-12)


def test_forward_mode_restarts_with_the_episode(x64):
    params, lam, window, val, train, vl = small_lambda_problem(4)
    opt = gradhpo.ForwardModeOptimizer(INNER, optax.sgd(0.0), 4)
    state = opt.init(params, lam)
    first = opt.compute_hypergradient(state, window, val, train, vl)
    later = opt.step(state, window, val, train, vl)
    restarted = opt.new_episode(later, params)
    again = opt.compute_hypergradient(restarted, window, val, train, vl)
    np.testing.assert_allclose(flat(again), flat(first), rtol=1e-12)
    continued = opt.compute_hypergradient(later.update(params=params), window, val, train, vl)
    assert rel_err(continued, first) > 1e-6  # without a restart Z carries on


def test_forward_mode_refuses_large_lambda():
    opt = gradhpo.ForwardModeOptimizer(optax.sgd(0.1), optax.sgd(0.1), 1, max_hyperparams=10)
    with pytest.raises(ValueError, match="max_hyperparams = 10, got 11"):
        opt.init(jnp.zeros(3), jnp.zeros(11))


def ridge(n=60, d=5, seed=0):
    rng = np.random.default_rng(seed)
    X = jnp.asarray(rng.normal(size=(n, d)))
    y = X @ jnp.asarray(rng.normal(size=d)) + 0.3 * jnp.asarray(rng.normal(size=n))
    Xv = jnp.asarray(rng.normal(size=(n, d)))
    yv = Xv @ jnp.asarray(rng.normal(size=d))

    def train(w, lam, b):  # per-feature L2
        X, y = b
        return 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * jnp.sum(lam * w**2)

    def val(w, lam, b):
        X, y = b
        return 0.5 * jnp.mean((X @ w - y) ** 2)

    lam = jnp.asarray(rng.uniform(0.05, 0.5, size=d))
    # Identity 11: w* = (XᵀX/n + diag λ)⁻¹ Xᵀy/n, dw*/dλ_j = -(XᵀX/n + diag λ)⁻¹ e_j w*_j.
    A = X.T @ X / n + jnp.diag(lam)
    w_star = jnp.linalg.solve(A, X.T @ y / n)
    alpha = Xv.T @ (Xv @ w_star - yv) / n
    closed = -jnp.linalg.solve(A, alpha) * w_star
    return (X, y), (Xv, yv), train, val, lam, w_star, closed


def test_implicit_cg_equals_the_ridge_closed_form(x64):
    D, V, train, val, lam, w_star, closed = ridge()
    got = gradhpo.implicit_hypergradient(w_star, lam, D, V, train, val, solver_steps=20)
    assert rel_err(got, closed) <= 1e-8
    custom = gradhpo.implicit_hypergradient(
        w_star, lam, D, V, train, val, solver=lambda mv, b: jax.scipy.sparse.linalg.cg(mv, b)[0]
    )
    assert rel_err(custom, closed) <= 1e-5


def test_implicit_neumann_converges_as_k_grows(x64):
    D, V, train, val, lam, w_star, closed = ridge()
    errors = [
        rel_err(
            gradhpo.implicit_hypergradient(
                w_star, lam, D, V, train, val, solver="neumann", solver_steps=K, neumann_lr=0.5
            ),
            closed,
        )
        for K in (1, 3, 10, 30, 100)
    ]
    assert all(b < a for a, b in itertools.pairwise(errors))
    assert errors[0] > 1e-2 and errors[-1] < 1e-12  # the series has converged at K = 100


def test_reverse_mode_tends_to_implicit_for_long_unrolls(x64):
    """Identity 11: stable GD from w_0 = 0 for 2000 steps; RMD → the IFT hypergradient."""
    D, V, train, val, lam, w_star, closed = ridge()
    steps = 2000
    rmd = gradhpo.ReverseModeOptimizer(optax.sgd(0.5), optax.sgd(0.1), steps, checkpoint="sqrt")
    state = rmd.init(jnp.zeros_like(w_star), lam)
    got = rmd.compute_hypergradient(state, D, V, train, val)
    assert rel_err(got, closed) <= 1e-6
    implicit = gradhpo.ImplicitOptimizer(optax.sgd(0.5), optax.sgd(0.1), steps, solver_steps=20)
    assert rel_err(implicit.compute_hypergradient(state, D, V, train, val), got) <= 1e-6


def test_implicit_optimizer_refuses_optimizer_hyperparameters():
    with pytest.raises(ValueError, match="a learning rate does not move w"):
        gradhpo.ImplicitOptimizer(lambda lam: optax.sgd(lam), optax.sgd(0.1), 5)
    with pytest.raises(ValueError, match="needs neumann_lr"):
        gradhpo.ImplicitOptimizer(optax.sgd(0.1), optax.sgd(0.1), 5, solver="neumann")
    with pytest.raises(ValueError, match='solver must be "cg", "neumann"'):
        gradhpo.implicit_hypergradient(jnp.ones(1), jnp.ones(1), None, None, None, None, solver=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"checkpoint": "log"}, 'checkpoint must be None, "step", "sqrt", "binomial"'),
        ({"checkpoint": 0}, "checkpoint as a segment length must be >= 1, got 0"),
        ({"checkpoint": 2, "checkpoint_every": 2}, "not both"),
        ({"memory_budget": "lots"}, "memory_budget must be None, a positive number"),
        ({"memory_budget": "1 MiB", "mixed_mode": True}, "memory_budget chooses"),
        ({"mixed_mode": 1}, "mixed_mode must be True or False"),
    ],
)
def test_memory_options_are_checked(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gradhpo.ReverseModeOptimizer(optax.sgd(0.1), optax.sgd(0.1), 4, **kwargs)


def test_truncation_and_mixed_mode_are_checked():
    with pytest.raises(ValueError, match=r"truncation must be in \[1, unroll_steps = 4\], got 5"):
        gradhpo.TruncatedReverseOptimizer(optax.sgd(0.1), optax.sgd(0.1), 4, truncation=5)
    with pytest.raises(ValueError, match="mixed_mode needs an inner_optimizer"):
        gradhpo.ReverseModeOptimizer(
            outer_optimizer=optax.sgd(0.1), update_fn=lambda w, lam, b: w, mixed_mode=True
        )
