"""Bad input gets a clear error at the call that made it; non-finite updates never corrupt."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import l2_train_loss, l2_val_loss, logreg_data, logreg_init

from gradhpo import FOOptimizer, OneStepOptimizer, reverse_hypergradient


@pytest.fixture
def problem():
    train, val = logreg_data()
    return train, val


def test_missing_inner_step_is_an_error():
    with pytest.raises(ValueError, match=r"inner_optimizer .* or update_fn"):
        OneStepOptimizer()
    with pytest.raises(ValueError, match="either inner_optimizer or update_fn, not both"):
        OneStepOptimizer(inner_optimizer=optax.sgd(0.1), update_fn=lambda w, h, b: w)
    with pytest.raises(TypeError, match="inner_optimizer must be an optax"):
        OneStepOptimizer(inner_optimizer=0.1)
    with pytest.raises(TypeError, match="outer_optimizer must be an optax"):
        OneStepOptimizer(inner_optimizer=optax.sgd(0.1), outer_optimizer="adam")


def test_factory_must_return_a_transformation():
    opt = OneStepOptimizer(inner_optimizer=lambda h: 0.1)
    with pytest.raises(TypeError, match="must return an optax GradientTransformation"):
        opt.init(jnp.zeros(2), jnp.zeros(2))


def test_optimizer_is_immutable():
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
    with pytest.raises(AttributeError, match="immutable after construction"):
        opt.outer_optimizer = optax.adam(0.1)
    with pytest.raises(AttributeError, match="immutable"):
        del opt.inner


def test_lr_hyper_required_without_outer_optimizer(problem):
    train, val = problem
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
    state = opt.init(logreg_init(), jnp.zeros(5))
    with pytest.raises(ValueError, match="lr_hyper is required"):
        opt.step(state, train, val, l2_train_loss, l2_val_loss, None)
    with pytest.raises(ValueError, match="lr_hyper must be a scalar"):
        opt.step(state, train, val, l2_train_loss, l2_val_loss, jnp.ones(2))
    with pytest.raises(TypeError):  # mandatory, no default
        opt.step(state, train, val, l2_train_loss, l2_val_loss)


def test_lr_hyper_must_be_none_with_outer_optimizer(problem):
    train, val = problem
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1), outer_optimizer=optax.adam(0.1))
    state = opt.init(logreg_init(), jnp.zeros(5))
    with pytest.raises(ValueError, match=r"lr_hyper must be None when the optimizer has an"):
        opt.step(state, train, val, l2_train_loss, l2_val_loss, 0.1)


def test_non_scalar_losses(problem):
    train, val = problem
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
    state = opt.init(logreg_init(), jnp.zeros(5))
    vector_loss = lambda w, lam, b: w["w"] * 2.0  # noqa: E731
    with pytest.raises(ValueError, match=r"train_loss_fn must return a scalar loss.*\(5,\)"):
        opt.step(state, train, val, vector_loss, l2_val_loss, 0.1)
    with pytest.raises(ValueError, match="val_loss_fn must return a scalar loss"):
        opt.step(state, train, val, l2_train_loss, vector_loss, 0.1)


def test_mismatched_params_and_hyperparams(problem):
    train, val = problem
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
    state = opt.init(logreg_init(), jnp.zeros(5))
    with pytest.raises(ValueError, match="hyperparams must have shape"):
        state.update(hyperparams=jnp.zeros(4))
    with pytest.raises(ValueError, match="params must have the pytree structure"):
        state.update(params=[jnp.zeros(5), jnp.zeros(())])
    # A hand-built state whose inner optimizer state belongs to another optimizer.
    foreign = OneStepOptimizer(inner_optimizer=optax.adam(0.1)).init(logreg_init(), jnp.zeros(5))
    with pytest.raises(ValueError, match="inner_opt_state does not match"):
        opt.step(foreign, train, val, l2_train_loss, l2_val_loss, 0.1)
    bare = type(state)(logreg_init(), jnp.zeros(5), state.inner_opt_state)
    with pytest.raises(ValueError, match=r"state\.metadata lacks"):
        opt.step(bare, train, val, l2_train_loss, l2_val_loss, 0.1)
    bad_update = OneStepOptimizer(update_fn=lambda w, lam, b: w["w"])
    s = bad_update.init(logreg_init(), jnp.zeros(5))
    with pytest.raises(ValueError, match=r"update_fn.*must have the pytree structure"):
        bad_update.step(s, train, val, l2_train_loss, l2_val_loss, 0.1)


def test_non_float_inputs_to_init():
    opt = FOOptimizer(inner_optimizer=optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"hyperparams\['k'\] must be a floating-point array"):
        opt.init(jnp.zeros(2), {"k": jnp.zeros(2, jnp.int32)})
    with pytest.raises(ValueError, match="params must be a pytree with at least one array"):
        opt.init({}, jnp.zeros(2))


def test_reference_rejects_unstacked_batches(problem):
    train, val = problem
    batches = {"x": train["x"][:3], "y": train["y"][:2]}
    with pytest.raises(ValueError, match="train_batches must be stacked with one leading"):
        reverse_hypergradient(
            logreg_init(),
            jnp.zeros(5),
            batches,
            val,
            l2_train_loss,
            l2_val_loss,
            inner_optimizer=optax.sgd(0.1),
        )


def nan_val_loss(w, lam, batch):
    """A validation loss whose gradient is NaN when batch['poison'] is set."""
    return l2_val_loss(w, lam, batch) + jnp.sum(lam) * jnp.where(batch["poison"], jnp.nan, 0.0)


def test_non_finite_hypergradient_skips_the_update_and_counts(problem):
    train, val = problem
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1), outer_optimizer=optax.adam(0.1))
    state = opt.init(logreg_init(), jnp.zeros(5))
    good, bad = dict(val, poison=jnp.asarray(False)), dict(val, poison=jnp.asarray(True))
    state = opt.step(state, train, good, l2_train_loss, nan_val_loss, None)
    after = opt.step(state, train, bad, l2_train_loss, nan_val_loss, None)
    np.testing.assert_array_equal(after.hyperparams, state.hyperparams)
    for a, b in zip(
        jax.tree.leaves(after.outer_opt_state), jax.tree.leaves(state.outer_opt_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert int(after.metadata["skipped_hyper_updates"]) == 1
    assert int(after.metadata["skipped_inner_updates"]) == 0  # the weights were finite
    # All or nothing: the finite new weights are not committed without their hyper-update.
    np.testing.assert_array_equal(after.params["w"], state.params["w"])
    again = opt.step(after, train, good, l2_train_loss, nan_val_loss, None)
    assert bool(jnp.all(jnp.isfinite(again.hyperparams)))
    assert int(again.metadata["skipped_hyper_updates"]) == 1


def nan_train_loss(w, lam, batch):
    return l2_train_loss(w, lam, batch) * jnp.where(batch["poison"], jnp.nan, 1.0)


@pytest.mark.filterwarnings("ignore:the hyperparameters do not enter")
def test_non_finite_inner_update_keeps_params_and_counts(problem):
    train, val = problem
    opt = FOOptimizer(inner_optimizer=optax.sgd(0.1, momentum=0.9))
    state = opt.init(logreg_init(), jnp.zeros(5))
    state = opt.step(
        state, dict(train, poison=jnp.asarray(False)), val, nan_train_loss, l2_val_loss, 0.1
    )
    after = opt.step(
        state, dict(train, poison=jnp.asarray(True)), val, nan_train_loss, l2_val_loss, 0.1
    )
    for a, b in zip(
        jax.tree.leaves((after.params, after.inner_opt_state)),
        jax.tree.leaves((state.params, state.inner_opt_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    assert int(after.metadata["skipped_inner_updates"]) == 1
    assert int(after.step) == 2
