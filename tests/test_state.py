"""BilevelState: immutability, update, pytree behaviour under jit / vmap / tree.map."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradhpo import BilevelState, OneStepOptimizer


def make_state():
    return BilevelState(
        params={"w": jnp.ones(3)},
        hyperparams=jnp.zeros(2),
        inner_opt_state=(jnp.zeros(3),),
        outer_opt_state=None,
        step=jnp.asarray(4, jnp.int32),
        metadata={"val_loss": jnp.asarray(1.5), "count": jnp.zeros((), jnp.int32)},
    )


def test_fields_are_immutable():
    s = make_state()
    with pytest.raises(AttributeError, match="immutable"):
        s.params = None
    with pytest.raises(AttributeError):
        del s.step


def test_update_returns_new_state_and_can_set_none():
    s = make_state()
    s2 = s.update(step=s.step + 1, inner_opt_state=None)
    assert int(s2.step) == 5 and int(s.step) == 4
    assert s2.inner_opt_state is None and s.inner_opt_state is not None
    assert s.replace(outer_opt_state=()).outer_opt_state == ()


def test_update_rejects_unknown_field_and_structure_change():
    s = make_state()
    with pytest.raises(TypeError, match="unknown BilevelState field"):
        s.update(parameters=1)
    with pytest.raises(ValueError, match="params must have the pytree structure"):
        s.update(params={"v": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"hyperparams must have shape \(2,\)"):
        s.update(hyperparams=jnp.zeros(3))


def test_int_step_becomes_int32_leaf():
    s = BilevelState(jnp.zeros(1), jnp.zeros(1))
    assert s.step.dtype == jnp.int32
    leaves = jax.tree.leaves(s)
    assert any(leaf is s.step for leaf in leaves)


def test_step_value_does_not_change_treedef():
    s = make_state()
    assert jax.tree.structure(s) == jax.tree.structure(s.update(step=s.step + 10))


def test_metadata_keys_are_static_values_are_leaves():
    s = make_state()
    other = s.update(metadata={"val_loss": jnp.asarray(0.0), "count": jnp.ones((), jnp.int32)})
    assert jax.tree.structure(s) == jax.tree.structure(other)
    renamed = s.update(metadata={"loss": jnp.asarray(0.0), "count": jnp.ones((), jnp.int32)})
    assert jax.tree.structure(s) != jax.tree.structure(renamed)


def test_through_jit_compiles_once_across_steps():
    traces = []

    @jax.jit
    def advance(s):
        traces.append(1)
        return s.update(step=s.step + 1, params=jax.tree.map(lambda x: x * 2, s.params))

    s = make_state()
    for _ in range(5):
        s = advance(s)
    assert int(s.step) == 9 and len(traces) == 1
    np.testing.assert_allclose(s.params["w"], 32.0)


def test_tree_map_and_vmap_over_a_batch_of_states():
    s = make_state()
    doubled = jax.tree.map(lambda x: x * 2, s)
    assert isinstance(doubled, BilevelState) and int(doubled.step) == 8
    batch = jax.tree.map(lambda *xs: jnp.stack(xs), s, doubled)
    assert batch.params["w"].shape == (2, 3)
    steps = jax.vmap(lambda st: st.step + st.metadata["count"])(batch)
    np.testing.assert_array_equal(steps, [4, 8])


def test_vmap_of_optimizer_step_over_states():
    opt = OneStepOptimizer(inner_optimizer=optax.sgd(0.1))
    train = lambda w, lam, b: jnp.sum((w - b) ** 2) + jnp.sum(jnp.exp(lam) * w**2)  # noqa: E731
    val = lambda w, lam, b: jnp.sum((w - b) ** 2)  # noqa: E731
    lams = jnp.array([[-1.0, 0.0], [0.0, 1.0], [1.0, -2.0]])
    states = jax.vmap(lambda lam: opt.init(jnp.zeros(2), lam))(lams)
    batched = jax.vmap(lambda s: opt.step(s, jnp.ones(2), jnp.ones(2), train, val, 0.1))(states)
    for i in range(3):
        single = opt.step(
            opt.init(jnp.zeros(2), lams[i]), jnp.ones(2), jnp.ones(2), train, val, 0.1
        )
        np.testing.assert_allclose(batched.hyperparams[i], single.hyperparams, rtol=1e-6)
        np.testing.assert_allclose(batched.params[i], single.params, rtol=1e-6)
    np.testing.assert_array_equal(batched.step, [1, 1, 1])


@pytest.mark.parametrize("copier", ["pickle", "copy", "deepcopy"])
def test_states_and_windows_round_trip_through_pickle_and_copy(copier):
    import copy
    import pickle

    from gradhpo import OnlineHypergradientOptimizer, Stacked

    do = {
        "pickle": lambda x: pickle.loads(pickle.dumps(x)),
        "copy": copy.copy,
        "deepcopy": copy.deepcopy,
    }[copier]
    opt = OnlineHypergradientOptimizer(
        optax.sgd(0.1, momentum=0.9), outer_optimizer=optax.adam(0.1)
    )
    state = opt.init({"w": jnp.arange(3.0)}, jnp.ones(2))
    again = do(state)
    assert isinstance(again, BilevelState)
    assert jax.tree.structure(again) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(AttributeError, match="immutable"):
        again.step = 3  # still immutable
    for window in (Stacked(jnp.arange(6.0).reshape(3, 2)), Stacked.repeat({"x": jnp.ones(2)}, 4)):
        copied = do(window)
        assert copied.num_steps == window.num_steps
        for a, b in zip(jax.tree.leaves(copied), jax.tree.leaves(window), strict=True):
            np.testing.assert_array_equal(a, b)
