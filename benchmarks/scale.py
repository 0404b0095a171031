"""Past one device: population throughput, and λ sharded over host devices.

Prints four Markdown tables of ratios, each measured in one run:

1. population throughput: ``run_population`` of N members (one ``vmap``-ped program) against
   N sequential ``run`` calls, for N in {8, 32, 128} and two MLP sizes (1-8-8-1 and
   1-40-40-1 on a sinusoid, One-Step with per-parameter L2); and the same population
   sharded over the host devices (``--devices``, members split between them);
2. the layouts of one population (N = 32): one ``vmap``, ``lax.map`` in batches, the
   ``vmap`` sharded over host devices, each against a loop of single runs, with the CPU
   cores kept busy (CPU time over wall time: where the time goes on XLA:CPU);
3. step time with per-parameter λ (and the weights) sharded over the host devices along a
   model axis, against replicated, for One-Step and Greedy;
4. memory per device of that step from the compiled program's ``memory_analysis``
   (arguments + outputs + temporaries), sharded against replicated.

Run: ``python benchmarks/scale.py`` (add ``--quick`` for seconds). Tables 3-4, the last row
of table 2 and the sharded column of table 1 run in a subprocess with ``--devices`` host
devices (8 by default), forced with ``XLA_FLAGS=--xla_force_host_platform_device_count``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def problem(width: int, n_members: int):
    """A sinusoid regression MLP 1-width-width-1, per-parameter L2 exp(λ), One-Step."""
    import jax
    import jax.numpy as jnp
    import optax

    import gradhpo

    def init(key):
        k = jax.random.split(key, 3)
        sizes = [(1, width), (width, width), (width, 1)]
        return [
            {"w": jax.random.normal(kk, s) / jnp.sqrt(s[0]), "b": jnp.zeros(s[1])}
            for kk, s in zip(k, sizes, strict=True)
        ]

    def apply(params, x):
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    def train_loss(params, lam, b):
        penalty = sum(
            jnp.sum(jnp.exp(h) * p**2)
            for p, h in zip(jax.tree.leaves(params), jax.tree.leaves(lam), strict=True)
        )
        return jnp.mean((apply(params, b[0]) - b[1]) ** 2) + 0.5 * penalty

    def val_loss(params, lam, b):
        return jnp.mean((apply(params, b[0]) - b[1]) ** 2)

    x = jnp.linspace(-3, 3, 64)[:, None]
    batch = (x, jnp.sin(x))
    opt = gradhpo.OneStepOptimizer(optax.sgd(0.05, momentum=0.9))
    keys = jax.random.split(jax.random.PRNGKey(0), n_members)
    states = jax.vmap(lambda k: opt.init(init(k), jax.tree.map(lambda p: p * 0 - 4.0, init(k))))(
        keys
    )
    return opt, states, batch, train_loss, val_loss, keys


def timed(fn, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn())  # compiled and warm
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def busy_cores(fn, repeats: int) -> float:
    """CPU seconds per wall second while ``fn`` runs (1.0: one core busy)."""
    import jax

    jax.block_until_ready(fn())
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def population_rows(sizes, widths, steps, repeats, shard: bool):
    import jax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from gradhpo.training import run, run_population

    rows = []
    for width in widths:
        for n in sizes:
            opt, states, batch, tl, vl, keys = problem(width, n)
            kw = dict(episode_length=steps, lr_hyper=0.05, progress=False, hyperparams_every=None)

            def population(states=states, keys=keys, kw=kw, opt=opt, batch=batch, tl=tl, vl=vl):
                return run_population(opt, states, batch, batch, tl, vl, keys=keys, **kw).state

            one = jax.tree.map(lambda x: x[0], states)

            def single(one=one, kw=kw, opt=opt, batch=batch, tl=tl, vl=vl, keys=keys):
                return run(opt, one, batch, batch, tl, vl, key=keys[0], **kw).state

            t_pop = timed(population, repeats)
            t_one = timed(single, repeats)
            row = {"width": width, "N": n, "vmap": n * t_one / t_pop}
            if shard and n % jax.device_count() == 0:
                mesh = jax.make_mesh((jax.device_count(),), ("pop",), axis_types=(AxisType.Auto,))
                members = NamedSharding(mesh, P("pop"))
                s_states, s_keys = jax.device_put((states, keys), members)

                def sharded(s=s_states, k=s_keys, kw=kw, opt=opt, batch=batch, tl=tl, vl=vl):
                    return run_population(opt, s, batch, batch, tl, vl, keys=k, **kw).state

                row["sharded"] = n * t_one / timed(sharded, repeats)
            rows.append(row)
    return rows


def layout_rows(n: int, width: int, steps: int, repeats: int):
    """One population of ``n`` members, ``steps`` One-Step steps, in every layout considered.

    The same step program, scanned ``steps`` times, with the population as: a Python loop
    of single runs (sequential), one ``vmap`` (batched ``dot_general``: the population as an
    extra matmul dimension), ``lax.map`` in batches of b members (a loop of b-wide vmaps
    inside one program), and a ``vmap`` sharded over the host devices. Ratios are
    throughput against sequential.
    """
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    opt, states, batch, tl, vl, _ = problem(width, n)

    def member(state):
        def body(s, _):
            return opt.step(s, batch, batch, tl, vl, 0.05), None

        return jax.lax.scan(body, state, None, length=steps)[0]

    single = jax.jit(member)
    members = [jax.tree.map(lambda x, i=i: x[i], states) for i in range(n)]
    t_seq = timed(lambda: [single(m) for m in members], repeats)
    layouts = {"vmap": jax.jit(jax.vmap(member))}
    for b in (4, 8):
        if n % b == 0 and b < n:
            layouts[f"lax.map, batches of {b}"] = jax.jit(
                lambda s, b=b: jax.lax.map(member, s, batch_size=b)
            )
    rows = [
        {
            "layout": name,
            "ratio": t_seq / timed(lambda f=f: f(states), repeats),
            "cores": busy_cores(lambda f=f: f(states), repeats),
        }
        for name, f in layouts.items()
    ]
    if jax.device_count() > 1 and n % jax.device_count() == 0:
        mesh = jax.sharding.Mesh(jax.devices(), ("population",))
        placed = jax.device_put(states, NamedSharding(mesh, P("population")))
        f = layouts["vmap"]
        rows.append(
            {
                "layout": f"vmap over {jax.device_count()} host devices",
                "ratio": t_seq / timed(lambda: f(placed), repeats),
                "cores": busy_cores(lambda: f(placed), repeats),
            }
        )
    return rows


def sharded_lambda_rows(hidden: int, repeats: int):
    """Step time and memory per device: λ and weights sharded over a model axis vs replicated."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    import gradhpo

    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("model",), axis_types=(AxisType.Auto,))
    d = 64
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    w = {"a": jax.random.normal(k[0], (hidden, d)) / 8, "b": jax.random.normal(k[1], (hidden,)) / 8}
    lam = jax.tree.map(lambda p: jnp.full(p.shape, -4.0), w)
    x = jax.random.normal(k[2], (128, d))
    batch = (x, jnp.sin(x[:, 0]))

    def mse(w, b):
        return jnp.mean((jnp.tanh(b[0] @ w["a"].T) @ w["b"] - b[1]) ** 2)

    def train_loss(w, lam, b):
        leaves = zip(jax.tree.leaves(lam), jax.tree.leaves(w), strict=True)
        return mse(w, b) + sum(jnp.sum(jnp.exp(h) * p**2) for h, p in leaves)

    def val_loss(w, lam, b):
        return mse(w, b)

    sharded_spec = {
        "a": NamedSharding(mesh, P("model", None)),
        "b": NamedSharding(mesh, P("model")),
    }
    replicated = NamedSharding(mesh, P())
    rows = []
    greedy = gradhpo.GreedyOptimizer(optax.sgd(0.05), optax.adam(1e-3), unroll_steps=5)
    one_step = gradhpo.OneStepOptimizer(optax.sgd(0.05, momentum=0.9))
    for name, opt in (("One-Step", one_step), ("Greedy (T = 5)", greedy)):
        window = isinstance(opt, gradhpo.WindowOptimizer)
        rest = (batch, batch, train_loss, val_loss) + (() if window else (0.05,))
        out = {}
        for layout, spec in (("replicated", replicated), ("sharded", sharded_spec)):
            state = opt.init(jax.device_put(w, spec), jax.device_put(lam, spec))
            step = jax.jit(lambda s, opt=opt, rest=rest: opt.step(s, *rest))
            compiled = step.lower(state).compile()
            mem = compiled.memory_analysis()
            out[layout] = {
                "time": timed(lambda s=state, f=compiled: f(s), repeats),
                "memory": mem.argument_size_in_bytes
                + mem.output_size_in_bytes
                + mem.temp_size_in_bytes,
            }
        rows.append(
            {
                "method": name,
                "time": out["sharded"]["time"] / out["replicated"]["time"],
                "memory": out["sharded"]["memory"] / out["replicated"]["memory"],
                "replicated_bytes": out["replicated"]["memory"],
            }
        )
    return rows


