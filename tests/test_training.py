"""Training loops: equal to hand-written step loops, compile once, Reptile, populations."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import l2_train_loss, l2_val_loss, logreg_data, logreg_init

from gradhpo import OneStepOptimizer
from gradhpo.training import fixed_batch, minibatches, programs, run, run_population
from gradhpo.training import loop as loop_module
from gradhpo.utils import count_compilations


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def make_opt():
    return OneStepOptimizer(inner_optimizer=optax.sgd(0.3, momentum=0.5))


def hand_loop(
    opt, state, train_sampler, val_batch, key, episodes, length, lr_of, k=1, lr_reptile=None
):
    """The reference: a Python loop of opt.step / opt.inner_step on the same batches."""
    phi = state.params
    for e in range(episodes):
        _, k_run = programs.episode_keys(key, e)
        if lr_reptile is not None:
            state = opt.new_episode(state, phi)
        for key_t in jax.random.split(k_run, length):
            k_train, _ = jax.random.split(key_t)
            call = int(state.step)
            batch = train_sampler(k_train)
            if (call + 1) % k == 0:
                state = opt.step(
                    state, batch, val_batch, l2_train_loss, l2_val_loss, lr_of(call // k)
                )
            else:
                state = opt.inner_step(state, batch, l2_train_loss)
        if lr_reptile is not None:
            phi = programs.reptile(phi, state.params, lr_reptile)
    return state, phi


@pytest.mark.parametrize("k", [1, 3])
def test_scan_run_equals_hand_written_loop(x64, k):
    train, val = logreg_data()
    opt = make_opt()
    sampler = minibatches(train, 10)
    state0 = opt.init(logreg_init(), jnp.full(5, -1.0))
    key = jax.random.PRNGKey(3)
    schedule = optax.exponential_decay(0.2, 5, 0.5)
    out = run(
        opt,
        state0,
        sampler,
        val,
        l2_train_loss,
        l2_val_loss,
        num_episodes=3,
        episode_length=6,
        lr_hyper=schedule,
        hyper_update_every=k,
        key=key,
        progress=False,
    )
    ref, _ = hand_loop(opt, state0, sampler, val, key, 3, 6, schedule, k=k)
    # The scan body is compiled as one program; agreement is to round-off in float64.
    for x, y in zip(jax.tree.leaves(out.state), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-13, atol=1e-15)
    assert int(out.state.step) == 18
    assert out.history["val_loss"].shape == (3, 6 // k)  # one record per hyper-update
    np.testing.assert_array_equal(out.history["hyper_update"].sum(), 18 // k)


def test_host_run_equals_hand_written_loop_bitwise(x64):
    train, val = logreg_data(seed=1)
    opt = make_opt()
    sampler = minibatches(train, 10)
    key = jax.random.PRNGKey(4)
    # A Python callable fed the same batches the hand loop sees.
    batches = []
    for e in range(2):
        _, k_run = programs.episode_keys(key, e)
        for key_t in jax.random.split(k_run, 5):
            batches.append(sampler(jax.random.split(key_t)[0]))
    feed = iter(batches)
    state0 = opt.init(logreg_init(), jnp.full(5, -1.0))
    out = run(
        opt,
        state0,
        feed,
        val,
        l2_train_loss,
        l2_val_loss,
        num_episodes=2,
        episode_length=5,
        lr_hyper=0.1,
        key=key,
        lr_reptile=0.5,
        progress=False,
    )
    ref, phi = hand_loop(opt, state0, sampler, val, key, 2, 5, lambda n: 0.1, lr_reptile=0.5)
    assert_trees_equal(out.state, ref)
    assert_trees_equal(out.meta_params, phi)


def test_reptile_one_makes_phi_the_last_weights():
    train, val = logreg_data(seed=2)
    opt = make_opt()
    out = run(
        opt,
        opt.init(logreg_init(), jnp.zeros(5)),
        minibatches(train, 10),
        val,
        l2_train_loss,
        l2_val_loss,
        num_episodes=3,
        episode_length=4,
        lr_hyper=0.1,
        lr_reptile=1.0,
        progress=False,
    )
    assert_trees_equal(out.meta_params, out.state.params)
    fixed = run(
        opt,
        opt.init(logreg_init(), jnp.zeros(5)),
        minibatches(train, 10),
        val,
        l2_train_loss,
        l2_val_loss,
        num_episodes=3,
        episode_length=4,
        lr_hyper=0.1,
        lr_reptile=0.0,
        progress=False,
    )
    assert_trees_equal(fixed.meta_params, logreg_init())  # restarts from a fixed φ
    assert not np.allclose(fixed.state.params["w"], logreg_init()["w"])


def test_twenty_episodes_with_decaying_lr_compile_each_program_once():
    train, val = logreg_data(seed=3)
    opt = make_opt()
    state = opt.init(logreg_init(), jnp.zeros(5))
    sampler = minibatches(train, 10)
    schedule = optax.exponential_decay(0.5, 10, 0.9)
    kwargs = dict(
        num_episodes=20, episode_length=5, lr_hyper=schedule, lr_reptile=1.0, progress=False
    )
    with count_compilations() as counter:
        out = run(opt, state, sampler, val, l2_train_loss, l2_val_loss, **kwargs)
        jax.block_until_ready(out)
    # The episode program, plus the small programs that stack the history and split keys.
    first = counter.count
    with count_compilations() as counter:
        out = run(opt, out.state, sampler, val, l2_train_loss, l2_val_loss, **kwargs)
        jax.block_until_ready(out)
    assert counter.count == 0, "a second run recompiled something"
    assert first <= 12, first


def test_episode_program_compiles_once_across_episodes():
    train, val = logreg_data(seed=3)
    opt = make_opt()
    sampler = minibatches(train, 10)
    schedule = optax.exponential_decay(0.5, 10, 0.9)
    traces = []
    original = programs.episode_scan

    def counting(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    jitted = programs.jit_episode
    programs.jit_episode = jax.jit(counting, static_argnums=(0, 1, 2, 3))
    try:
        run(
            opt,
            opt.init(logreg_init(), jnp.zeros(5)),
            sampler,
            val,
            l2_train_loss,
            l2_val_loss,
            num_episodes=20,
            episode_length=5,
            lr_hyper=schedule,
            progress=False,
        )
    finally:
        programs.jit_episode = jitted
    assert len(traces) == 1


@pytest.mark.parametrize("x64_mode", [False, True], ids=["float32", "float64"])
def test_population_equals_sequential_runs(x64_mode):
    with jax.enable_x64(x64_mode):
        _population_equals_sequential_runs(rtol=1e-13 if x64_mode else 2e-5)


def _population_equals_sequential_runs(rtol):
    train, val = logreg_data(seed=4)
    opt = make_opt()
    sampler = minibatches(train, 10)
    lams = jnp.stack([jnp.full(5, v) for v in (-2.0, -1.0, 0.0, 1.0)])
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    states = jax.vmap(lambda lam: opt.init(logreg_init(), lam))(lams)
    kwargs = dict(num_episodes=2, episode_length=5, lr_hyper=0.1, lr_reptile=0.5, progress=False)
    pop = run_population(opt, states, sampler, val, l2_train_loss, l2_val_loss, keys=keys, **kwargs)
    assert pop.history["val_loss"].shape == (4, 2, 5)
    for i in range(4):
        single = run(
            opt,
            opt.init(logreg_init(), lams[i]),
            sampler,
            val,
            l2_train_loss,
            l2_val_loss,
            key=keys[i],
            **kwargs,
        )
        member = jax.tree.map(lambda x, i=i: x[i], pop.state)
        for x, y in zip(jax.tree.leaves(member), jax.tree.leaves(single.state), strict=True):
            np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol / 20)
        np.testing.assert_allclose(
            pop.history["val_loss"][i], single.history["val_loss"], rtol=rtol
        )


def test_population_needs_jittable_data():
    train, val = logreg_data(seed=4)
    opt = make_opt()
    states = jax.vmap(lambda lam: opt.init(logreg_init(), lam))(jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match="run_population needs jittable data"):
        run_population(
            opt,
            states,
            lambda: train,
            val,
            l2_train_loss,
            l2_val_loss,
            keys=jax.random.split(jax.random.PRNGKey(0), 2),
            episode_length=2,
            lr_hyper=0.1,
        )


def test_bad_run_arguments():
    train, val = logreg_data()
    opt = make_opt()
    state = opt.init(logreg_init(), jnp.zeros(5))
    common = (state, train, val, l2_train_loss, l2_val_loss)
    with pytest.raises(ValueError, match="episode_length is required"):
        run(opt, *common, lr_hyper=0.1)
    with pytest.raises(ValueError, match="num_episodes must be an int >= 1"):
        run(opt, *common, num_episodes=0, episode_length=2, lr_hyper=0.1)
    with pytest.raises(ValueError, match="hyper_update_every must be an int >= 1"):
        run(opt, *common, episode_length=2, lr_hyper=0.1, hyper_update_every=0)
    with pytest.raises(ValueError, match="lr_hyper is required"):
        run(opt, *common, episode_length=2)
    with pytest.raises(ValueError, match=r"lr_reptile must be None or in \[0, 1\]"):
        run(opt, *common, episode_length=2, lr_hyper=0.1, lr_reptile=2.0)
    with_outer = OneStepOptimizer(inner_optimizer=optax.sgd(0.1), outer_optimizer=optax.adam(0.1))
    with pytest.raises(ValueError, match="lr_hyper must be None"):
        run(
            with_outer,
            with_outer.init(logreg_init(), jnp.zeros(5)),
            train,
            val,
            l2_train_loss,
            l2_val_loss,
            episode_length=2,
            lr_hyper=0.1,
        )


def test_iterator_that_runs_out_returns_the_complete_episodes(caplog):
    from gradhpo.training.data import DataExhaustedError

    train, val = logreg_data()
    opt = make_opt()
    state = opt.init(logreg_init(), jnp.zeros(5))
    kwargs = dict(episode_length=2, lr_hyper=0.1, progress=False)
    args = (val, l2_train_loss, l2_val_loss)
    with caplog.at_level("WARNING", logger="gradhpo"):
        out = run(opt, state, iter([train] * 5), *args, num_episodes=3, **kwargs)
    assert "train_data ran out of batches" in caplog.text
    assert out.stopped == "data_exhausted" and out.episode == 2
    full = run(opt, state, iter([train] * 4), *args, num_episodes=2, **kwargs)
    assert full.stopped is None and full.episode == 2
    assert_trees_equal(out.state, full.state)  # the episode in progress is dropped
    assert out.history["val_loss"].shape == (2, 2)
    with pytest.raises(DataExhaustedError, match="train_data ran out of batches") as info:
        run(opt, state, iter([train] * 3), *args, num_episodes=3, strict=True, **kwargs)
    assert info.value.result.episode == 1


def test_progress_bar_is_off_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    from gradhpo.training.progress import progress_enabled

    assert progress_enabled(None) is False
    assert progress_enabled(True) is True
    monkeypatch.setenv("CI", "on")  # the benches and the library share one policy
    assert progress_enabled(None) is False
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress_enabled(None) is True


def test_callback_and_history():
    train, val = logreg_data()
    opt = make_opt()
    seen = []
    out = run(
        opt,
        opt.init(logreg_init(), jnp.zeros(5)),
        train,
        val,
        l2_train_loss,
        l2_val_loss,
        num_episodes=3,
        episode_length=4,
        lr_hyper=0.1,
        progress=False,
        callback=lambda e, s, rec: seen.append((e, int(s.step), rec["val_loss"].shape)),
    )
    assert seen == [(0, 4, (4,)), (1, 8, (4,)), (2, 12, (4,))]
    assert out.history["hyperparams"].shape == (3, 5)
    np.testing.assert_allclose(out.history["hyperparams"][-1], out.state.hyperparams)
    np.testing.assert_allclose(
        out.history["hyper_mean"][-1, -1], jnp.mean(out.state.hyperparams), rtol=1e-6
    )


SHARDED = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    import sys; sys.path.insert(0, "tests")
    from problems import logreg_data, logreg_init, l2_train_loss, l2_val_loss
    from gradhpo import OneStepOptimizer
    from gradhpo.training import run, minibatches
    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
    shard = lambda t: jax.tree.map(
        lambda a: jax.device_put(a, NamedSharding(mesh, P("batch"))), t)
    train, val = logreg_data(n=64)
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.3, momentum=0.5))
    s0 = opt.init(logreg_init(), jnp.zeros(5))
    a = b = s0
    for _ in range(5):
        a = opt.step(a, train, val, l2_train_loss, l2_val_loss, 0.1)
        b = opt.step(b, shard(train), shard(val), l2_train_loss, l2_val_loss, 0.1)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    kw = dict(num_episodes=4, episode_length=10, lr_hyper=0.1, lr_reptile=1.0, progress=False)
    ra = run(opt, s0, minibatches(train, 32), val, l2_train_loss, l2_val_loss, **kw)
    rb = run(opt, s0, minibatches(shard(train), 32), shard(val), l2_train_loss, l2_val_loss,
             **kw)
    for x, y in zip(jax.tree.leaves(ra.state), jax.tree.leaves(rb.state)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    print("SHARDED-OK")
    """
)


