"""The contract every optimizer passes (optax's ``alias_test`` pattern): one list, one suite.

A new estimator joins by one line in ``OPTIMIZERS``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import l2_train_loss, logistic_loss, logreg_data, logreg_init, train_batches

import gradhpo
from gradhpo import Stacked, WindowOptimizer
from gradhpo.utils import count_compilations

LR = 0.1
T = 3  # the window optimizers' unroll_steps


def val_loss(w, lam, batch):  # λ enters L_val a little, so that FO is not zero
    return logistic_loss(w, batch) + 1e-3 * jnp.sum(lam**2)


def scaled_val_loss(w, lam, batch):
    return 3.0 * val_loss(w, lam, batch)


#: name -> factory of the optimizer under test (window optimizers: outer SGD of step LR).
OPTIMIZERS = {
    "fo": lambda: gradhpo.FOOptimizer(optax.sgd(0.3)),
    "one-step": lambda: gradhpo.OneStepOptimizer(optax.sgd(0.3, momentum=0.5)),
    "t1t2": lambda: gradhpo.T1T2Optimizer(optax.sgd(0.3)),
    "hyperdistill": lambda: gradhpo.OnlineHypergradientOptimizer(
        optax.sgd(0.3, momentum=0.5), gamma=0.9, T=4
    ),
    "greedy": lambda: gradhpo.GreedyOptimizer(
        optax.sgd(0.3), optax.sgd(LR), unroll_steps=T, gamma=0.8
    ),
    "reverse": lambda: gradhpo.ReverseModeOptimizer(
        optax.sgd(0.3, momentum=0.5), optax.sgd(LR), unroll_steps=T, checkpoint="binomial"
    ),
    "truncated": lambda: gradhpo.TruncatedReverseOptimizer(
        optax.sgd(0.3, momentum=0.5), optax.sgd(LR), unroll_steps=T, truncation=2
    ),
    "drmad": lambda: gradhpo.DrMADOptimizer(
        optax.sgd(0.3, momentum=0.5), optax.sgd(LR), unroll_steps=T
    ),
    "forward": lambda: gradhpo.ForwardModeOptimizer(
        optax.sgd(0.3, momentum=0.5), optax.sgd(LR), unroll_steps=T
    ),
    "implicit": lambda: gradhpo.ImplicitOptimizer(
        optax.sgd(0.3), optax.sgd(LR), unroll_steps=T, solver_steps=5
    ),
}

names = pytest.mark.parametrize("name", sorted(OPTIMIZERS))


def setup(name):
    train, val = logreg_data()
    opt = OPTIMIZERS[name]()
    state = opt.init(logreg_init(), jnp.full(5, -1.0))
    return opt, state, train, val


def step(opt, state, train, val, vl=val_loss, lr=LR):
    if isinstance(opt, WindowOptimizer):
        return opt.step(state, train, val, l2_train_loss, vl)
    return opt.step(state, train, val, l2_train_loss, vl, lr)


def assert_close(a, b, rtol=1e-12, atol=1e-14):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@names
def test_compiles_once_while_lr_hyper_changes(name):
    opt, state, train, val = setup(name)
    state = step(opt, state, train, val)
    with count_compilations() as counter:
        for n in range(5):
            state = step(opt, state, train, val, lr=LR / (n + 1))
        jax.block_until_ready(state)
    assert counter.count == 0


@names
def test_compute_hypergradient_is_the_applied_update(x64, name):
    opt, state, train, val = setup(name)
    state = step(opt, state, train, val)  # away from the start
    g = opt.compute_hypergradient(state, train, val, l2_train_loss, val_loss)
    new = step(opt, state, train, val)
    expected = jax.tree.map(lambda h, gi: h - LR * gi, state.hyperparams, g)
    assert_close(new.hyperparams, expected)
    assert float(jnp.linalg.norm(g)) > 0


@names
def test_non_finite_updates_are_skipped_and_counted(x64, name):
    opt, state, train, val = setup(name)
    state = step(opt, state, train, val)
    bad = {**train, "x": train["x"].at[0, 0].set(jnp.nan)}
    new = step(opt, state, bad, val)
    md = new.metadata
    assert (int(md["skipped_inner_updates"]), int(md["skipped_hyper_updates"])) == (1, 1)
    assert int(md["consecutive_skips"]) == 1
    # Nothing of the step is committed: weights, λ, both optimizer states, the algorithm's
    # own state (HyperDistill's w*, S_t) and the episode counter stay as they were, even
    # where the hypergradient itself is finite (FO's ∂L_val/∂λ does not see the batch).
    for field in ("params", "hyperparams", "inner_opt_state", "outer_opt_state"):
        assert_close(getattr(new, field), getattr(state, field), rtol=0, atol=0)
    for key in set(state.metadata) - {"train_loss", "val_loss", "hypergrad_norm"}:
        if key not in ("skipped_inner_updates", "skipped_hyper_updates", "consecutive_skips"):
            assert_close(new.metadata[key], state.metadata[key], rtol=0, atol=0)
    # The run goes on from there as if the bad batch had never come.
    after = step(opt, new, train, val)
    assert int(after.metadata["consecutive_skips"]) == 0
    expected = step(opt, state, train, val)
    for field in ("params", "hyperparams", "inner_opt_state", "outer_opt_state"):
        assert_close(getattr(after, field), getattr(expected, field), rtol=0, atol=0)


@names
def test_vmap_of_step_equals_single_steps(x64, name):
    opt, _, train, val = setup(name)
    lams = jnp.stack([jnp.full(5, v) for v in (-2.0, 0.0, 1.0)])
    states = jax.vmap(lambda lam: opt.init(logreg_init(), lam))(lams)
    batched = jax.vmap(lambda s: step(opt, s, train, val))(states)
    for i in range(3):
        single = step(opt, opt.init(logreg_init(), lams[i]), train, val)
        assert_close(jax.tree.map(lambda x, i=i: x[i], batched), single, rtol=1e-10, atol=1e-12)


@names
def test_immutable_optimizer_and_state(name):
    opt, state, train, val = setup(name)
    before = jax.tree.map(np.array, state)
    step(opt, state, train, val)
    assert_close(state, before, rtol=0, atol=0)
    with pytest.raises(AttributeError, match="immutable"):
        opt.inner = None
    with pytest.raises(AttributeError, match="immutable"):
        state.step = 3


@names
def test_scale_identity(x64, name):
    opt, state, train, val = setup(name)
    state = step(opt, state, train, val)
    g = opt.compute_hypergradient(state, train, val, l2_train_loss, val_loss)
    g3 = opt.compute_hypergradient(state, train, val, l2_train_loss, scaled_val_loss)
    assert_close(g3, jax.tree.map(lambda x: 3.0 * x, g), rtol=1e-9, atol=1e-12)


@names
def test_window_of_k_is_k_minus_1_inner_steps_then_step(x64, name):
    opt, state, train, val = setup(name)
    state = step(opt, state, train, val)
    batches = train_batches(train, T, seed=1)
    if isinstance(opt, WindowOptimizer):
        # A window optimizer's window is its unroll: one batch reused = Stacked.repeat.
        one = jax.tree.map(lambda a: a[0], batches)
        assert_close(
            opt.step(state, one, val, l2_train_loss, val_loss),
            opt.step(state, Stacked.repeat(one, T), val, l2_train_loss, val_loss),
        )
        return
    by_hand = state
    for t in range(T - 1):
        by_hand = opt.inner_step(by_hand, jax.tree.map(lambda a, t=t: a[t], batches), l2_train_loss)
    last = jax.tree.map(lambda a: a[T - 1], batches)
    by_hand = opt.step(by_hand, last, val, l2_train_loss, val_loss, LR)
    windowed = opt.step(state, Stacked(batches), val, l2_train_loss, val_loss, LR)
    assert_close(windowed, by_hand)
    estimate = opt.estimate(state, Stacked(batches), val, l2_train_loss, val_loss)
    assert_close(
        estimate.hypergrad,
        opt.compute_hypergradient(
            by_hand_prev(opt, state, batches), last, val, l2_train_loss, val_loss
        ),
    )


def by_hand_prev(opt, state, batches):
    for t in range(T - 1):
        state = opt.inner_step(state, jax.tree.map(lambda a, t=t: a[t], batches), l2_train_loss)
    return state


def test_every_optimizer_of_the_package_is_under_test():
    classes = {type(factory()) for factory in OPTIMIZERS.values()}
    exported = {
        obj
        for obj in vars(gradhpo).values()
        if isinstance(obj, type)
        and issubclass(obj, gradhpo.BilevelOptimizer)
        and not getattr(obj, "__abstractmethods__", None)
    }
    assert exported <= classes, exported - classes


@names
@pytest.mark.parametrize("source", ["iterator", "sampler"])
def test_run_equals_a_hand_written_loop_of_steps(x64, name, source):
    from gradhpo.training import minibatches, programs, run

    opt, state0, train, val = setup(name)
    sampler = minibatches(train, 10)
    key = jax.random.PRNGKey(3)
    episodes, length = 2, 3
    window = opt.unroll_steps if isinstance(opt, WindowOptimizer) else 1
    batches, state = [], state0
    for e in range(episodes):  # run's documented key stream: one key per step call
        k_refit, k_run = programs.episode_keys(key, e)
        if opt.refit is not None and e % opt.refit.every == 0:  # HyperDistill's θ
            refit_keys = jax.random.split(jax.random.split(k_refit)[0], opt.refit.num_batches)
            refit_batches = [sampler(k) for k in refit_keys]
            batches.extend(refit_batches)
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *refit_batches)
            state = opt.refit.fn(state, stacked, val, l2_train_loss, val_loss)
        for key_t in jax.random.split(k_run, length):
            k_train = jax.random.split(key_t)[0]
            if window == 1:
                batch = sampler(k_train)
                batches.append(batch)
            else:
                step_keys = jax.random.split(k_train, window)
                batches.extend(sampler(k) for k in step_keys)
                batch = Stacked(jax.vmap(sampler)(step_keys))
            state = step(opt, state, batch, val)
    data = iter(batches) if source == "iterator" else sampler
    lr = None if isinstance(opt, WindowOptimizer) else LR
    refit = {"num_episodes": episodes, "episode_length": length, "lr_hyper": lr, "key": key}
    out = run(opt, state0, data, val, l2_train_loss, val_loss, progress=False, **refit)
    if source == "iterator":
        for x, y in zip(jax.tree.leaves(out.state), jax.tree.leaves(state), strict=True):
            np.testing.assert_array_equal(x, y)
    else:
        assert_close(out.state, state, rtol=1e-12, atol=1e-14)


@names
def test_signature_and_repr_show_the_settings(name):
    import inspect

    opt = OPTIMIZERS[name]()
    cls = type(opt)
    parameters = inspect.signature(cls).parameters
    assert "inner_optimizer" in parameters and "args" not in parameters
    text = repr(opt)
    assert text.startswith(f"{cls.__name__}(inner_optimizer=<optax transformation>")
    if isinstance(opt, WindowOptimizer):
        assert f"unroll_steps={T}" in text
