"""Meta-learning runs (a Tasks source): equal to a hand-written loop over the meta-batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo
from gradhpo.training import Tasks, run
from gradhpo.utils import count_compilations

B, T, D = 3, 4, 3


def sample_task(data, key):
    ka, kx = jax.random.split(key)
    return {"target": jax.random.normal(ka, (D,)), "xs": jax.random.normal(kx, (5, 2))}


def support(task, key):  # per-step noisy support batches drawn from the task
    noise = 0.1 * jax.random.normal(key, (5,))
    return {"x": task["xs"], "y": jnp.tanh(task["xs"]) @ task["target"][:2] + noise}


def query(task, key):
    x = jax.random.normal(key, (4, 2))
    return {"x": x, "y": jnp.tanh(x) @ task["target"][:2]}


def features(lam, x):
    return jnp.tanh(x @ lam["w"] + lam["b"])


def loss(head, lam, batch):
    return jnp.mean((features(lam, batch["x"]) @ head - batch["y"]) ** 2)


TASKS = Tasks(sample_task, support, query, meta_batch_size=B)


def meta_run(opt, state=None, tasks=TASKS, **kwargs):
    """``run`` on a Tasks source with the test's loss, no progress bar."""
    state = start(opt) if state is None else state
    return run(opt, state, tasks, None, loss, loss, progress=False, **kwargs)


def start(opt):
    lam = {"w": 0.5 * jnp.ones((2, D)) + 0.1 * jnp.eye(2, D), "b": jnp.zeros(D)}
    return opt.init(jnp.zeros(D), lam)


def hand_loop(opt, state, episodes, key, lr_reptile, lr_hyper=None, every=1, warmup=0):
    """The meta-learning episodes written out over the members with estimate/apply."""
    phi = state.params
    windows = T // every
    calls = 1 if isinstance(opt, gradhpo.WindowOptimizer) else every
    for e in range(episodes):
        k_refit, k_run = jax.random.split(jax.random.fold_in(key, e))
        if opt.refit is not None and e % opt.refit.every == 0:
            state = opt.new_episode(state, phi)
            k_tasks, k_batches = jax.random.split(k_refit)
            fresh = TASKS.sample(k_tasks)
            thetas = []
            for b in range(B):
                task_b = jax.tree.map(lambda x, b=b: x[b], fresh)
                kt, kv = jax.random.split(jax.random.fold_in(k_batches, b))
                batches = jax.vmap(lambda k, t=task_b: support(t, k))(jax.random.split(kt, T))
                fitted = opt.refit.fn(state, batches, query(task_b, kv), loss, loss)
                thetas.append(fitted.metadata["theta"])
            state = opt.with_theta(state, jnp.mean(jnp.stack(thetas)))
        k_tasks, k_batches = jax.random.split(k_run)
        task = TASKS.sample(k_tasks)
        tasks = [jax.tree.map(lambda x, b=b: x[b], task) for b in range(B)]
        members, keys = [], []
        for b in range(B):
            member = opt.new_episode(state, phi)
            key_b = jax.random.fold_in(k_batches, b)
            if warmup:
                k_warm, key_b = jax.random.split(key_b)
                for k in jax.random.split(k_warm, warmup):
                    new = opt.inner(
                        member.params,
                        member.inner_opt_state,
                        member.hyperparams,
                        support(tasks[b], k),
                        loss,
                    )
                    member = member.update(
                        params=new.params,
                        inner_opt_state=new.inner_opt_state,
                        step=member.step + 1,
                    )
            members.append(member)
            keys.append(jax.random.split(key_b, windows * calls).reshape(windows, calls, 2))
        for w in range(windows):
            estimates = []
            for b in range(B):
                call_keys = keys[b][w]
                train_keys = [jax.random.split(k)[0] for k in call_keys]
                if isinstance(opt, gradhpo.WindowOptimizer):  # one call, unroll_steps draws
                    train_keys = jax.random.split(train_keys[0], opt.unroll_steps)
                train = [support(tasks[b], k) for k in train_keys]
                val = query(tasks[b], jax.random.split(call_keys[-1])[1])
                window = gradhpo.Stacked(jax.tree.map(lambda *xs: jnp.stack(xs), *train))
                estimates.append(opt.estimate(members[b], window, val, loss, loss))
            g = jax.tree.map(
                lambda *gs: jnp.mean(jnp.stack(gs), 0), *[e.hypergrad for e in estimates]
            )
            tl = jnp.mean(jnp.stack([e.train_loss for e in estimates]))
            vl = jnp.mean(jnp.stack([e.val_loss for e in estimates]))
            members = [
                opt.apply(m, e._replace(hypergrad=g, train_loss=tl, val_loss=vl), lr_hyper)
                for m, e in zip(members, estimates, strict=True)
            ]
        mean_w = jnp.mean(jnp.stack([m.params for m in members]), 0)
        phi = (1 - lr_reptile) * phi + lr_reptile * mean_w
        state = members[0].update(params=mean_w)
    return state, phi


