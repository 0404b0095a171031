"""The safeguard against finite blow-ups: limits in the state, skips counted, off by default."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo
from gradhpo.training import run


def train(w, lam, b):
    return jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)


def val(w, lam, b):
    return jnp.sum(b * (w - 1.0) ** 2)  # the batch scales it: a blow-up on demand


OPTIMIZERS = [
    lambda: gradhpo.OneStepOptimizer(optax.sgd(0.1), optax.adam(0.1)),
    lambda: gradhpo.GreedyOptimizer(optax.sgd(0.1), optax.adam(0.1), unroll_steps=3),
    lambda: gradhpo.OnlineHypergradientOptimizer(optax.sgd(0.1), optax.adam(0.1), T=3),
]


@pytest.mark.parametrize("make", OPTIMIZERS)
def test_a_finite_blow_up_past_the_limit_is_skipped_whole_and_counted(make):
    opt = make()
    state = opt.with_safeguard(opt.init(jnp.ones(2), jnp.zeros(2)), max_hypergrad_norm=1e3)
    calm = opt.step(state, jnp.zeros(2), jnp.ones(2), train, val, *([None] * _lr(opt)))
    assert int(calm.metadata["safeguard_skips"]) == 0
    huge = opt.step(calm, jnp.zeros(2), jnp.full(2, 1e12), train, val, *([None] * _lr(opt)))
    md = huge.metadata
    assert float(md["hypergrad_norm"]) > 1e3  # the metric shows the skipped value
    assert int(md["safeguard_skips"]) == int(md["skipped_hyper_updates"]) == 1
    assert int(md["consecutive_skips"]) == 1 and int(md["skipped_inner_updates"]) == 0
    for name in ("params", "hyperparams", "inner_opt_state", "outer_opt_state"):
        pairs = zip(
            jax.tree.leaves(getattr(huge, name)), jax.tree.leaves(getattr(calm, name)), strict=True
        )
        for a, b in pairs:
            np.testing.assert_array_equal(a, b)
    # Without the limit the same step is applied, and Adam's second moment takes the hit.
    free = opt.step(
        opt.init(jnp.ones(2), jnp.zeros(2)),
        jnp.zeros(2),
        jnp.ones(2),
        train,
        val,
        *([None] * _lr(opt)),
    )
    free = opt.step(free, jnp.zeros(2), jnp.full(2, 1e12), train, val, *([None] * _lr(opt)))
    assert int(free.metadata["safeguard_skips"]) == 0
    assert int(free.metadata["skipped_hyper_updates"]) == 0


def _lr(opt):  # online optimizers take lr_hyper (None with an outer optimizer)
    return 0 if isinstance(opt, gradhpo.WindowOptimizer) else 1


def test_the_loss_limit_skips_a_diverging_inner_loss():
    opt = gradhpo.OneStepOptimizer(optax.sgd(0.1))
    state = opt.with_safeguard(opt.init(jnp.ones(2), jnp.zeros(2)), max_loss=100.0)
    ok = opt.step(state, jnp.zeros(2), jnp.ones(2), train, val, 0.1)
    bad = opt.step(ok, jnp.full(2, 1e3), jnp.ones(2), train, val, 0.1)  # L_train ~ 2e6
    assert int(ok.metadata["safeguard_skips"]) == 0
    assert int(bad.metadata["safeguard_skips"]) == 1
    np.testing.assert_array_equal(bad.params, ok.params)


def test_limits_live_in_the_state_change_without_recompiling_and_can_be_lifted():
    from gradhpo.utils import count_compilations

    opt = gradhpo.OneStepOptimizer(optax.sgd(0.1))
    state = opt.init(jnp.ones(2), jnp.zeros(2))
    assert float(state.metadata["max_hypergrad_norm"]) == float("inf")  # off by default
    opt.step(state, jnp.zeros(2), jnp.ones(2), train, val, 0.1)
    with count_compilations() as compiled:
        for limit in (1.0, 10.0, None):
            guarded = opt.with_safeguard(state, max_hypergrad_norm=limit, max_loss=limit)
            opt.step(guarded, jnp.zeros(2), jnp.ones(2), train, val, 0.1)
    assert compiled.by_name.get("jit(step)", 0) == 0
    lifted = opt.with_safeguard(guarded)
    assert float(lifted.metadata["max_loss"]) == float("inf")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"max_hypergrad_norm": 0.0}, ValueError, "max_hypergrad_norm must be > 0"),
        ({"max_hypergrad_norm": -1.0}, ValueError, "max_hypergrad_norm must be > 0"),
        ({"max_loss": float("nan")}, ValueError, "max_loss must not be NaN"),
        ({"max_loss": "big"}, TypeError, "max_loss must be a number or None"),
        ({"max_hypergrad_norm": True}, TypeError, "max_hypergrad_norm must be a number"),
    ],
)
def test_bad_limits_are_named(kwargs, error, message):
    opt = gradhpo.FOOptimizer(optax.sgd(0.1))
    with pytest.raises(error, match=message):
        opt.with_safeguard(opt.init(jnp.ones(2), jnp.zeros(2)), **kwargs)


def test_a_run_behind_the_limit_is_reported_as_stalled(caplog):
    opt = gradhpo.OneStepOptimizer(optax.sgd(0.1))
    state = opt.with_safeguard(opt.init(jnp.ones(2), jnp.zeros(2)), max_hypergrad_norm=1e-9)
    result = run(
        opt,
        state,
        jnp.zeros(2),
        jnp.ones(2),
        train,
        val,
        num_episodes=1,
        episode_length=5,
        lr_hyper=0.1,
        stall_after=5,
        progress=False,
    )
    assert int(result.state.metadata["safeguard_skips"]) == 5
    assert not bool(np.any(result.history["hyper_update"]))
    assert "safeguard" in caplog.text
