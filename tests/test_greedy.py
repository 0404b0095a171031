"""GreedyOptimizer against One-Step, the exact reverse mode and closed forms (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.extend.core import jaxprs_in_params
from problems import logistic_loss, logreg_data, logreg_init, train_batches

from gradhpo import GreedyOptimizer, OneStepOptimizer, Stacked, reverse_hypergradient
from gradhpo.utils import count_compilations, tree_norm


def assert_tree_close(a, b, rtol=1e-12, atol=1e-14):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


def rel_err(a, b):
    return float(tree_norm(jax.tree.map(jnp.subtract, a, b)) / tree_norm(b))


def at(batches, t):
    return jax.tree.map(lambda x: x[t], batches)


# λ = {"log_l2": per-weight L2 strength, "log_lr": the inner learning rate}: a factory optimizer.
def train_loss(w, lam, batch):
    return logistic_loss(w, batch) + 0.5 * jnp.sum(jnp.exp(lam["log_l2"]) * w["w"] ** 2)


def val_loss(w, lam, batch):
    return logistic_loss(w, batch) + 1e-2 * jnp.sum(lam["log_l2"] ** 2)  # g_FO ≠ 0


def inner_factory(lam):
    return optax.sgd(jnp.exp(lam["log_lr"]), momentum=0.9)


def hyper0(d=5):
    return {"log_l2": jnp.linspace(-2.0, 0.0, d), "log_lr": jnp.asarray(np.log(0.3))}


def data(T, seed=0):
    train, val = logreg_data(seed=seed)
    return train, val, train_batches(train, T, seed=seed), train_batches(val, T, seed=seed + 7)


# -- identities ------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.3, 1.0])
def test_unit_horizon_is_one_step(x64, gamma):
    train, val, _, _ = data(1)
    outer = optax.adam(0.05)
    greedy = GreedyOptimizer(inner_factory, outer, unroll_steps=1, gamma=gamma)
    one = OneStepOptimizer(inner_factory, outer)
    s_g, s_o = greedy.init(logreg_init(), hyper0()), one.init(logreg_init(), hyper0())
    for _ in range(3):
        g_g = greedy.compute_hypergradient(s_g, train, val, train_loss, val_loss)
        assert_tree_close(g_g, one.compute_hypergradient(s_o, train, val, train_loss, val_loss))
        assert float(tree_norm(g_g)) > 1e-3 and g_g["log_l2"].dtype == jnp.float64
        s_g = greedy.step(s_g, train, val, train_loss, val_loss)
        s_o = one.step(s_o, train, val, train_loss, val_loss, None)
        assert_tree_close(s_g, s_o)


@pytest.mark.parametrize("T", [1, 3, 7])
def test_gamma_to_zero_is_one_step_at_any_horizon(x64, T):
    _, val, batches, _ = data(T)
    outer = optax.sgd(0.5)
    greedy = GreedyOptimizer(inner_factory, outer, unroll_steps=T, gamma=1e-12)
    one = OneStepOptimizer(inner_factory, outer)
    state = greedy.init(logreg_init(), hyper0())
    # One-Step from (w_{T-1}, s_{T-1}) with the last batch D_T.
    w, s = state.params, state.inner_opt_state
    for t in range(T - 1):
        w, s, _ = greedy.inner(w, s, state.hyperparams, at(batches, t), train_loss)
    s_one = one.init(logreg_init(), hyper0()).update(params=w, inner_opt_state=s)
    last = at(batches, T - 1)
    g_one = one.compute_hypergradient(s_one, last, val, train_loss, val_loss)
    g = greedy.compute_hypergradient(state, Stacked(batches), val, train_loss, val_loss)
    assert rel_err(g, g_one) <= 1e-10
    new, new_one = (
        greedy.step(state, Stacked(batches), val, train_loss, val_loss),
        one.step(s_one, last, val, train_loss, val_loss, None),
    )
    assert_tree_close(new.params, new_one.params)
    assert_tree_close(new.hyperparams, new_one.hyperparams, rtol=1e-10)
    assert int(new.step) == T


def quadratic_problem(T, seed=0):
    """Identity 7: ``L_train = k/2 ‖w‖² - (Mλ + b_t)·w``, SGD η, so ``A_t = (1 - ηk) I``."""
    rng = np.random.default_rng(seed)
    P, H, k, eta = 4, 3, 2.0, 0.2
    M, c = jnp.asarray(rng.normal(size=(P, H))), jnp.asarray(rng.normal(size=P))
    b = jnp.asarray(rng.normal(size=(T, P)))

    def train(w, lam, b_t):
        return 0.5 * k * jnp.sum(w**2) - jnp.dot(M @ lam + b_t, w)

    def val(w, lam, _):  # linear in w, so α_t = c for every t
        return jnp.dot(c, w) + 0.5 * jnp.sum(lam**2)

    def update(w, lam, b_t):
        return w - eta * jax.grad(train)(w, lam, b_t)

    w0, lam = jnp.asarray(rng.normal(size=P)), jnp.asarray(rng.normal(size=H))
    return dict(
        train=train, val=val, update=update, eta=eta, gamma=1 - eta * k, b=b, w0=w0, lam=lam
    )


@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("form", ["optax", "update_fn"])
def test_isotropic_linear_dynamics_equal_reverse_mode(x64, T, form):
    q = quadratic_problem(T)
    inner = (
        {"inner_optimizer": optax.sgd(q["eta"])} if form == "optax" else {"update_fn": q["update"]}
    )
    exact = reverse_hypergradient(q["w0"], q["lam"], q["b"], None, q["train"], q["val"], **inner)

    def greedy(gamma):
        opt = GreedyOptimizer(outer_optimizer=optax.sgd(1.0), unroll_steps=T, gamma=gamma, **inner)
        state = opt.init(q["w0"], q["lam"])
        return opt.compute_hypergradient(state, Stacked(q["b"]), None, q["train"], q["val"])

    assert rel_err(greedy(q["gamma"]), exact) <= 1e-12
    if T > 1:  # the identity needs γ = 1 - ηk: another γ is measurably off
        assert rel_err(greedy(0.9), exact) > 1e-2


def greedy_toy_closed_form(w0, lam, T, gamma):
    """Identity 10 by hand: ``w_t = A w_{t-1} + B λ``, ``α_t = 2w_t + 10 sin 2w_t``,
    ``ĝ = Σ_t γ^{T-t} α_t B``."""
    A, B = np.array([0.9, 0.95]), np.array([0.1, 0.05])
    w, g = np.asarray(w0, float), np.zeros(2)
    for t in range(1, T + 1):
        w = A * w + B * np.asarray(lam)
        alpha_t = 2 * w + 10 * np.sin(2 * w)
        g += gamma ** (T - t) * alpha_t * B
    return g


TOY_G = jnp.array([1.0, 0.5])


def toy_train(w, lam, _):
    return 0.5 * jnp.sum(TOY_G * (w - lam) ** 2)


def toy_val(w, lam, _):
    return jnp.sum(w**2) + 10 * jnp.sum(jnp.sin(w) ** 2)


def toy_greedy(w0, lam, T, gamma):
    opt = GreedyOptimizer(optax.sgd(0.1), optax.sgd(1.0), unroll_steps=T, gamma=gamma)
    return opt.compute_hypergradient(opt.init(w0, lam), None, None, toy_train, toy_val)


@pytest.mark.parametrize("T", [5, 10])
def test_greedy_toy_closed_form(x64, T):
    w0, lam = jnp.array([0.3, -0.2]), jnp.array([1.0, -0.5])
    for gamma in (0.9, 0.5):
        g = toy_greedy(w0, lam, T, gamma)
        np.testing.assert_allclose(g, greedy_toy_closed_form(w0, lam, T, gamma), rtol=1e-12)
    exact = reverse_hypergradient(
        w0, lam, jnp.zeros((T, 1)), None, toy_train, toy_val, inner_optimizer=optax.sgd(0.1)
    )
    assert rel_err(g, exact) > 1e-2  # Greedy is not the exact hypergradient here


@settings(max_examples=10, deadline=None)
@given(gamma=st.floats(1e-3, 1.0), T=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_greedy_toy_closed_form_for_any_gamma_and_horizon(gamma, T, seed):
    with jax.enable_x64(True):
        w0, lam = np.random.default_rng(seed).normal(size=(2, 2))
        g = toy_greedy(jnp.asarray(w0), jnp.asarray(lam), T, gamma)
        np.testing.assert_allclose(
            g, greedy_toy_closed_form(w0, lam, T, gamma), rtol=1e-11, atol=1e-13
        )


# -- batches ---------------------------------------------------------------------------------


def hand_written_greedy(params, lam, batches, val_batches, T, gamma):
    """The Greedy hypergradient by a Python loop over the stacked batches, optax directly."""
    w, s = params, inner_factory(lam).init(params)
    G = jax.tree.map(jnp.zeros_like, lam)
    for t in range(T):
        D_t, V_t = at(batches, t), at(val_batches, t)

        def phi(h, w=w, s=s, D_t=D_t):
            u, s_new = inner_factory(h).update(jax.grad(train_loss)(w, h, D_t), s, w)
            return optax.apply_updates(w, u), s_new

        w_t, vjp_B, s_t = jax.vjp(phi, lam, has_aux=True)
        alpha_t = jax.grad(val_loss)(w_t, lam, V_t)
        G = jax.tree.map(lambda G, aB: gamma * G + aB, G, vjp_B(alpha_t)[0])
        last_train_loss, w, s = train_loss(w, lam, D_t), w_t, s_t
    g = jax.tree.map(jnp.add, jax.grad(val_loss, argnums=1)(w, lam, V_t), G)
    return g, w, s, last_train_loss, val_loss(w, lam, V_t)


def test_stacked_batches_match_hand_written_loop(x64):
    T, gamma = 4, 0.7
    _, _, batches, val_batches = data(T, seed=3)
    outer = optax.adam(0.05)
    opt = GreedyOptimizer(inner_factory, outer, unroll_steps=T, gamma=gamma)
    state = opt.init(logreg_init(), hyper0())
    g, w, s, train_l, val_l = hand_written_greedy(
        state.params, state.hyperparams, batches, val_batches, T, gamma
    )
    args = (Stacked(batches), Stacked(val_batches), train_loss, val_loss)
    assert_tree_close(opt.compute_hypergradient(state, *args), g)
    new = opt.step(state, *args)
    updates, outer_state = outer.update(g, outer.init(state.hyperparams), state.hyperparams)
    assert_tree_close(new.hyperparams, optax.apply_updates(state.hyperparams, updates))
    assert_tree_close(new.outer_opt_state, outer_state)
    assert_tree_close((new.params, new.inner_opt_state), (w, s))
    assert int(new.step) == T
    md = new.metadata
    np.testing.assert_allclose(md["train_loss"], train_l, rtol=1e-12)
    np.testing.assert_allclose(md["val_loss"], val_l, rtol=1e-12)
    np.testing.assert_allclose(md["hypergrad_norm"], tree_norm(g), rtol=1e-12)
    assert int(md["skipped_inner_updates"]) == int(md["skipped_hyper_updates"]) == 0


def test_single_batch_is_reused_even_when_its_leading_axis_equals_the_horizon(x64):
    T = 6
    train, val = logreg_data(n=T, seed=2)  # a batch of exactly T examples: ambiguous by shape
    opt = GreedyOptimizer(inner_factory, optax.sgd(0.1), unroll_steps=T, gamma=0.8)
    state = opt.init(logreg_init(), hyper0())
    repeat = lambda b: jax.tree.map(lambda x: jnp.stack([x] * T), b)  # noqa: E731
    single = opt.step(state, train, val, train_loss, val_loss)
    assert_tree_close(single, opt.step(state, Stacked(repeat(train)), val, train_loss, val_loss))
    assert_tree_close(
        single, opt.step(state, Stacked([train] * T), Stacked(repeat(val)), train_loss, val_loss)
    )
    # Only the Stacked marker makes the T examples T one-example batches.
    per_row = opt.compute_hypergradient(state, Stacked(train), val, train_loss, val_loss)
    reused = opt.compute_hypergradient(state, train, val, train_loss, val_loss)
    assert rel_err(per_row, reused) > 1e-3


def test_wrong_number_of_stacked_batches_is_an_error(x64):
    T = 4
    train, val, batches, val_batches = data(T + 1)
    opt = GreedyOptimizer(inner_factory, optax.sgd(0.1), unroll_steps=T)
    state = opt.init(logreg_init(), hyper0())
    with pytest.raises(
        ValueError, match=r"train_batch is Stacked .* length 5, but unroll_steps = 4"
    ):
        opt.step(state, Stacked(batches), val, train_loss, val_loss)
    with pytest.raises(ValueError, match=r"val_batch is Stacked .* length 5"):
        opt.compute_hypergradient(state, train, Stacked(val_batches), train_loss, val_loss)
    with pytest.raises(ValueError, match="leading"):
        Stacked({"x": jnp.zeros((4, 2)), "y": jnp.zeros(3)})


# -- construction ----------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.9"])
def test_gamma_out_of_range_is_an_error(gamma):
    with pytest.raises(ValueError, match=r"gamma must be a number in \(0, 1\]"):
        GreedyOptimizer(optax.sgd(0.1), optax.sgd(0.1), gamma=gamma)


@pytest.mark.parametrize("T", [0, -2, 2.5, True, None])
def test_bad_horizon_is_an_error(T):
    with pytest.raises(ValueError, match="unroll_steps must be an int >= 1"):
        GreedyOptimizer(optax.sgd(0.1), optax.sgd(0.1), unroll_steps=T)


def test_missing_optimizers_are_errors():
    with pytest.raises(ValueError, match="needs an outer_optimizer"):
        GreedyOptimizer(optax.sgd(0.1))
    with pytest.raises(ValueError, match="inner_optimizer"):
        GreedyOptimizer(outer_optimizer=optax.sgd(0.1))
    with pytest.raises(TypeError, match="outer_optimizer must be an optax"):
        GreedyOptimizer(optax.sgd(0.1), 0.1)
    opt = GreedyOptimizer(optax.sgd(0.1), optax.sgd(0.1), unroll_steps=np.int64(3), gamma=1)
    assert (opt.unroll_steps, opt.gamma) == (3, 1.0)
    with pytest.raises(ValueError, match="takes no lr_hyper"):  # the outer optimizer sets it
        opt.step(opt.init(jnp.zeros(2), jnp.zeros(2)), None, None, train_loss, val_loss, 0.1)


# -- non-finite values -----------------------------------------------------------------------


@pytest.mark.parametrize("inner", [inner_factory, optax.sgd(0.3)], ids=["momentum", "sgd"])
def test_non_finite_mid_horizon_reverts_the_whole_outer_step(inner):
    T = 5
    _, val, batches, val_batches = data(T)
    opt = GreedyOptimizer(inner, optax.adam(0.1), unroll_steps=T, gamma=0.9)
    state = opt.init(logreg_init(), hyper0())
    state = opt.step(state, Stacked(batches), val, train_loss, val_loss)
    poisoned = jax.tree.map(lambda x: x.at[2].set(jnp.nan), batches)
    bad = opt.step(state, Stacked(poisoned), val, train_loss, val_loss)
    for field in ("params", "inner_opt_state", "hyperparams", "outer_opt_state"):
        assert_tree_close(getattr(bad, field), getattr(state, field), rtol=0, atol=0)
    assert (int(bad.metadata["skipped_inner_updates"]), int(bad.step)) == (1, 2 * T)
    assert int(bad.metadata["skipped_hyper_updates"]) == 1
    # A non-finite validation value mid-horizon spoils the hypergradient: the finite new
    # weights are not committed without it either (the step is all or nothing).
    poisoned_val = jax.tree.map(lambda x: x.at[1].set(jnp.inf), val_batches)
    worse = opt.step(bad, Stacked(batches), Stacked(poisoned_val), train_loss, val_loss)
    for field in ("params", "inner_opt_state", "hyperparams", "outer_opt_state"):
        assert_tree_close(getattr(worse, field), getattr(bad, field), rtol=0, atol=0)
    assert int(worse.metadata["skipped_hyper_updates"]) == 2
    assert int(worse.metadata["consecutive_skips"]) == 2
    assert int(worse.metadata["skipped_inner_updates"]) == 1


# -- program size and compilation ------------------------------------------------------------


def count_eqns(jaxpr):
    """Equations of ``jaxpr`` and, recursively, of every jaxpr nested in its equations."""
    return sum(1 + sum(count_eqns(j) for j in jaxprs_in_params(e.params)) for e in jaxpr.eqns)


def scan_lengths(jaxpr):
    found = [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"]
    return found + [
        n for e in jaxpr.eqns for j in jaxprs_in_params(e.params) for n in scan_lengths(j)
    ]


@pytest.mark.parametrize("stacked", [False, True])
def test_program_size_does_not_grow_with_the_horizon(stacked):
    train, val, _, _ = data(1)
    eqns, lowered = {}, {}
    for T in (1, 50):
        opt = GreedyOptimizer(inner_factory, optax.adam(0.1), unroll_steps=T, gamma=0.9)
        state = opt.init(logreg_init(), hyper0())
        batch = Stacked(train_batches(train, T)) if stacked else train
        step = lambda s, b, opt=opt: opt.step(s, b, val, train_loss, val_loss)  # noqa: E731
        closed = jax.make_jaxpr(step)(state, batch)
        eqns[T] = count_eqns(closed.jaxpr)
        assert T in scan_lengths(closed.jaxpr)
        # The lowered program too: the scan is not unrolled when lowered.
        lowered[T] = len(jax.jit(step).lower(state, batch).as_text())
    assert eqns[1] == eqns[50] > 50
    assert abs(lowered[50] - lowered[1]) < 0.01 * lowered[1]


def test_fifty_step_horizon_compiles_once():
    T = 50
    train, val = logreg_data()
    opt = GreedyOptimizer(inner_factory, optax.adam(0.1), unroll_steps=T, gamma=0.9)
    state = opt.init(logreg_init(), hyper0())
    state = opt.step(state, Stacked(train_batches(train, T, seed=0)), val, train_loss, val_loss)
    batches = [Stacked(train_batches(train, T, seed=i)) for i in range(1, 4)]
    with count_compilations() as compiled:
        for b in batches:
            state = opt.step(state, b, val, train_loss, val_loss)
    assert compiled.count == 0
    assert int(state.step) == 4 * T
    assert int(state.metadata["skipped_inner_updates"]) == 0


def test_step_is_apply_of_estimate_and_run_refuses_hyper_update_every():
    from gradhpo.training import run

    T = 3
    _, val, batches, _ = data(T)
    opt = GreedyOptimizer(inner_factory, optax.sgd(0.1), unroll_steps=T)
    state = opt.init(logreg_init(), hyper0())
    args = (Stacked(batches), val, train_loss, val_loss)
    by_hand = jax.jit(lambda s, w: opt.apply(s, opt.estimate(s, w, *args[1:]), None))
    assert_tree_close(by_hand(state, args[0]), opt.step(state, *args), rtol=0, atol=0)
    with pytest.raises(ValueError, match="hyper_update_every=2 conflicts with GreedyOptimizer"):
        run(
            opt,
            state,
            at(batches, 0),
            val,
            train_loss,
            val_loss,
            episode_length=2,
            hyper_update_every=2,
        )
