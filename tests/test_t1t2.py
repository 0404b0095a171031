"""T1T2Optimizer: DARTS weight-space, per-coordinate and exact estimates of ``α_T B_T``.

Oracles (ALGORITHMS.md, identities 1, 9, 14): the exact one-step hypergradient (reverse mode
through a single inner step, and OneStepOptimizer), in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree
from problems import l2_train_loss, l2_val_loss, logistic_loss, logreg_data, logreg_init

from gradhpo import OneStepOptimizer, T1T2Optimizer, reverse_hypergradient
from gradhpo.algorithms.t1t2 import sgd_step_size
from gradhpo.utils import count_compilations

LR = 0.5


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def rel_err(got, want):
    got, want = flat(got), flat(want)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def one_step_reference(params, lam, train, val, train_loss, val_loss, **inner):
    """Exact hypergradient of one inner step (reverse mode, T = 1)."""
    batches = jax.tree.map(lambda x: x[None], train)
    return reverse_hypergradient(params, lam, batches, val, train_loss, val_loss, **inner)


def hypergrad(opt, params, lam, train, val, train_loss, val_loss):
    state = opt.init(params, lam)
    return opt.compute_hypergradient(state, train, val, train_loss, val_loss)


# -- per-parameter L2 on logistic regression: ∇_λ L_train is quadratic in w ---------------


@pytest.mark.parametrize("fd", ["weights", "coordinates", None])
def test_logreg_per_parameter_l2_equals_one_step(x64, fd):
    train, val = logreg_data()
    w0, lam = logreg_init(), jnp.linspace(-1.0, 1.0, 5)
    exact = one_step_reference(
        w0, lam, train, val, l2_train_loss, l2_val_loss, inner_optimizer=optax.sgd(LR)
    )
    one_step = hypergrad(
        OneStepOptimizer(optax.sgd(LR)), w0, lam, train, val, l2_train_loss, l2_val_loss
    )
    g = hypergrad(
        T1T2Optimizer(optax.sgd(LR), fd=fd), w0, lam, train, val, l2_train_loss, l2_val_loss
    )
    assert rel_err(one_step, exact) < 1e-12
    assert rel_err(g, exact) < 1e-8
    # Every element has its own value: the differences between elements are the exact ones
    # (a whole-leaf perturbation would put the same number in every slot).
    assert np.ptp(flat(exact)) > 1e-3
    np.testing.assert_allclose(np.diff(flat(g)), np.diff(flat(exact)), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("fd", ["weights", "coordinates"])
def test_float32_defaults_are_accurate(fd):
    train, val = logreg_data()
    train, val = jax.tree.map(lambda x: x.astype(jnp.float32), (train, val))
    w0, lam = logreg_init(), jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float32)
    exact = hypergrad(
        OneStepOptimizer(optax.sgd(LR)), w0, lam, train, val, l2_train_loss, l2_val_loss
    )
    g = hypergrad(
        T1T2Optimizer(optax.sgd(LR), fd=fd), w0, lam, train, val, l2_train_loss, l2_val_loss
    )
    assert g.dtype == jnp.float32
    assert rel_err(g, exact) < 1e-3


_OPT_FOR_PROPERTY = T1T2Optimizer(optax.sgd(0.3))


@settings(max_examples=10, deadline=None)
@given(
    lam=st.lists(st.floats(-3.0, 2.0), min_size=5, max_size=5),
    w=st.lists(st.floats(-2.0, 2.0), min_size=6, max_size=6),
)
def test_weights_mode_exact_for_quadratic_penalty(lam, w):
    """DARTS' weight-space difference is exact when ∇_λ L_train is quadratic in w."""
    with jax.enable_x64(True):
        train, val = logreg_data()
        params = {"w": jnp.asarray(w[:5]), "b": jnp.asarray(w[5])}
        lam = jnp.asarray(lam)
        exact = one_step_reference(
            params, lam, train, val, l2_train_loss, l2_val_loss, inner_optimizer=optax.sgd(0.3)
        )
        g = hypergrad(_OPT_FOR_PROPERTY, params, lam, train, val, l2_train_loss, l2_val_loss)
        np.testing.assert_allclose(flat(g), flat(exact), rtol=1e-7, atol=1e-11)


# -- a 2-layer MLP: per-layer weight decay, example weights --------------------------------