OPTIMIZERS = {
    "fo": lambda: gradhpo.FOOptimizer(optax.sgd(0.2, momentum=0.9), optax.adam(0.05)),
    "one-step": lambda: gradhpo.OneStepOptimizer(optax.sgd(0.2, momentum=0.9)),
    "hyperdistill": lambda: gradhpo.OnlineHypergradientOptimizer(
        optax.sgd(0.2, momentum=0.9), optax.adam(0.05), gamma=0.9, T=T, estimation_period=2
    ),
    "greedy": lambda: gradhpo.GreedyOptimizer(
        optax.sgd(0.2), optax.adam(0.05), unroll_steps=2, gamma=0.8
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_meta_run_equals_the_hand_written_loop(x64, name):
    opt = OPTIMIZERS[name]()
    lr = 0.3 if opt.outer_optimizer is None else None
    window = isinstance(opt, gradhpo.WindowOptimizer)
    length = T // opt.unroll_steps if window else T
    key = jax.random.PRNGKey(3)
    result = meta_run(
        opt,
        num_episodes=3,
        episode_length=length,
        lr_hyper=lr,
        lr_reptile=0.7,
        key=key,
    )
    if window:  # the hand loop's windows: unroll_steps batches per hyper-update
        state, phi = hand_loop(opt, start(opt), 3, key, 0.7, lr, every=opt.unroll_steps)
    else:
        state, phi = hand_loop(opt, start(opt), 3, key, 0.7, lr)
    pairs = zip(
        jax.tree.leaves(result.state.hyperparams), jax.tree.leaves(state.hyperparams), strict=True
    )
    for a, b in pairs:
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.meta_params, phi, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(result.state.params, state.params, rtol=1e-10, atol=1e-12)
    assert result.history["val_loss"].shape == (3, length)
    if name == "hyperdistill":
        np.testing.assert_allclose(
            result.state.metadata["theta"], state.metadata["theta"], rtol=1e-10
        )


def test_meta_run_with_hyper_updates_every_k_and_a_warm_up_equals_the_hand_loop(x64):
    opt = gradhpo.OneStepOptimizer(optax.sgd(0.2, momentum=0.9))
    key = jax.random.PRNGKey(5)
    result = meta_run(
        opt,
        num_episodes=2,
        episode_length=T,
        hyper_update_every=2,
        warmup_steps=3,
        lr_hyper=0.3,
        lr_reptile=1.0,
        key=key,
    )
    state, phi = hand_loop(opt, start(opt), 2, key, 1.0, 0.3, every=2, warmup=3)
    np.testing.assert_allclose(result.state.hyperparams["w"], state.hyperparams["w"], rtol=1e-10)
    np.testing.assert_allclose(result.meta_params, phi, rtol=1e-10, atol=1e-12)
    assert int(result.state.step) == 2 * (3 + T)


def test_reptile_one_moves_phi_to_the_mean_of_the_adapted_weights():
    opt = gradhpo.FOOptimizer(optax.sgd(0.2), optax.adam(0.05))
    seen = {}

    def callback(episode, state, records):
        seen["phi"], seen["mean_w"] = records["meta_params"], state.params

    result = meta_run(
        opt,
        num_episodes=1,
        episode_length=T,
        lr_reptile=1.0,
        callback=callback,
    )
    np.testing.assert_array_equal(result.meta_params, seen["mean_w"])
    # φ = 0 restarts: with η = 0 φ never moves, and the state's weights are the mean w_T
    fixed = meta_run(
        opt,
        num_episodes=2,
        episode_length=T,
        lr_reptile=0.0,
    )
    np.testing.assert_array_equal(fixed.meta_params, jnp.zeros(D))
    assert float(jnp.linalg.norm(fixed.state.params)) > 0


def test_a_non_finite_member_skips_the_hyper_update_for_the_whole_meta_batch():
    def sometimes_nan(task, key):  # roughly one task in three has NaN query targets
        batch = query(task, key)
        return {**batch, "y": jnp.where(task["target"][0] > 0.5, jnp.nan, batch["y"])}

    opt = gradhpo.OneStepOptimizer(optax.sgd(0.2))
    tasks = Tasks(sample_task, support, sometimes_nan, meta_batch_size=B)
    state0 = start(opt)
    result = run(
        opt,
        state0,
        tasks,
        None,
        loss,
        loss,
        num_episodes=6,
        episode_length=T,
        lr_hyper=0.3,
        lr_reptile=1.0,
        progress=False,
    )
    applied = np.asarray(result.history["hyper_update"])
    per_episode = applied.all(axis=1) | ~applied.any(axis=1)
    assert per_episode.all()  # a NaN member skips every update of its episode, for all
    assert 0 < int((~applied).sum()) < applied.size  # some episodes had one, some did not
    assert int(result.state.metadata["skipped_hyper_updates"]) == int((~applied).sum())
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(result.state.hyperparams))
    assert bool(jnp.all(jnp.isfinite(result.meta_params)))


def test_a_meta_run_compiles_once_and_continues_exactly():
    opt = gradhpo.OnlineHypergradientOptimizer(
        optax.sgd(0.2, momentum=0.9), optax.adam(0.05), gamma=0.9, T=T, estimation_period=2
    )
    kw = dict(episode_length=T, lr_reptile=1.0, key=jax.random.PRNGKey(2))
    whole = meta_run(opt, num_episodes=4, **kw)
    with count_compilations() as compiled:
        half = meta_run(opt, num_episodes=2, **kw)
        rest = meta_run(opt, half, num_episodes=2, **{**kw, "key": None})
    # The episode and θ programs of the first run serve both calls (only the history's
    # small concatenations are new).
    assert not [name for name in compiled.by_name if "episode" in name or "refit" in name], (
        compiled.by_name
    )
    np.testing.assert_array_equal(rest.state.hyperparams["w"], whole.state.hyperparams["w"])
    np.testing.assert_array_equal(rest.meta_params, whole.meta_params)
    np.testing.assert_array_equal(rest.history["theta"], whole.history["theta"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr_reptile": None}, "lr_reptile is required with a Tasks source"),
        ({"val": {"x": jnp.zeros((1, 2))}}, "val_data must be None with a Tasks source"),
        ({"fidelity_every": 1}, "fidelity_every is not available with a Tasks source"),
        ({"warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
    ],
)
def test_meta_run_bad_options_are_named(kwargs, message):
    opt = gradhpo.OneStepOptimizer(optax.sgd(0.2))
    kwargs = {"lr_reptile": 1.0, "lr_hyper": 0.1, **kwargs}
    val = kwargs.pop("val", None)
    with pytest.raises(ValueError, match=message):
        run(opt, start(opt), TASKS, val, loss, loss, episode_length=T, progress=False, **kwargs)


def test_populations_refuse_a_tasks_source_and_tasks_check_their_arguments():
    opt = gradhpo.OneStepOptimizer(optax.sgd(0.2))
    states = jax.vmap(lambda _: start(opt))(jnp.arange(2))
    with pytest.raises(ValueError, match="run_population does not take a Tasks source"):
        gradhpo.training.run_population(
            opt,
            states,
            TASKS,
            None,
            loss,
            loss,
            keys=jax.random.split(jax.random.PRNGKey(0), 2),
            episode_length=T,
            lr_hyper=0.1,
            lr_reptile=1.0,
            progress=False,
        )
    with pytest.raises(ValueError, match="meta_batch_size"):
        Tasks(sample_task, support, query, meta_batch_size=0)
    with pytest.raises(TypeError, match="train_batch must be callable"):
        Tasks(sample_task, None, query)


def test_warm_up_needs_jittable_data():
    opt = gradhpo.OneStepOptimizer(optax.sgd(0.2))
    batch = {"x": jnp.zeros((5, 2)), "y": jnp.zeros(5)}
    with pytest.raises(ValueError, match="warmup_steps needs jittable data"):
        run(
            opt,
            start(opt),
            lambda: batch,
            lambda: batch,
            loss,
            loss,
            episode_length=2,
            lr_hyper=0.1,
            warmup_steps=2,
            progress=False,
        )
