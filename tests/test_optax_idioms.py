"""optax idioms: ``inject_hyperparams`` factories, λ leaves that nothing reads."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import logistic_loss, logreg_data, logreg_init

import gradhpo


def train_loss(w, lam, batch):
    return logistic_loss(w, batch) + 1e-2 * jnp.sum(w["w"] ** 2)


def val_loss(w, lam, batch):
    return logistic_loss(w, batch)


def injected(lam):
    return optax.inject_hyperparams(optax.sgd)(
        learning_rate=jnp.exp(lam["log_lr"]), momentum=jax.nn.sigmoid(lam["logit_mu"])
    )


def plain(lam):
    return optax.sgd(jnp.exp(lam["log_lr"]), momentum=jax.nn.sigmoid(lam["logit_mu"]))


LAM = {"log_lr": jnp.log(0.5), "logit_mu": jnp.asarray(0.3)}


@pytest.mark.parametrize("T", [1, 3])
def test_an_inject_hyperparams_factory_is_driven_by_lambda(x64, T):
    """Reverse mode through inject_hyperparams equals the plain factory and, at T = 1, the
    closed form -lr ∇L_val(w_1)·∇L_train(w_0) for the learning rate."""
    train, val = logreg_data()
    lam = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), LAM)
    grads = {}
    for name, factory in (("injected", injected), ("plain", plain)):
        opt = gradhpo.ReverseModeOptimizer(factory, optax.sgd(0.1), unroll_steps=T)
        state = opt.init(logreg_init(), lam)
        grads[name] = opt.compute_hypergradient(state, train, val, train_loss, val_loss)
    for a, b in zip(
        jax.tree.leaves(grads["injected"]), jax.tree.leaves(grads["plain"]), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert abs(float(grads["injected"]["log_lr"])) > 1e-6  # not the silent zero
    if T == 1:
        w0 = logreg_init()
        g0 = jax.grad(train_loss)(w0, lam, train)
        lr = jnp.exp(lam["log_lr"])
        w1 = jax.tree.map(lambda w, g: w - lr * g, w0, g0)
        gv = jax.grad(val_loss)(w1, lam, val)
        dot = sum(
            jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(gv), jax.tree.leaves(g0), strict=True)
        )
        np.testing.assert_allclose(grads["injected"]["log_lr"], -lr * dot, rtol=1e-12)
        assert float(grads["injected"]["logit_mu"]) == 0.0  # no momentum in the first step


def test_online_steps_through_inject_hyperparams_equal_the_plain_factory(x64):
    train, val = logreg_data()
    states = {}
    for name, factory in (("injected", injected), ("plain", plain)):
        opt = gradhpo.OneStepOptimizer(factory)
        state = opt.init(logreg_init(), LAM)
        for _ in range(3):
            state = opt.step(state, train, val, train_loss, val_loss, 0.1)
        states[name] = state
    for a, b in zip(
        jax.tree.leaves((states["injected"].params, states["injected"].hyperparams)),
        jax.tree.leaves((states["plain"].params, states["plain"].hyperparams)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_a_lambda_leaf_nothing_reads_is_named_once():
    train, val = logreg_data()
    opt = gradhpo.OneStepOptimizer(lambda lam: optax.sgd(jnp.exp(lam["log_lr"])))
    lam = {"log_lr": jnp.log(0.5), "forgotten": jnp.zeros(3)}
    state = opt.init(logreg_init(), lam)
    with pytest.warns(UserWarning, match=r"depends on hyperparams\['forgotten'\], so") as record:
        state = opt.step(state, train, val, train_loss, val_loss, 0.1)
    assert record[0].filename == __file__  # attributed to the user's call, not to gradhpo
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(state, train, val, train_loss, val_loss, 0.2)  # compiled: no second warning

    # The classic mistake: λ meant as the learning rate of an optimizer built outside.
    outside = gradhpo.GreedyOptimizer(
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), optax.sgd(0.1), unroll_steps=2
    )
    state = outside.init(logreg_init(), jnp.asarray(0.1))
    with pytest.warns(UserWarning, match=r"depends on hyperparams, so .* factory"):
        outside.step(state, train, val, train_loss, val_loss)

    used = gradhpo.OneStepOptimizer(injected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        used.step(used.init(logreg_init(), LAM), train, val, train_loss, val_loss, 0.1)


def relu_net_loss(w, lam, batch):
    hidden = jax.nn.relu(batch["x"] @ w["a"])
    return jnp.mean((hidden @ w["b"] - batch["y"]) ** 2) + jnp.sum(jnp.exp(lam) * w["a"] ** 2)


def relu_net_problem():
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (20, 3), jnp.float64)
    batch = {"x": x, "y": jnp.sin(x[:, 0])}
    # A dead unit (a zero column): its gradient entries are exactly zero.
    w = {"a": jax.random.normal(key, (3, 8), jnp.float64).at[:, 0].set(0.0), "b": jnp.ones(8)}
    return w, jnp.full((3, 8), -3.0), batch


@pytest.mark.parametrize("cls", [gradhpo.ReverseModeOptimizer, gradhpo.ForwardModeOptimizer])
def test_exact_references_through_adam_warn_without_eps_root_and_work_with_it(x64, cls):
    w, lam, batch = relu_net_problem()
    bare = cls(optax.adam(0.01), optax.sgd(0.1), unroll_steps=2)
    with pytest.warns(UserWarning, match=r"sqrt'\(0\).*eps_root=1e-12"):
        g = bare.compute_hypergradient(
            bare.init(w, lam), batch, batch, relu_net_loss, relu_net_loss
        )
    assert not np.all(np.isfinite(g))  # what the warning is about
    grads = []
    for method in (gradhpo.ReverseModeOptimizer, gradhpo.ForwardModeOptimizer):
        safe = method(optax.adam(0.01, eps_root=1e-12), optax.sgd(0.1), unroll_steps=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            state = safe.init(w, lam)
            grads.append(
                safe.compute_hypergradient(state, batch, batch, relu_net_loss, relu_net_loss)
            )
    assert np.all(np.isfinite(grads[0]))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-9, atol=1e-14)
    fo = gradhpo.FOOptimizer(optax.adam(0.01))  # does not differentiate the update: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fo.step(fo.init(w, lam), batch, batch, relu_net_loss, lambda w, l, b: jnp.sum(l), 0.1)
