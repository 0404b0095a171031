"""Bad input, as a hostile user gives it: a clear error of the right type naming the argument.

Parametrized over every optimizer of the contract suite, and over ``run``,
``run_population`` and the optimizers' constructors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import l2_train_loss, logistic_loss, logreg_data, logreg_init
from test_contract import OPTIMIZERS, val_loss

import gradhpo
from gradhpo import BilevelState, WindowOptimizer
from gradhpo.training import run, run_population

names = pytest.mark.parametrize("name", sorted(OPTIMIZERS))
# FO warns where λ does not enter L_val, which some of the bad losses below do on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:the hyperparameters do not enter")


def setup(name):
    train, val = logreg_data()
    opt = OPTIMIZERS[name]()
    return opt, opt.init(logreg_init(), jnp.full(5, -1.0)), train, val


def step(opt, state, train, val, tl=l2_train_loss, vl=val_loss, lr=0.1):
    if isinstance(opt, WindowOptimizer):
        return opt.step(state, train, val, tl, vl)
    return opt.step(state, train, val, tl, vl, lr)


# -- losses ---------------------------------------------------------------------------------


def with_aux(w, lam, batch):
    return val_loss(w, lam, batch), {"aux": 1.0}


def int_loss(w, lam, batch):
    return jnp.int32(1) + 0 * jnp.sum(w["w"]).astype(jnp.int32)


def complex_loss(w, lam, batch):
    return val_loss(w, lam, batch) * (1 + 1j)


def vector_loss(w, lam, batch):
    return jnp.stack([val_loss(w, lam, batch)] * 2)


LOSS_CASES = [
    (with_aux, TypeError, "must return a scalar loss, got a tuple"),
    (int_loss, TypeError, "must return a real floating-point loss"),
    (complex_loss, TypeError, "must return a real floating-point loss"),
    (vector_loss, ValueError, "must return a scalar loss, got an array of shape"),
]


@names
@pytest.mark.parametrize(
    ("loss", "error", "match"), LOSS_CASES, ids=lambda c: getattr(c, "__name__", "")
)
@pytest.mark.parametrize("which", ["train_loss_fn", "val_loss_fn"])
def test_a_bad_loss_is_named(name, loss, error, match, which):
    opt, state, train, val = setup(name)
    losses = {"tl": loss} if which == "train_loss_fn" else {"vl": loss}
    with pytest.raises(error, match=f"{which} {match}"):
        step(opt, state, train, val, **losses)


# -- states from elsewhere --------------------------------------------------------------------


@names
def test_a_foreign_outer_state_is_named(name):
    opt, state, train, val = setup(name)
    other = optax.adam(0.1).init(jnp.zeros(7))  # another optimizer's, for a λ of another shape
    with pytest.raises(ValueError, match=r"state\.outer_opt_state"):
        step(opt, state.update(outer_opt_state=other), train, val)


@names
def test_a_hand_built_state_is_named(name):
    opt, state, train, val = setup(name)
    with pytest.raises(ValueError, match=r"state\.metadata lacks"):
        step(opt, BilevelState(state.params, state.hyperparams), train, val)


@names
def test_a_population_state_is_refused_by_step(name):
    opt, state, train, val = setup(name)
    states = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    with pytest.raises(ValueError, match="leading population axis"):
        step(opt, states, train, val)


@names
def test_an_inner_state_of_another_optimizer_is_named(name):
    opt, state, train, val = setup(name)
    other = optax.adam(0.1).init(state.params)
    with pytest.raises(ValueError, match=r"state\.inner_opt_state"):
        step(opt, state.update(inner_opt_state=other), train, val)


# -- lr_hyper -------------------------------------------------------------------------------


@names
@pytest.mark.parametrize(
    ("lr", "error"),
    [
        ([0.1], TypeError),
        (-0.1, ValueError),
        (True, TypeError),
        ("a", TypeError),
        (float("nan"), ValueError),
        (1 + 2j, TypeError),
        (jnp.ones(2), ValueError),
    ],
    ids=["list", "negative", "bool", "str", "nan", "complex", "vector"],
)
def test_a_bad_lr_hyper_is_named(name, lr, error):
    opt, state, train, val = setup(name)
    if isinstance(opt, WindowOptimizer):
        with pytest.raises(ValueError, match="takes no lr_hyper"):
            opt.step(state, train, val, l2_train_loss, val_loss, lr)
        return
    with pytest.raises(error, match="lr_hyper"):
        opt.step(state, train, val, l2_train_loss, val_loss, lr)


@names
def test_numpy_scalars_are_accepted_as_lr_hyper(name):
    opt, state, train, val = setup(name)
    if not isinstance(opt, WindowOptimizer):
        for lr in (np.float32(0.1), np.float64(0.1), jnp.asarray(0.1), 0):
            step(opt, state, train, val, lr=lr)


# -- run and run_population ---------------------------------------------------------------------


def one_step():
    opt = gradhpo.OneStepOptimizer(optax.sgd(0.1))
    return opt, opt.init(logreg_init(), jnp.zeros(5))


RUN_CASES = [
    ({"num_episodes": 0}, ValueError, "num_episodes"),
    ({"num_episodes": True}, ValueError, "num_episodes"),
    ({"num_episodes": "2"}, ValueError, "num_episodes"),
    ({"num_episodes": 2.0}, ValueError, "num_episodes"),
    ({"episode_length": -1}, ValueError, "episode_length"),
    ({"hyper_update_every": 0}, ValueError, "hyper_update_every"),
    ({"lr_reptile": "a"}, ValueError, "lr_reptile"),
    ({"lr_reptile": 2.0}, ValueError, "lr_reptile"),
    ({"lr_reptile": True}, ValueError, "lr_reptile"),
    ({"lr_hyper": -1.0}, ValueError, "lr_hyper"),
    ({"lr_hyper": [0.1]}, TypeError, "lr_hyper"),
    ({"lr_hyper": True}, TypeError, "lr_hyper"),
    ({"hyperparams_every": 0}, ValueError, "hyperparams_every"),
    ({"stall_after": 0}, ValueError, "stall_after"),
    ({"strict": "yes"}, TypeError, "strict"),
    ({"fidelity_every": 0}, ValueError, "fidelity_every"),
    ({"key": jnp.zeros(3, jnp.uint32)}, ValueError, "key must be one PRNG key"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), RUN_CASES, ids=lambda c: str(c)[:40])
def test_bad_run_options_are_named(kwargs, error, match):
    opt, state = one_step()
    train, val = logreg_data()
    options = {"episode_length": 2, "lr_hyper": 0.1, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        run(opt, state, train, val, l2_train_loss, val_loss, **options)


def test_numpy_integers_are_accepted_as_counts():
    opt, state = one_step()
    train, val = logreg_data()
    out = run(
        opt,
        state,
        train,
        val,
        l2_train_loss,
        val_loss,
        num_episodes=np.int64(2),
        episode_length=np.int32(3),
        hyper_update_every=np.int64(1),
        lr_hyper=np.float32(0.1),
        progress=False,
    )
    assert out.history["val_loss"].shape == (2, 3)


def test_run_refuses_a_population_and_continues_a_run_result():
    opt, state = one_step()
    train, val = logreg_data()
    states = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    kwargs = {"episode_length": 2, "lr_hyper": 0.1, "progress": False}
    with pytest.raises(ValueError, match="run_population"):
        run(opt, states, train, val, l2_train_loss, val_loss, **kwargs)
    result = run(opt, state, train, val, l2_train_loss, val_loss, **kwargs)
    assert run(opt, result, train, val, l2_train_loss, val_loss, **kwargs).episode == 2
    with pytest.raises(TypeError, match=r"result\.state"):  # a result is no state for step
        opt.step(result, train, val, l2_train_loss, val_loss, 0.1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"keys": jax.random.split(jax.random.PRNGKey(0), 3)}, ValueError, "keys"),
        ({"strict": 1}, TypeError, "strict"),
        ({"stall_after": -2}, ValueError, "stall_after"),
    ],
    ids=["keys", "strict", "stall_after"],
)
def test_bad_run_population_options_are_named(kwargs, error, match):
    opt, state = one_step()
    train, val = logreg_data()
    states = jax.tree.map(lambda x: jnp.stack([x, x]), state)
    options = {
        "keys": jax.random.split(jax.random.PRNGKey(0), 2),
        "episode_length": 2,
        "lr_hyper": 0.1,
        "progress": False,
        **kwargs,
    }
    with pytest.raises(error, match=match):
        run_population(opt, states, train, val, l2_train_loss, val_loss, **options)


def test_run_population_refuses_a_single_state():
    opt, state = one_step()
    train, val = logreg_data()
    with pytest.raises(ValueError, match="leading population axis"):
        run_population(
            opt,
            state,
            train,
            val,
            l2_train_loss,
            val_loss,
            keys=jax.random.split(jax.random.PRNGKey(0), 2),
            episode_length=2,
            lr_hyper=0.1,
        )


# -- constructors: one set of type rules ----------------------------------------------------------


CONSTRUCTOR_CASES = [
    (
        lambda: gradhpo.OnlineHypergradientOptimizer(optax.sgd(0.1), distill_batch="no"),
        TypeError,
        "distill_batch must be True or False",
    ),
    (
        lambda: gradhpo.OnlineHypergradientOptimizer(optax.sgd(0.1), unit_direction=1),
        TypeError,
        "unit_direction must be True or False",
    ),
    (lambda: gradhpo.OnlineHypergradientOptimizer(optax.sgd(0.1), T=True), ValueError, "T must"),
    (lambda: gradhpo.OnlineHypergradientOptimizer(optax.sgd(0.1), gamma=True), ValueError, "gamma"),
    (
        lambda: gradhpo.GreedyOptimizer(optax.sgd(0.1), optax.sgd(0.1), unroll_steps=2.5),
        ValueError,
        "unroll_steps",
    ),
    (
        lambda: gradhpo.ReverseModeOptimizer(optax.sgd(0.1), optax.sgd(0.1), mixed_mode="yes"),
        TypeError,
        "mixed_mode must be True or False",
    ),
    (
        lambda: gradhpo.T1T2Optimizer(optax.sgd(0.1), eps=5.0),
        ValueError,
        r"eps must be in \(0, 1\]",
    ),
    (lambda: gradhpo.T1T2Optimizer(optax.sgd(0.1), eps=True), TypeError, "eps"),
    (
        lambda: gradhpo.OneStepOptimizer(optax.sgd(0.1), outer_optimizer="adam"),
        TypeError,
        "outer_optimizer",
    ),
]


@pytest.mark.parametrize(
    ("build", "error", "match"), CONSTRUCTOR_CASES, ids=range(len(CONSTRUCTOR_CASES))
)
def test_bad_constructor_arguments_are_named(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_numpy_integers_are_accepted_by_every_constructor():
    T = np.int64(3)
    assert gradhpo.OnlineHypergradientOptimizer(optax.sgd(0.1), T=T).T == 3
    assert gradhpo.GreedyOptimizer(optax.sgd(0.1), optax.sgd(0.1), unroll_steps=T).unroll_steps == 3
    assert gradhpo.T1T2Optimizer(optax.sgd(0.1), fd="coordinates", chunk_size=T).chunk_size == 3


@pytest.mark.parametrize("fd", ["weights", "coordinates"])
def test_t1t2_eps_below_round_off_is_refused_at_the_step(fd):
    opt = gradhpo.T1T2Optimizer(optax.sgd(0.3), fd=fd, eps=1e-12)
    train, val = logreg_data()
    state = opt.init(logreg_init(), jnp.zeros(5))
    with pytest.raises(ValueError, match=r"eps = 1e-12 is below √\(machine epsilon\) of float32"):
        opt.step(state, train, val, l2_train_loss, val_loss, 0.1)


def test_t1t2_default_eps_does_not_vanish_with_large_weights():
    # Weights of size 1e4: an absolute perturbation of norm 0.01 would be below their
    # float32 round-off; the relative one keeps the estimate close to the exact VJP.
    train, val = logreg_data()

    def tl(w, lam, batch):
        return logistic_loss({"w": w["w"] * 1e-4, "b": w["b"]}, batch) + 0.5 * jnp.sum(
            jnp.exp(lam) * (w["w"] * 1e-4) ** 2
        )

    w0 = {"w": jnp.full(5, 1e3), "b": jnp.zeros(())}
    fd = gradhpo.T1T2Optimizer(optax.sgd(0.3))
    exact = gradhpo.T1T2Optimizer(optax.sgd(0.3), fd=None)
    g_fd = fd.compute_hypergradient(fd.init(w0, jnp.zeros(5)), train, val, tl, l2_val)
    g = exact.compute_hypergradient(exact.init(w0, jnp.zeros(5)), train, val, tl, l2_val)
    np.testing.assert_allclose(g_fd, g, rtol=2e-2, atol=1e-9)


def l2_val(w, lam, batch):
    return logistic_loss({"w": w["w"] * 1e-4, "b": w["b"]}, batch)


def test_a_model_object_as_params_names_the_leaf_and_the_fix():
    import equinox as eqx

    model = eqx.nn.MLP(2, 1, 4, 1, key=jax.random.PRNGKey(0))
    opt, _ = one_step()
    with pytest.raises(TypeError, match=r"params\.activation is a .*eqx\.partition.*nnx\.split"):
        opt.init(model, jnp.zeros(()))
    params, _ = eqx.partition(model, eqx.is_inexact_array)
    opt.init(params, jnp.zeros(()))  # the split model is fine