def mlp_problem():
    rng = np.random.default_rng(0)
    n, d, hidden = 32, 4, 8
    x = jnp.asarray(rng.normal(size=(2 * n, d)))
    y = jnp.sin(x @ jnp.asarray(rng.normal(size=d)))
    train, val = {"x": x[:n], "y": y[:n]}, {"x": x[n:], "y": y[n:]}
    params = {
        "W1": jnp.asarray(rng.normal(size=(d, hidden))) / 2,
        "b1": jnp.asarray(rng.normal(size=hidden)) / 10,
        "W2": jnp.asarray(rng.normal(size=hidden)) / 3,
        "b2": jnp.zeros(()),
    }
    return params, train, val, jnp.asarray(rng.normal(size=n))


def mlp_errors(w, batch):
    hidden = jnp.tanh(batch["x"] @ w["W1"] + w["b1"])
    return (hidden @ w["W2"] + w["b2"] - batch["y"]) ** 2


def mlp_val_loss(w, lam, batch):
    return jnp.mean(mlp_errors(w, batch))


def layer_decay_train_loss(w, lam, batch):
    decay = jnp.exp(lam["W1"]) * jnp.sum(w["W1"] ** 2) + jnp.exp(lam["W2"]) * jnp.sum(w["W2"] ** 2)
    return jnp.mean(mlp_errors(w, batch)) + 0.5 * decay


def example_weights_train_loss(w, lam, batch):
    return jnp.mean(jax.nn.sigmoid(lam) * mlp_errors(w, batch))


@pytest.mark.parametrize("fd, tol", [("weights", 1e-4), ("coordinates", 1e-5)])
@pytest.mark.parametrize("problem", ["layer_decay", "example_weights"])
def test_mlp_matches_exact(x64, fd, tol, problem):
    params, train, val, example_lam = mlp_problem()
    if problem == "layer_decay":
        train_loss, lam = layer_decay_train_loss, {"W1": jnp.asarray(-2.0), "W2": jnp.asarray(-1.0)}
    else:
        train_loss, lam = example_weights_train_loss, example_lam
    exact = one_step_reference(
        params, lam, train, val, train_loss, mlp_val_loss, inner_optimizer=optax.sgd(0.3)
    )
    g = hypergrad(
        T1T2Optimizer(optax.sgd(0.3), fd=fd), params, lam, train, val, train_loss, mlp_val_loss
    )
    assert jax.tree.structure(g) == jax.tree.structure(lam)
    assert rel_err(g, exact) < tol


# -- coordinates mode: any Φ, any pytree, any chunking -------------------------------------


def _lr_and_l2_train_loss(w, lam, batch):
    return logistic_loss(w, batch) + 0.5 * jnp.sum(jnp.exp(lam["l2"]) * w["w"] ** 2)


@pytest.mark.parametrize(
    "inner",
    [
        optax.sgd(0.1, momentum=0.9),
        optax.adam(0.05),
        lambda lam: optax.sgd(jnp.exp(lam["log_lr"]), momentum=0.5),  # λ inside the optimizer
    ],
    ids=["momentum", "adam", "factory"],
)
def test_coordinates_mode_any_inner_step(x64, inner):
    train, val = logreg_data()
    lam = {"log_lr": jnp.asarray(-1.0), "l2": jnp.linspace(-2.0, 0.0, 5)}
    one_step = OneStepOptimizer(inner)
    state = one_step.init(logreg_init(), lam)
    for _ in range(3):  # a non-trivial inner optimizer state, held fixed by B_T
        state = one_step.step(state, train, val, _lr_and_l2_train_loss, l2_val_loss, 0.0)
    exact = one_step.compute_hypergradient(state, train, val, _lr_and_l2_train_loss, l2_val_loss)
    opt = T1T2Optimizer(inner, fd="coordinates")
    g = opt.compute_hypergradient(state, train, val, _lr_and_l2_train_loss, l2_val_loss)
    assert rel_err(g, exact) < 1e-6


def test_coordinates_mode_chunking_does_not_change_the_result(x64):
    train, val = logreg_data()
    lam = {"log_lr": jnp.asarray(-1.0), "l2": jnp.linspace(-2.0, 0.0, 5)}
    inner = lambda lam: optax.sgd(jnp.exp(lam["log_lr"]))  # noqa: E731
    exact = hypergrad(
        OneStepOptimizer(inner), logreg_init(), lam, train, val, _lr_and_l2_train_loss, l2_val_loss
    )
    results = [
        hypergrad(
            T1T2Optimizer(inner, fd="coordinates", chunk_size=chunk_size),
            logreg_init(),
            lam,
            train,
            val,
            _lr_and_l2_train_loss,
            l2_val_loss,
        )
        for chunk_size in (1, 4, 6, 64)  # one per coordinate, a remainder, exact fit, one chunk
    ]
    for g in results:
        assert rel_err(g, exact) < 1e-8
        np.testing.assert_allclose(flat(g), flat(results[0]), rtol=1e-8)


