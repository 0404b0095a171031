"""Compile once: the step counter, lr_hyper and metric values are data, not structure."""

import jax
import jax.numpy as jnp
import optax
import pytest
from problems import l2_train_loss, l2_val_loss, logreg_data, logreg_init

from gradhpo import FOOptimizer, OneStepOptimizer
from gradhpo.utils import count_compilations


@pytest.mark.filterwarnings("ignore:the hyperparameters do not enter")
def test_fifty_steps_with_changing_lr_hyper_compile_once():
    train, val = logreg_data()
    for cls in (FOOptimizer, OneStepOptimizer):
        opt = cls(inner_optimizer=optax.sgd(0.1, momentum=0.9))
        state = opt.init(logreg_init(), jnp.zeros(5))
        lrs = [0.1 / (1 + i) for i in range(25)] + list(jnp.linspace(0.1, 0.01, 25))
        with count_compilations() as counter:
            for lr in lrs:  # Python floats, then scalar arrays
                state = opt.step(state, train, val, l2_train_loss, l2_val_loss, lr)
            jax.block_until_ready(state)
        # One program for Python-float lr_hyper; a float32 array has another (weak) type.
        assert counter.count <= 2, counter.count
        with count_compilations() as counter:
            for lr in lrs:
                state = opt.step(state, train, val, l2_train_loss, l2_val_loss, lr)
        assert counter.count == 0
        assert int(state.step) == 100


def test_python_float_lr_hyper_compiles_exactly_once():
    train, val = logreg_data()
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
    state = opt.init(logreg_init(), jnp.zeros(5))
    with count_compilations() as counter:
        for i in range(50):
            state = opt.step(state, train, val, l2_train_loss, l2_val_loss, 0.1 * 0.9**i)
        jax.block_until_ready(state)
    assert counter.count == 1


def test_compute_hypergradient_compiles_once():
    train, val = logreg_data()
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
    state = opt.init(logreg_init(), jnp.zeros(5))
    with count_compilations() as counter:
        for _ in range(5):
            state = opt.step(state, train, val, l2_train_loss, l2_val_loss, 0.1)
            opt.compute_hypergradient(state, train, val, l2_train_loss, l2_val_loss)
    assert counter.count == 2  # step and compute_hypergradient, once each


def test_counter_sees_a_recompile():
    """The counting itself works: a new shape is a new program."""
    train, val = logreg_data()
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
    state = opt.init(logreg_init(), jnp.zeros(5))
    state = opt.step(state, train, val, l2_train_loss, l2_val_loss, 0.1)
    half = jax.tree.map(lambda a: a[:10], train)
    with count_compilations() as counter:
        opt.step(state, half, val, l2_train_loss, l2_val_loss, 0.1)
    assert counter.count == 1


def test_weak_typed_initial_values_do_not_recompile_the_second_step():
    """jnp.full(n, -4.0) and jnp.asarray(0.5) are weak-typed; init makes them strong."""
    train, val = logreg_data()
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
    params = {"w": jnp.full(5, 0.1), "b": jnp.asarray(0.0)}
    state = opt.init(params, jnp.full(5, -4.0))
    assert not any(x.weak_type for x in jax.tree.leaves((state.params, state.hyperparams)))
    with count_compilations() as counter:
        for _ in range(3):
            state = opt.step(state, train, val, l2_train_loss, l2_val_loss, 0.1)
        jax.block_until_ready(state)
    assert counter.count == 1


def test_fresh_loss_lambdas_warn_once_and_the_same_functions_never():
    import warnings

    from gradhpo.training import run

    train, val = logreg_data()
    opt = OneStepOptimizer(optax.sgd(0.1))
    state = opt.init(logreg_init(), jnp.zeros(5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            state = opt.step(state, train, val, l2_train_loss, l2_val_loss, 0.1)
        run(
            opt,
            state,
            train,
            val,
            l2_train_loss,
            l2_val_loss,
            episode_length=2,
            lr_hyper=0.1,
            progress=False,
        )
    assert not [w for w in caught if "new function object" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            state = opt.step(
                state, train, val, lambda w, l, b: l2_train_loss(w, l, b), l2_val_loss, 0.1
            )
    messages = [str(w.message) for w in caught if "new function object" in str(w.message)]
    assert len(messages) == 1 and "train_loss_fn" in messages[0]
    assert "test_compile.py" in messages[0] and caught[0].filename == __file__
