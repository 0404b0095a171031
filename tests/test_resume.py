"""Resumable and interrupt-safe runs: continue == uninterrupted, bitwise; checkpoints on disk."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from problems import l2_train_loss, logreg_data, logreg_init
from test_contract import OPTIMIZERS, val_loss

import gradhpo
from gradhpo import WindowOptimizer
from gradhpo.checkpoint import Checkpointer
from gradhpo.training import minibatches, run, run_population

LENGTH = 2  # step calls per episode


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_results_equal(a, b):
    assert a.episode == b.episode
    assert_trees_equal(a.state, b.state)
    assert_trees_equal(a.meta_params, b.meta_params)
    assert sorted(a.history) == sorted(b.history)
    for k in a.history:
        assert_trees_equal(a.history[k], b.history[k])


def problem(opt, dtype):
    train, val = logreg_data()
    cast = lambda t: jax.tree.map(lambda x: jnp.asarray(x, dtype), t)  # noqa: E731
    train, val = cast(train), cast(val)
    kwargs = {}
    if getattr(opt, "distill_batch", False):
        kwargs["example_batch"] = jax.tree.map(lambda a: a[:10], train)
    state = opt.init(cast(logreg_init()), jnp.full(5, -1.0, dtype), **kwargs)
    lr = None if isinstance(opt, WindowOptimizer) else 0.1
    options = dict(episode_length=LENGTH, lr_hyper=lr, key=jax.random.PRNGKey(7), progress=False)
    return state, (minibatches(train, 10), val, l2_train_loss, val_loss), options


CASES = {
    **OPTIMIZERS,
    "hyperdistill-distilled": lambda: gradhpo.OnlineHypergradientOptimizer(
        optax.sgd(0.3, momentum=0.5), gamma=0.9, T=4, estimation_period=2, distill_batch=True
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_continued_and_restored_runs_equal_one_uninterrupted_run(tmp_path, name, dtype):
    """run(5) == run(2) -> checkpoint -> restore -> run(3), bitwise, for every optimizer."""
    opt = CASES[name]()
    with jax.enable_x64(dtype == "float64"):
        state, data, options = problem(opt, dtype)
        whole = run(opt, state, *data, num_episodes=5, fidelity_every=2, **options)
        ckpt = Checkpointer(tmp_path, every=2, keep=2)
        first = run(
            opt, state, *data, num_episodes=3, fidelity_every=2, checkpointer=ckpt, **options
        )
        assert ckpt.episodes() == [2, 3]  # every 2nd, and the last
        restored = ckpt.restore(like=state, episode=2)  # a checkpoint from mid-run
        options.pop("key")  # a continued run keeps its own key
        second = run(opt, restored, *data, num_episodes=3, fidelity_every=2, **options)
        assert_results_equal(second, whole)
        continued = run(opt, first, *data, num_episodes=2, fidelity_every=2, **options)
        assert_results_equal(continued, whole)
        assert whole.history["val_loss"].dtype == jnp.dtype(dtype)


def test_reptile_restarts_and_populations_continue_exactly(tmp_path):
    opt = OPTIMIZERS["one-step"]()
    state, data, options = problem(opt, "float32")
    options["lr_reptile"] = 0.5
    whole = run(opt, state, *data, num_episodes=4, **options)
    half = run(opt, state, *data, num_episodes=2, **options)
    options.pop("key")
    assert_results_equal(run(opt, half, *data, num_episodes=2, **options), whole)
    with pytest.raises(ValueError, match="lr_reptile: the run being continued ran with"):
        run(opt, half, *data, num_episodes=1, **{**options, "lr_reptile": None})

    states = jax.tree.map(lambda x: jnp.stack([x, x]), state)  # members differ by key
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    pop = dict(options, keys=keys)
    whole = run_population(opt, states, *data, num_episodes=4, **pop)
    ckpt = Checkpointer(tmp_path, keep=1)
    run_population(opt, states, *data, num_episodes=2, checkpointer=ckpt, **pop)
    restored = ckpt.restore(like=states)
    pop.pop("keys")
    assert_results_equal(run_population(opt, restored, *data, num_episodes=2, **pop), whole)


def test_a_continued_run_keeps_its_settings():
    opt = OPTIMIZERS["fo"]()
    state, data, options = problem(opt, "float32")
    first = run(opt, state, *data, num_episodes=1, **options)
    with pytest.raises(ValueError, match="key: a continued run keeps the key stream"):
        run(opt, first, *data, **{**options, "key": jax.random.PRNGKey(8)})
    run(opt, first, *data, **options)  # the same key is fine
    with pytest.raises(ValueError, match="episode_length: the run being continued made 2"):
        run(opt, first, *data, **{**options, "episode_length": 3})


def test_interrupt_callback_stop_and_checkpoint_of_the_last_complete_episode(tmp_path, caplog):
    opt = OPTIMIZERS["greedy"]()
    state, data, options = problem(opt, "float32")
    whole = run(opt, state, *data, num_episodes=2, **options)

    def interrupt(episode, state, records):
        if episode == 1:
            raise KeyboardInterrupt

    ckpt = Checkpointer(tmp_path / "a", every=5)
    with caplog.at_level("WARNING", logger="gradhpo"):
        out = run(
            opt, state, *data, num_episodes=4, callback=interrupt, checkpointer=ckpt, **options
        )
    assert "interrupted" in caplog.text
    assert out.stopped == "interrupted" and out.episode == 2
    assert_results_equal(out, whole)
    assert ckpt.episodes() == [2]  # saved on the way out although every=5
    assert_results_equal(ckpt.restore(like=state), out)
    assert ckpt.restore(like=state).stopped == "interrupted"

    stop = run(opt, state, *data, num_episodes=4, callback=lambda e, s, r: e == 1, **options)
    assert stop.stopped == "callback"
    assert_results_equal(stop, whole)
    with pytest.raises(ValueError, match="holds checkpoints up to episode 2"):
        run(opt, state, *data, num_episodes=1, checkpointer=ckpt, **options)


def test_restore_errors_are_clear(tmp_path):
    opt = OPTIMIZERS["fo"]()
    state, data, options = problem(opt, "float32")
    ckpt = Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ckpt.restore(like=state)
    run(opt, state, *data, num_episodes=1, checkpointer=ckpt, **options)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint of episode 7"):
        ckpt.restore(like=state, episode=7)
    with pytest.raises(TypeError, match="like must be a BilevelState"):
        ckpt.restore(like={"w": 1})
    with pytest.raises(ValueError, match="every must be"):
        Checkpointer(tmp_path, every=0)
    with pytest.raises(TypeError, match="checkpointer must be"):
        run(opt, state, *data, checkpointer=str(tmp_path), **options)


KILLED = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import jax
    from orbax.checkpoint._src.path import atomicity
    from test_resume import OPTIMIZERS, problem
    from gradhpo.checkpoint import Checkpointer
    from gradhpo.training import run

    opt = OPTIMIZERS["hyperdistill"]()
    state, data, options = problem(opt, "float32")
    ckpt = Checkpointer({directory!r}, every=1)

    def die_while_writing(episode, state, records):
        if episode == 1:  # the next checkpoint dies after its files, before its commit
            async def killed(*args, **kwargs):
                os._exit(3)
            for cls in vars(atomicity).values():
                if isinstance(cls, type) and hasattr(cls, "finalize"):
                    cls.finalize = killed

    run(opt, state, *data, num_episodes=4, callback=die_while_writing, checkpointer=ckpt,
        **options)
    """
)


def test_a_run_killed_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    directory = str(tmp_path / "ckpt")
    tests = os.path.dirname(os.path.abspath(__file__))
    code = KILLED.format(tests=tests, directory=directory)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 3, proc.stderr.decode()[-2000:]
    assert any("tmp" in name for name in os.listdir(directory))  # the unfinished write
    opt = OPTIMIZERS["hyperdistill"]()
    state, data, options = problem(opt, "float32")
    ckpt = Checkpointer(directory)
    assert ckpt.episodes() == [1, 2]
    restored = ckpt.restore(like=state)
    options.pop("key")
    whole = run(opt, state, *data, num_episodes=4, key=jax.random.PRNGKey(7), **options)
    assert_results_equal(run(opt, restored, *data, num_episodes=2, **options), whole)