def test_exact_mode_is_one_step(x64):
    train, val = logreg_data()
    w0, lam = logreg_init(), jnp.linspace(-1.0, 1.0, 5)
    g = hypergrad(
        T1T2Optimizer(optax.adam(0.1), fd=None), w0, lam, train, val, l2_train_loss, l2_val_loss
    )
    want = hypergrad(
        OneStepOptimizer(optax.adam(0.1)), w0, lam, train, val, l2_train_loss, l2_val_loss
    )
    np.testing.assert_allclose(flat(g), flat(want), rtol=1e-14)


# -- weights mode: where ξ comes from ------------------------------------------------------


def test_weights_mode_with_update_fn(x64):
    xi = 0.4
    train, val = logreg_data()
    w0, lam = logreg_init(), jnp.linspace(-1.0, 1.0, 5)

    def update_fn(w, lam, batch):
        g = jax.grad(l2_train_loss)(w, lam, batch)
        return jax.tree.map(lambda p, gi: p - xi * gi, w, g)

    exact = one_step_reference(w0, lam, train, val, l2_train_loss, l2_val_loss, update_fn=update_fn)
    opt = T1T2Optimizer(update_fn=update_fn, xi=xi)
    assert rel_err(hypergrad(opt, w0, lam, train, val, l2_train_loss, l2_val_loss), exact) < 1e-8


def test_explicit_xi_differentiates_the_virtual_step(x64):
    """DARTS: weights trained by the optimizer, hypergradient through w - ξ∇_w L_train."""
    xi = 0.2
    train, val = logreg_data()
    w0, lam = logreg_init(), jnp.linspace(-1.0, 1.0, 5)
    inner = optax.sgd(0.1, momentum=0.9)
    opt = T1T2Optimizer(inner, xi=xi)
    state = opt.init(w0, lam)
    w_T = OneStepOptimizer(inner).step(state, train, val, l2_train_loss, l2_val_loss, 0.0).params
    alpha, g_fo = jax.grad(l2_val_loss, argnums=(0, 1))(w_T, lam, val)

    def virtual_step(lam):
        g = jax.grad(l2_train_loss)(w0, lam, train)
        return jax.tree.map(lambda p, gi: p - xi * gi, w0, g)

    want = g_fo + jax.vjp(virtual_step, lam)[1](alpha)[0]
    g = opt.compute_hypergradient(state, train, val, l2_train_loss, l2_val_loss)
    assert rel_err(g, want) < 1e-8
    # ξ = 0 is first-order DARTS: the hypergradient is g_FO alone.
    opt0 = T1T2Optimizer(inner, xi=0.0)
    g0 = opt0.compute_hypergradient(opt0.init(w0, lam), train, val, l2_train_loss, l2_val_loss)
    np.testing.assert_array_equal(flat(g0), flat(g_fo))


def test_zero_validation_gradient_gives_first_order(x64):
    """α_T = 0 (L_val independent of w) must give g_FO, not 0/0."""
    train, _ = logreg_data()
    val_loss = lambda w, lam, batch: jnp.sum(lam**2)  # noqa: E731
    lam = jnp.linspace(-1.0, 1.0, 5)
    g = hypergrad(
        T1T2Optimizer(optax.sgd(LR)), logreg_init(), lam, train, None, l2_train_loss, val_loss
    )
    np.testing.assert_allclose(flat(g), 2 * flat(lam), rtol=1e-15)


@pytest.mark.parametrize(
    "tx, xi",
    [
        (optax.sgd(0.1), 0.1),
        (optax.sgd(0.37), 0.37),
        (optax.chain(optax.scale(-0.25)), 0.25),
        (optax.sgd(optax.constant_schedule(0.1)), None),  # a schedule counts steps
        (optax.sgd(0.1, momentum=0.9), None),
        (optax.adam(0.1), None),
        (optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1)), None),
        (optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1)), None),
        (optax.chain(optax.scale_by_sign(), optax.scale(-0.1)), None),
    ],
)
def test_sgd_step_size_detection(tx, xi):
    got = sgd_step_size(tx)
    assert got == xi if xi is None else got == pytest.approx(xi, rel=1e-12)


# -- the DARTS toy (ALGORITHMS.md identity 9; DARTS Fig. 2) --------------------------------


def toy_val_loss(w, lam, batch):
    return lam * w - 2 * lam + 1


def toy_train_loss(w, lam, batch):
    return w**2 - 2 * lam * w + lam**2