def child(args) -> None:
    """The part run with host devices: the sharded population column, tables 2 and 3."""
    out = {
        "population": population_rows(args.sizes, args.widths, args.steps, args.repeats, True),
        "lambda": sharded_lambda_rows(args.hidden, args.repeats),
        "layouts": layout_rows(32, 8, args.steps, args.repeats),
    }
    print("RESULT " + json.dumps(out), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds, not minutes")
    parser.add_argument("--devices", type=int, default=8, help="host devices for sharding")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [8] if args.quick else [8, 32, 128]
    args.widths = [8] if args.quick else [8, 40]
    args.steps = 20 if args.quick else 200
    args.repeats = 1 if args.quick else 3
    args.hidden = 256 if args.quick else 4096
    if args.child:
        return child(args)
    import jax

    one_device = population_rows(args.sizes, args.widths, args.steps, args.repeats, False)
    flags = f"--xla_force_host_platform_device_count={args.devices}"
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    command = [sys.executable, __file__, "--child", "--devices", str(args.devices)]
    proc = subprocess.run(
        command + (["--quick"] if args.quick else []), env=env, capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(proc.stderr[-3000:])
    sharded = json.loads(lines[-1][len("RESULT ") :])
    by_key = {(r["width"], r["N"]): r for r in sharded["population"]}

    print(f"jax {jax.__version__}, {os.cpu_count()} CPU cores, {args.devices} host devices\n")
    print("Population throughput (members × one run's time / population's time; 1 = no gain)\n")
    print(f"| MLP | N | vmap, 1 device | vmap, sharded over {args.devices} host devices |")
    print("|---|---|---|---|")
    for r in one_device:
        s = by_key.get((r["width"], r["N"]), {}).get("sharded")
        shown = f"{s:.2f}×" if s is not None else "—"
        print(f"| 1-{r['width']}-{r['width']}-1 | {r['N']} | {r['vmap']:.2f}× | {shown} |")
    print("\nLayouts of one population (N = 32, MLP 1-8-8-1, the step scanned; throughput")
    print("against a Python loop of single runs of the same program)\n")
    print("| layout | throughput ratio | cores busy |")
    print("|---|---|---|")
    for r in layout_rows(32, 8, args.steps, args.repeats) + sharded["layouts"][-1:]:
        print(f"| {r['layout']} | {r['ratio']:.2f}× | {r['cores']:.2f} |")
    print(f"\nλ (one per weight) sharded over {args.devices} host devices vs replicated\n")
    print("| method | step time ratio | memory per device ratio | replicated memory |")
    print("|---|---|---|---|")
    for r in sharded["lambda"]:
        mib = r["replicated_bytes"] / 2**20
        print(f"| {r['method']} | {r['time']:.2f} | {r['memory']:.3f} | {mib:.1f} MiB |")


if __name__ == "__main__":
    main()
