"""FO and One-Step against the exact references (float64), and their shared machinery."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import l2_train_loss, l2_val_loss, logistic_loss, logreg_data, logreg_init

from gradhpo import FOOptimizer, OneStepOptimizer, forward_hypergradient, reverse_hypergradient
from gradhpo.utils import tree_norm


def rel_err(a, b):
    diff = jax.tree.map(jnp.subtract, a, b)
    return float(tree_norm(diff) / tree_norm(b))


def one_batch(batch):
    return jax.tree.map(lambda a: a[None], batch)


def advance(opt, state, train, val, tl, vl, n=3, lr=0.05):
    for _ in range(n):
        state = opt.step(state, train, val, tl, vl, lr)
    return state


def test_one_step_equals_reverse_mode_per_parameter_l2(x64):
    train, val = logreg_data()
    for inner in (optax.sgd(0.3), optax.sgd(0.3, momentum=0.9), optax.adam(0.05)):
        opt = OneStepOptimizer(inner_optimizer=inner)
        state = advance(
            opt, opt.init(logreg_init(), jnp.full(5, -1.0)), train, val, l2_train_loss, l2_val_loss
        )
        g = opt.compute_hypergradient(state, train, val, l2_train_loss, l2_val_loss)
        exact = reverse_hypergradient(
            state.params,
            state.hyperparams,
            one_batch(train),
            val,
            l2_train_loss,
            l2_val_loss,
            inner_optimizer=inner,
            inner_opt_state=state.inner_opt_state,
        )
        assert g.dtype == jnp.float64
        assert rel_err(g, exact) <= 1e-10
        assert float(tree_norm(exact)) > 1e-4  # not a trivially zero comparison


def per_parameter_lr_update(w, lam, batch):
    """SGD with a learning rate per parameter: w ← w - exp(λ) ⊙ ∇L(w)."""
    g = jax.grad(logistic_loss)(w, batch)
    return jax.tree.map(lambda p, gi, l: p - jnp.exp(l) * gi, w, g, lam)


def lr_train_loss(w, lam, batch):
    return logistic_loss(w, batch)


def test_one_step_equals_reverse_mode_per_parameter_learning_rates(x64):
    train, val = logreg_data(seed=1)
    w0 = logreg_init()
    lam = jax.tree.map(lambda p: jnp.full_like(p, -1.0), w0)
    opt = OneStepOptimizer(update_fn=per_parameter_lr_update)
    state = advance(opt, opt.init(w0, lam), train, val, lr_train_loss, lr_train_loss)
    g = opt.compute_hypergradient(state, train, val, lr_train_loss, lr_train_loss)
    exact = reverse_hypergradient(
        state.params,
        state.hyperparams,
        one_batch(train),
        val,
        lr_train_loss,
        lr_train_loss,
        update_fn=per_parameter_lr_update,
    )
    assert rel_err(g, exact) <= 1e-10 and float(tree_norm(exact)) > 1e-4


def sgd_factory(h):
    return optax.sgd(jnp.exp(h["log_lr"]), momentum=jax.nn.sigmoid(h["logit_momentum"]))


def test_one_step_equals_reverse_mode_optimizer_factory(x64):
    train, val = logreg_data(seed=2)
    h0 = {"log_lr": jnp.asarray(-1.0), "logit_momentum": jnp.asarray(0.5)}
    opt = OneStepOptimizer(inner_optimizer=sgd_factory)
    # After a few steps the momentum trace is non-zero, so d/d(momentum) is non-trivial.
    state = advance(opt, opt.init(logreg_init(), h0), train, val, lr_train_loss, lr_train_loss)
    g = opt.compute_hypergradient(state, train, val, lr_train_loss, lr_train_loss)
    exact = reverse_hypergradient(
        state.params,
        state.hyperparams,
        one_batch(train),
        val,
        lr_train_loss,
        lr_train_loss,
        inner_optimizer=sgd_factory,
        inner_opt_state=state.inner_opt_state,
    )
    assert rel_err(g, exact) <= 1e-10
    assert abs(float(g["logit_momentum"])) > 1e-6 and abs(float(g["log_lr"])) > 1e-6


def test_forward_mode_equals_reverse_mode_at_T10(x64):
    train, val = logreg_data(seed=3)
    idx = jax.random.randint(jax.random.PRNGKey(0), (10, 20), 0, 40)
    batches = jax.tree.map(lambda a: a[idx], train)
    for kwargs in (
        {"inner_optimizer": optax.sgd(0.3, momentum=0.9)},
        {"inner_optimizer": sgd_factory},
    ):
        lam = (
            jnp.full(5, -1.0)
            if kwargs["inner_optimizer"] is not sgd_factory
            else {"log_lr": jnp.asarray(-1.0), "logit_momentum": jnp.asarray(0.5)}
        )
        tl = l2_train_loss if not isinstance(lam, dict) else lr_train_loss
        vl = l2_val_loss if not isinstance(lam, dict) else lr_train_loss
        rev = reverse_hypergradient(logreg_init(), lam, batches, val, tl, vl, **kwargs)
        fwd = forward_hypergradient(logreg_init(), lam, batches, val, tl, vl, **kwargs)
        assert rel_err(fwd, rev) <= 1e-10 and float(tree_norm(rev)) > 1e-4


def test_checkpointed_reverse_mode_is_exact(x64):
    train, val = logreg_data(seed=4)
    idx = jax.random.randint(jax.random.PRNGKey(1), (10, 20), 0, 40)
    batches = [jax.tree.map(lambda a, i=i: a[idx[i]], train) for i in range(10)]  # a list
    kw = {"inner_optimizer": optax.sgd(0.3, momentum=0.9)}
    plain = reverse_hypergradient(
        logreg_init(), jnp.zeros(5), batches, val, l2_train_loss, l2_val_loss, **kw
    )
    for k in (1, 3, 5, 10, 20):
        remat = reverse_hypergradient(
            logreg_init(),
            jnp.zeros(5),
            batches,
            val,
            l2_train_loss,
            l2_val_loss,
            checkpoint_every=k,
            **kw,
        )
        assert rel_err(remat, plain) <= 1e-12
    with pytest.raises(ValueError, match="checkpoint_every must be None or an int >= 1"):
        reverse_hypergradient(
            logreg_init(),
            jnp.zeros(5),
            batches,
            val,
            l2_train_loss,
            l2_val_loss,
            checkpoint_every=0,
            **kw,
        )


def test_reference_matches_central_finite_difference(x64):
    train, val = logreg_data(seed=5)
    idx = jax.random.randint(jax.random.PRNGKey(2), (5, 20), 0, 40)
    batches = jax.tree.map(lambda a: a[idx], train)
    from gradhpo import unrolled_val_loss

    lam = jnp.linspace(-2.0, 0.0, 5)
    kw = {"inner_optimizer": optax.sgd(0.5)}
    g = reverse_hypergradient(logreg_init(), lam, batches, val, l2_train_loss, l2_val_loss, **kw)
    u = jnp.array([0.3, -0.2, 0.5, 0.1, -0.4])
    eps = 1e-5

    def f(lam):
        return unrolled_val_loss(lam, logreg_init(), batches, val, l2_train_loss, l2_val_loss, **kw)

    fd = (f(lam + eps * u) - f(lam - eps * u)) / (2 * eps)
    np.testing.assert_allclose(float(fd), float(g @ u), rtol=1e-7)


def test_fo_equals_direct_validation_gradient(x64):
    def val_with_lambda(w, lam, batch):
        return logistic_loss(w, batch) + 0.1 * jnp.sum(jnp.exp(lam) * w["w"] ** 2)

    train, val = logreg_data(seed=6)
    opt = FOOptimizer(inner_optimizer=optax.sgd(0.3))
    state = advance(
        opt, opt.init(logreg_init(), jnp.zeros(5)), train, val, l2_train_loss, val_with_lambda
    )
    g = opt.compute_hypergradient(state, train, val, l2_train_loss, val_with_lambda)
    w_next = jax.tree.map(
        lambda p, gr: p - 0.3 * gr,
        state.params,
        jax.grad(l2_train_loss)(state.params, state.hyperparams, train),
    )
    expected = jax.grad(val_with_lambda, argnums=1)(w_next, state.hyperparams, val)
    assert rel_err(g, expected) <= 1e-12


def test_fo_is_zero_with_one_warning_when_lambda_not_in_val_loss(x64):
    train, val = logreg_data(seed=7)
    opt = FOOptimizer(inner_optimizer=optax.sgd(0.3))
    state = opt.init(logreg_init(), jnp.zeros(5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(5):
            state = opt.step(state, train, val, l2_train_loss, l2_val_loss, 0.1)
        g = opt.compute_hypergradient(state, train, val, l2_train_loss, l2_val_loss)
    messages = [str(w.message) for w in caught if "do not enter val_loss_fn" in str(w.message)]
    assert len(messages) == 1
    np.testing.assert_array_equal(g, 0.0)
    np.testing.assert_array_equal(state.hyperparams, 0.0)


def test_compute_hypergradient_equals_applied_update(x64):
    train, val = logreg_data(seed=8)
    for cls in (FOOptimizer, OneStepOptimizer):
        vl = lambda w, lam, b: logistic_loss(w, b) + 0.01 * jnp.sum(lam**2)  # noqa: E731
        opt = cls(inner_optimizer=optax.sgd(0.3, momentum=0.5))
        state = advance(
            opt, opt.init(logreg_init(), jnp.full(5, -1.0)), train, val, l2_train_loss, vl
        )
        g = opt.compute_hypergradient(state, train, val, l2_train_loss, vl)
        new = opt.step(state, train, val, l2_train_loss, vl, 1.0)
        applied = state.hyperparams - new.hyperparams
        np.testing.assert_allclose(applied, g, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(new.metadata["hypergrad_norm"], tree_norm(g), rtol=1e-12)


def test_outer_optax_optimizer_applies_the_same_hypergradient(x64):
    train, val = logreg_data(seed=9)
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.3), outer_optimizer=optax.adam(0.1))
    state = opt.init(logreg_init(), jnp.full(5, -1.0))
    g = opt.compute_hypergradient(state, train, val, l2_train_loss, l2_val_loss)
    new = opt.step(state, train, val, l2_train_loss, l2_val_loss, None)
    tx = optax.adam(0.1)
    updates, _ = tx.update(g, tx.init(state.hyperparams), state.hyperparams)
    np.testing.assert_allclose(new.hyperparams, state.hyperparams + updates, rtol=1e-12)


def test_momentum_inner_state_matches_a_plain_optax_loop(x64):
    train, val = logreg_data(seed=10)
    inner = optax.sgd(0.2, momentum=0.9, nesterov=True)
    lam = jnp.full(5, -1.0)
    for cls in (FOOptimizer, OneStepOptimizer):
        opt = cls(inner_optimizer=inner)
        state = opt.init(logreg_init(), lam)
        w, s = logreg_init(), inner.init(logreg_init())
        for i in range(7):
            batch = jax.tree.map(lambda a, i=i: a[i : i + 20], train)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = opt.step(state, batch, val, l2_train_loss, l2_val_loss, 0.0)
            g = jax.grad(l2_train_loss)(w, lam, batch)
            u, s = inner.update(g, s, w)
            w = optax.apply_updates(w, u)
        # Equal to round-off (jitted and eager arithmetic may differ in the last bit).
        for a, b in zip(
            jax.tree.leaves((state.params, state.inner_opt_state)),
            jax.tree.leaves((w, s)),
            strict=True,
        ):
            np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)
        assert int(state.step) == 7


def test_metrics_are_written_into_metadata(x64):
    train, val = logreg_data(seed=11)
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.3))
    state = opt.init(logreg_init(), jnp.zeros(5))
    assert np.isnan(state.metadata["val_loss"])
    new = opt.step(state, train, val, l2_train_loss, l2_val_loss, 0.1)
    np.testing.assert_allclose(
        new.metadata["train_loss"], l2_train_loss(state.params, state.hyperparams, train)
    )
    np.testing.assert_allclose(
        new.metadata["val_loss"], l2_val_loss(new.params, state.hyperparams, val)
    )
    assert new.metadata["val_loss"].dtype == jnp.float64


def test_one_step_scales_with_validation_loss():
    """Identity 12: multiplying L_val by c multiplies the hypergradient by c."""
    train, val = logreg_data(seed=12)
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.3))
    state = opt.init(logreg_init(), jnp.full(5, -1.0))
    g = opt.compute_hypergradient(state, train, val, l2_train_loss, l2_val_loss)
    for c in (0.5, 3.0):
        scaled = lambda w, lam, b, c=c: c * l2_val_loss(w, lam, b)  # noqa: E731
        np.testing.assert_allclose(
            opt.compute_hypergradient(state, train, val, l2_train_loss, scaled), c * g, rtol=1e-5
        )