@pytest.mark.parametrize("xi", [0.0, 0.3, 0.5, 0.7])
def test_darts_toy_fixed_point(x64, xi):
    # ξ = 0: the weights are trained with lr 0.5 and the hypergradient is first order.
    opt = T1T2Optimizer(optax.sgd(0.5), xi=0.0) if xi == 0 else T1T2Optimizer(optax.sgd(xi))
    state = opt.init(jnp.asarray(0.5), jnp.asarray(0.5))
    for _ in range(300):
        state = opt.step(state, None, None, toy_train_loss, toy_val_loss, 0.1)
    target = 2 / (1 + 2 * xi)
    assert float(state.hyperparams) == pytest.approx(target, abs=1e-3)
    assert float(state.params) == pytest.approx(target, abs=1e-3)


# -- the step: applies what compute_hypergradient returns, compiles once -------------------


@pytest.mark.parametrize("fd", ["weights", "coordinates", None])
def test_step_applies_hypergradient_and_compiles_once(x64, fd):
    train, val = logreg_data()
    lam = jnp.linspace(-1.0, 1.0, 5)
    opt = T1T2Optimizer(optax.sgd(LR), fd=fd)
    state = opt.init(logreg_init(), lam)
    g = opt.compute_hypergradient(state, train, val, l2_train_loss, l2_val_loss)
    state = opt.step(state, train, val, l2_train_loss, l2_val_loss, 0.5)  # warm-up
    np.testing.assert_allclose(flat(state.hyperparams), flat(lam - 0.5 * g), rtol=1e-14)
    with count_compilations() as counter:
        for i in range(50):
            state = opt.step(state, train, val, l2_train_loss, l2_val_loss, 0.5 / (1 + i))
            opt.compute_hypergradient(state, train, val, l2_train_loss, l2_val_loss)
        jax.block_until_ready(state)
    assert counter.count == 0
    assert int(state.step) == 51
    assert int(state.metadata["skipped_hyper_updates"]) == 0


# -- bad input ------------------------------------------------------------------------------


def _update_fn(w, lam, batch):
    return w


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"inner_optimizer": optax.sgd(0.1), "eps": 0.0}, ValueError, "eps must be"),
        ({"inner_optimizer": optax.sgd(0.1), "eps": -1e-3}, ValueError, "eps must be"),
        ({"inner_optimizer": optax.sgd(0.1), "eps": "0.01"}, TypeError, "eps must be a real"),
        ({"inner_optimizer": optax.sgd(0.1), "fd": "coordinates", "eps": 0}, ValueError, "eps"),
        ({"inner_optimizer": optax.sgd(0.1), "fd": "weight"}, ValueError, "fd must be"),
        (
            {"inner_optimizer": optax.sgd(0.1), "fd": "coordinates", "chunk_size": 0},
            ValueError,
            "chunk_size",
        ),
        ({"inner_optimizer": optax.sgd(0.1), "chunk_size": 2.5}, TypeError, "chunk_size"),
        ({"inner_optimizer": optax.sgd(0.1), "xi": -0.1}, ValueError, "xi must be"),
        (
            {"inner_optimizer": optax.sgd(0.1), "fd": None, "xi": 0.1},
            ValueError,
            'fd="weights" only',
        ),
        ({"inner_optimizer": optax.adam(0.1)}, ValueError, 'fd="coordinates".*fd=None'),
        (
            {"inner_optimizer": optax.adam(0.1), "fd": "weights"},
            ValueError,
            'fd="coordinates".*fd=None',
        ),
        (
            {"inner_optimizer": optax.sgd(0.1, momentum=0.9)},
            ValueError,
            'fd="coordinates".*fd=None',
        ),
        (
            {"inner_optimizer": lambda h: optax.sgd(0.1)},
            ValueError,
            'factory.*fd="coordinates".*fd=None',
        ),
        ({"inner_optimizer": lambda h: optax.sgd(0.1), "xi": 0.1}, ValueError, "factory"),
        ({"update_fn": _update_fn}, ValueError, "pass xi"),
        ({}, ValueError, "give the inner step"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        T1T2Optimizer(**kwargs)


def test_other_modes_accept_any_inner_step():
    for fd in ("coordinates", None):
        for inner in (optax.adam(0.1), lambda h: optax.sgd(0.1)):
            assert T1T2Optimizer(inner, fd=fd).xi is None
        T1T2Optimizer(update_fn=_update_fn, fd=fd)
    assert T1T2Optimizer(optax.adam(0.1), xi=0.01).xi == 0.01
    assert T1T2Optimizer(update_fn=_update_fn, xi=0.01).eps == 0.01