def test_sharded_inputs_give_the_same_results():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "SHARDED-OK" in proc.stdout, proc.stderr[-3000:]


def test_greedy_run_equals_hand_written_loop(x64):
    from gradhpo import GreedyOptimizer, Stacked

    train, val = logreg_data(seed=6)
    opt = GreedyOptimizer(optax.sgd(0.3, momentum=0.5), optax.adam(0.05), unroll_steps=3, gamma=0.8)
    sampler = minibatches(train, 10)
    key = jax.random.PRNGKey(7)
    state0 = opt.init(logreg_init(), jnp.full(5, -1.0))
    out = run(
        opt,
        state0,
        sampler,
        val,
        l2_train_loss,
        l2_val_loss,
        num_episodes=2,
        episode_length=4,
        key=key,
        progress=False,
    )
    state = state0
    for e in range(2):
        _, k_run = programs.episode_keys(key, e)
        for key_t in jax.random.split(k_run, 4):
            k_train, _ = jax.random.split(key_t)
            batches = jax.vmap(sampler)(jax.random.split(k_train, 3))
            state = opt.step(state, Stacked(batches), val, l2_train_loss, l2_val_loss)
    assert int(out.state.step) == 24
    for x, y in zip(jax.tree.leaves(out.state), jax.tree.leaves(state), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(out.history["hyper_update"], np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="conflicts with GreedyOptimizer"):
        run(
            opt,
            state0,
            sampler,
            val,
            l2_train_loss,
            l2_val_loss,
            episode_length=4,
            hyper_update_every=2,
        )


def test_hyperdistill_theta_is_estimated_every_period_episodes():
    from gradhpo import OnlineHypergradientOptimizer

    train, val = logreg_data(seed=8)
    opt = OnlineHypergradientOptimizer(optax.sgd(0.3), gamma=0.9, estimation_period=2, T=4)
    state0 = opt.init(logreg_init(), jnp.full(5, -1.0))
    batch = jax.tree.map(lambda a: a[:20], train)
    out = run(
        opt,
        state0,
        batch,
        val,
        l2_train_loss,
        l2_val_loss,
        num_episodes=5,
        lr_hyper=0.05,
        lr_reptile=1.0,
        progress=False,
    )
    theta = np.asarray(out.history["theta"])
    assert theta.shape == (5,)
    # θ changes only at episodes 0, 2, 4 (Algorithm 3: m = 1, 1 + P, 1 + 2P, ...).
    assert theta[1] == theta[0] and theta[3] == theta[2]
    assert theta[2] != theta[1] and theta[4] != theta[3]
    # Episode 0's θ is Algorithm 4 from φ = w_0 on the episode's T batches.
    batches = jax.tree.map(lambda a: jnp.broadcast_to(a, (4, *a.shape)), batch)
    expected = opt.estimate_theta(state0, batches, val, l2_train_loss, l2_val_loss)
    np.testing.assert_allclose(theta[0], expected, rtol=1e-6)
    assert int(out.state.step) == 20


def test_hyperdistill_window_restarts_each_episode_without_weight_restarts():
    from gradhpo import OnlineHypergradientOptimizer

    train, val = logreg_data(seed=9)
    opt = OnlineHypergradientOptimizer(optax.sgd(0.3), gamma=0.9, estimation_period=100, T=4)
    state0 = opt.init(logreg_init(), jnp.full(5, -1.0))
    out = run(
        opt,
        state0,
        train,
        val,
        l2_train_loss,
        l2_val_loss,
        num_episodes=3,
        lr_hyper=0.05,
        progress=False,
    )
    # The horizon stays T: the distilled point restarted by itself every T = 4 steps.
    np.testing.assert_allclose(out.state.metadata["S_t"], (1 - 0.9**4) / (1 - 0.9), rtol=1e-6)
    assert int(out.state.step) == 12
    # The weights carried on: the same as 12 steps of step() after θ's refit.
    batches = jax.tree.map(lambda a: jnp.broadcast_to(a, (4, *a.shape)), train)
    state = opt.refit_theta(state0, batches, val, l2_train_loss, l2_val_loss)  # θ, episode 0
    for _ in range(12):
        state = opt.step(state, train, val, l2_train_loss, l2_val_loss, 0.05)
    for x, y in zip(jax.tree.leaves(out.state.params), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _primitives(jaxpr):
    """Every primitive name in ``jaxpr``, nested jaxprs (scan and cond bodies) included."""
    from jax.extend.core import jaxprs_in_params

    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for sub in jaxprs_in_params(eqn.params):
            names.extend(_primitives(sub))
    return names


@pytest.mark.parametrize("every", [1, 3])
def test_population_windows_have_no_cond_and_one_hypergradient_per_window(every):
    # Under vmap a lax.cond becomes a select that computes both branches: the window program
    # has no cond at all, and k = 3 traces one estimator step per window of 3 inner steps.
    train, val = logreg_data(seed=4)
    opt = make_opt()
    states = jax.vmap(lambda lam: opt.init(logreg_init(), lam))(jnp.zeros((4, 5)))
    config = loop_module.RunOptions(episode_length=6, lr_hyper=0.1, hyper_update_every=every)
    config = config.config(opt)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    jaxpr = jax.make_jaxpr(
        lambda s, k: programs.population_episode(
            opt,
            l2_train_loss,
            l2_val_loss,
            config,
            s,
            s.params,
            k,
            0,  # the episode index
            minibatches(train, 10),
            fixed_batch(val),
            0.1,
            0.0,
        )
    )(states, keys)
    names = _primitives(jaxpr.jaxpr)
    assert "cond" not in names and "select_n" in names  # the guards are selects, not conds
    assert config.windows == 6 // every


class _Loader:
    """A re-iterable data loader (like a PyTorch DataLoader): not an iterator, not a batch."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


def test_lists_and_loaders_are_sequences_of_batches_read_in_passes():
    train, val = logreg_data()
    opt = OneStepOptimizer(optax.sgd(0.1))
    state = opt.init(logreg_init(), jnp.zeros(5))
    halves = [jax.tree.map(lambda a, s=s: a[s], train) for s in (slice(0, 20), slice(20, 40))]
    kwargs = dict(episode_length=5, lr_hyper=0.1, progress=False)
    by_iterator = run(opt, state, iter(halves * 3), val, l2_train_loss, l2_val_loss, **kwargs)
    by_list = run(opt, state, halves, val, l2_train_loss, l2_val_loss, **kwargs)
    loader = _Loader(halves)
    by_loader = run(opt, state, loader, val, l2_train_loss, l2_val_loss, **kwargs)
    assert loader.passes == 3  # 5 batches from passes of 2
    for other in (by_list, by_loader):
        for a, b in zip(
            jax.tree.leaves(other.state), jax.tree.leaves(by_iterator.state), strict=True
        ):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="train_data holds no batches"):
        run(opt, state, [], val, l2_train_loss, l2_val_loss, **kwargs)
    short = run(opt, state, iter(halves), val, l2_train_loss, l2_val_loss, **kwargs)
    assert short.stopped == "data_exhausted" and short.episode == 0


def test_progress_bar_counts_inner_steps_with_a_compiling_phase(capsys, monkeypatch):
    """The bar advances from inside the compiled episode; the results are unchanged."""
    from gradhpo.training.progress import StepBar

    counts = []
    advance = StepBar.advance
    monkeypatch.setattr(StepBar, "advance", lambda bar, n: (advance(bar, n), counts.append(n)))
    train, val = logreg_data()
    opt = make_opt()
    state = opt.init(logreg_init(), jnp.zeros(5))
    kwargs = dict(num_episodes=2, episode_length=120, lr_hyper=0.1)
    args = (opt, state, minibatches(train, 8), val, l2_train_loss, l2_val_loss)
    quiet = run(*args, progress=False, **kwargs)
    capsys.readouterr()
    counts.clear()
    shown = run(*args, progress=True, **kwargs)
    err = capsys.readouterr().err
    assert "OneStepOptimizer (compiling)" in err and "240/240" in err and "compile=" in err
    assert counts[:3] == [2, 2, 2]  # every 120 // 50 = 2 windows, within the episode
    assert sum(counts) == 240
    assert_trees_equal(shown.state, quiet.state)
    with count_compilations() as compiled:
        run(*args, progress=True, **kwargs)
    assert compiled.count == 0
    host = run(opt, state, [train] * 4, val, l2_train_loss, l2_val_loss, progress=True, **kwargs)
    assert "240/240" in capsys.readouterr().err
    assert int(host.state.step) == 240


def test_episode_metrics_on_the_logger_at_info(caplog):
    train, val = logreg_data()
    opt = make_opt()
    state = opt.init(logreg_init(), jnp.zeros(5))
    with caplog.at_level("INFO", logger="gradhpo"):
        run(opt, state, train, val, l2_train_loss, l2_val_loss, num_episodes=2,
            episode_length=3, lr_hyper=0.1, progress=False)  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(lines) == 2 and lines[1].startswith("OneStepOptimizer episode 2/2: train_loss ")
    assert "val_loss" in lines[1] and "0 skipped" in lines[1]
