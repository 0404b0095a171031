"""Programs that test_distributed.py runs in subprocesses (several processes or host devices).

Each prints one ``RESULT <json>`` line; the tests compare them.
"""

import json
import os
import sys


def start(n_processes: int, process_id: int, port: str) -> None:
    """Join ``n_processes`` processes on 127.0.0.1 (CPU collectives over gloo)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if n_processes > 1:
        jax.distributed.initialize(
            f"127.0.0.1:{port}", num_processes=n_processes, process_id=process_id
        )


def local(x):
    """The value of an array that every process holds whole (replicated)."""
    import numpy as np

    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


def multi_process(n_processes: int, process_id: int, port: str, directory: str) -> None:
    """run / run_population / checkpoints with the batch axis over every device of the job."""
    start(n_processes, process_id, port)
    import logging

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P
    from problems import l2_train_loss, l2_val_loss, logreg_data, logreg_init

    import gradhpo
    from gradhpo.checkpoint import Checkpointer
    from gradhpo.training import minibatches, run, run_population, sharded_minibatches

    logging.basicConfig(level=logging.INFO)
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Auto,))
    rows = NamedSharding(mesh, P("batch"))
    train, val = logreg_data(n=64)
    index, count = jax.process_index(), jax.process_count()

    def feed(tree):  # each process gives its own rows of every array
        def one(a):
            a = np.asarray(a)
            per = a.shape[0] // count
            return jax.make_array_from_process_local_data(rows, a[index * per : (index + 1) * per])

        return jax.tree.map(one, tree)

    opt = gradhpo.OneStepOptimizer(optax.sgd(0.3, momentum=0.5))
    s0 = opt.init(logreg_init(), jnp.zeros(5))
    kw = dict(episode_length=10, lr_hyper=0.1, progress=True, key=jax.random.PRNGKey(3))
    tl, vl = l2_train_loss, l2_val_loss
    out = {}
    glob_train, glob_val = feed(train), feed(val)
    stepped = s0
    for _ in range(3):  # step by hand on the global batches
        stepped = opt.step(stepped, glob_train, glob_val, tl, vl, 0.1)
    out["step"] = local(stepped.hyperparams).tolist()
    full = run(opt, s0, minibatches(glob_train, 32), glob_val, tl, vl, num_episodes=3, **kw)
    out["run"] = local(full.state.hyperparams).tolist()
    out["sharding"] = str(full.state.hyperparams.sharding.spec)
    own = sharded_minibatches(glob_train, 32, mesh)
    out["sharded_sampler"] = local(
        run(opt, s0, own, glob_val, tl, vl, **kw).state.hyperparams
    ).tolist()

    ckpt = Checkpointer(directory, every=1, keep=2)
    first = run(opt, s0, minibatches(glob_train, 32), glob_val, tl, vl, num_episodes=2,
                checkpointer=ckpt, **kw)  # fmt: skip
    del first
    kw.pop("key")
    restored = ckpt.restore(like=s0)
    more = run(opt, restored, minibatches(glob_train, 32), glob_val, tl, vl, num_episodes=1, **kw)
    out["resumed"] = local(more.state.hyperparams).tolist()
    out["episodes"] = ckpt.episodes()

    states = jax.vmap(lambda lam: opt.init(logreg_init(), lam))(
        jnp.stack([jnp.zeros(5), -jnp.ones(5)])
    )
    keys = jax.random.split(jax.random.PRNGKey(4), 2)
    pop = run_population(opt, states, minibatches(glob_train, 32), glob_val, tl, vl, keys=keys,
                         episode_length=10, lr_hyper=0.1, progress=False)  # fmt: skip
    out["population"] = local(pop.state.hyperparams).tolist()
    print("RESULT " + json.dumps(out), flush=True)


def sharded_hyperparameters() -> None:
    """8 host devices: λ sharded like the weights (model axis), and per-example λ (data axis)."""
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import gradhpo
    from gradhpo.training import run

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    hidden, d = 64, 4
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    w = {
        "a": 0.3 * jax.random.normal(keys[0], (hidden, d)),
        "b": 0.3 * jax.random.normal(keys[1], (hidden,)),
    }
    lam = jax.tree.map(lambda p: jnp.full(p.shape, -3.0), w)
    x = jax.random.normal(keys[2], (32, d))
    batch = (x, jnp.sin(x[:, 0]))

    def mse(w, b):
        return jnp.mean((jnp.tanh(b[0] @ w["a"].T) @ w["b"] - b[1]) ** 2)

    def train_loss(w, lam, b):  # one weight decay per parameter
        decay = sum(
            jnp.sum(jnp.exp(l) * p**2)
            for l, p in zip(jax.tree.leaves(lam), jax.tree.leaves(w), strict=True)
        )
        return mse(w, b) + decay

    def val_loss(w, lam, b):
        return mse(w, b)

    spec = {"a": NamedSharding(mesh, P("model", None)), "b": NamedSharding(mesh, P("model"))}
    optimizers = {
        "fo": gradhpo.FOOptimizer(optax.sgd(0.1)),
        "one-step": gradhpo.OneStepOptimizer(optax.sgd(0.1, momentum=0.9)),
        "t1t2": gradhpo.T1T2Optimizer(optax.sgd(0.1)),
        "hyperdistill": gradhpo.OnlineHypergradientOptimizer(optax.sgd(0.1), T=4),
        "greedy": gradhpo.GreedyOptimizer(optax.sgd(0.1), optax.adam(0.01), unroll_steps=3),
        "reverse": gradhpo.ReverseModeOptimizer(optax.sgd(0.1), optax.adam(0.01), unroll_steps=3),
        "drmad": gradhpo.DrMADOptimizer(optax.sgd(0.1), optax.adam(0.01), unroll_steps=3),
    }
    out = {}
    for name, opt in optimizers.items():
        window = isinstance(opt, gradhpo.WindowOptimizer)
        lr = None if window else 0.1
        rest = (batch, batch, train_loss, val_loss) + (() if window else (lr,))
        plain = opt.step(opt.init(w, lam), *rest)
        state = opt.init(jax.device_put(w, spec), jax.device_put(lam, spec))
        sharded = opt.step(state, *rest)
        hlo = jax.jit(lambda s, opt=opt, rest=rest: opt.step(s, *rest)).lower(state).compile()
        # An all-gather whose result is a whole λ leaf (f32[64,4] or f32[64]).
        full = re.compile(rf"= f32\[({hidden},{d}|{hidden})\]\S* all-gather\(")
        gathers = [line for line in hlo.as_text().splitlines() if full.search(line)]
        ran = run(opt, state, batch, batch, train_loss, val_loss, episode_length=4,
                  lr_hyper=lr, progress=False)  # fmt: skip
        out[name] = {
            "step_specs": [str(a.sharding.spec) for a in jax.tree.leaves(sharded.hyperparams)],
            "params_specs": [str(a.sharding.spec) for a in jax.tree.leaves(sharded.params)],
            "run_specs": [str(a.sharding.spec) for a in jax.tree.leaves(ran.state.hyperparams)],
            "gathers": len(gathers),
            "max_diff": max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True)
            ),
        }

    # Per-example λ (data hyper-cleaning): sharded with the examples over a data axis.
    data_mesh = jax.make_mesh((8,), ("batch",), axis_types=(AxisType.Auto,))
    rows = NamedSharding(data_mesh, P("batch"))
    n = 64
    xs = jax.random.normal(keys[0], (n, d))
    ys = (xs[:, 0] > 0).astype(jnp.float32)

    def weighted(w, lam, b):
        logits = b[0] @ w
        per = optax.sigmoid_binary_cross_entropy(logits, b[1])
        return jnp.mean(jax.nn.sigmoid(lam) * per)

    def clean(w, lam, b):
        return jnp.mean(optax.sigmoid_binary_cross_entropy(b[0] @ w, b[1]))

    opt = gradhpo.GreedyOptimizer(optax.sgd(0.5), optax.adam(0.1), unroll_steps=3)
    train_rows = (jax.device_put(xs, rows), jax.device_put(ys, rows))
    state = opt.init(jnp.zeros(d), jax.device_put(jnp.zeros(n), rows))
    new = opt.step(state, train_rows, (xs, ys), weighted, clean)
    plain = opt.step(opt.init(jnp.zeros(d), jnp.zeros(n)), (xs, ys), (xs, ys), weighted, clean)
    out["per_example"] = {
        "spec": str(new.hyperparams.sharding.spec),
        "max_diff": float(
            np.max(np.abs(np.asarray(new.hyperparams) - np.asarray(plain.hyperparams)))
        ),
    }
    print("RESULT " + json.dumps(out), flush=True)


def sharded_population() -> None:
    """8 host devices as (4 members) x (2 data shards): run_population equals sequential runs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P
    from problems import l2_train_loss, l2_val_loss, logreg_data, logreg_init

    import gradhpo
    from gradhpo.training import minibatches, run, run_population

    mesh = jax.make_mesh((4, 2), ("pop", "batch"), axis_types=(AxisType.Auto,) * 2)
    train, val = logreg_data(n=64)
    rows = NamedSharding(mesh, P("batch"))
    members = NamedSharding(mesh, P("pop"))
    opt = gradhpo.GreedyOptimizer(optax.sgd(0.3), optax.adam(0.05), unroll_steps=3)
    lams = jnp.linspace(-2.0, 1.0, 4)[:, None] * jnp.ones(5)
    states = jax.vmap(lambda lam: opt.init(logreg_init(), lam))(lams)
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    kw = dict(num_episodes=2, episode_length=4, progress=False)
    data = (minibatches(jax.device_put(train, rows), 16), jax.device_put(val, rows))
    pop = run_population(opt, jax.device_put(states, members), *data, l2_train_loss,
                         l2_val_loss, keys=jax.device_put(keys, members), **kw)  # fmt: skip
    sequential = [
        run(opt, jax.tree.map(lambda x, i=i: x[i], states), minibatches(train, 16), val,
            l2_train_loss, l2_val_loss, key=keys[i], **kw).state.hyperparams
        for i in range(4)
    ]  # fmt: skip
    # Nothing placed: the members are spread over the 8 devices by default.
    lams8 = jnp.linspace(-2.0, 1.0, 8)[:, None] * jnp.ones(5)
    states8 = jax.vmap(lambda lam: opt.init(logreg_init(), lam))(lams8)
    keys8 = jax.random.split(jax.random.PRNGKey(6), 8)
    spread = run_population(opt, states8, minibatches(train, 16), val, l2_train_loss,
                            l2_val_loss, keys=keys8, **kw)  # fmt: skip
    sequential8 = [
        run(opt, jax.tree.map(lambda x, i=i: x[i], states8), minibatches(train, 16), val,
            l2_train_loss, l2_val_loss, key=keys8[i], **kw).state.hyperparams
        for i in range(8)
    ]  # fmt: skip
    out = {
        "spec": str(pop.state.hyperparams.sharding.spec),
        "devices": len(pop.state.hyperparams.sharding.device_set),
        "max_diff": float(np.max(np.abs(np.asarray(pop.state.hyperparams) - np.stack(sequential)))),
        "spread_spec": str(spread.state.hyperparams.sharding.spec),
        "spread_devices": len(spread.state.hyperparams.sharding.device_set),
        "spread_diff": float(
            np.max(np.abs(np.asarray(spread.state.hyperparams) - np.stack(sequential8)))
        ),
    }

    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    name, *args = sys.argv[1:]
    programs = {
        "multi_process": multi_process,
        "sharded_hyperparameters": sharded_hyperparameters,
        "sharded_population": sharded_population,
    }
    programs[name](*[int(a) if a.isdigit() else a for a in args])
