"""Cost of one bilevel step in units of one plain jitted SGD step, and compilations.

Usage: ``python benchmarks/step_cost.py [--quick]``

An MLP with more than 100k parameters, batch 256, float32, per-parameter L2 strengths as
hyperparameters (as many hyperparameters as weights). Each optimizer's ``step`` is timed at
steady state (after compilation) and divided by the time of a plain jitted SGD step on the
same model and batch, measured in the same run. Compilations are counted over 200 steps
whose ``lr_hyper`` changes every step.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from common import (
    classification_batch,
    markdown_table,
    mlp_init,
    n_params,
    per_parameter_l2_train_loss,
    seconds_per_call,
    val_loss,
)

import gradhpo
from gradhpo.utils import count_compilations

INNER_LR = 0.05


def setup(quick: bool):
    sizes = (784, 128, 128, 10)
    batch_size = 64 if quick else 256
    key_p, key_t, key_v = jax.random.split(jax.random.PRNGKey(0), 3)
    params = mlp_init(key_p, sizes)
    hyperparams = jax.tree.map(lambda p: jnp.full_like(p, -4.0), params)
    train = classification_batch(key_t, batch_size, sizes[0], sizes[-1])
    val = classification_batch(key_v, batch_size, sizes[0], sizes[-1])
    return params, hyperparams, train, val


def plain_sgd_seconds(params, hyperparams, train, number, repeats) -> float:
    """Time of one jitted SGD step ``w ← w - η ∇_w L_train(w, λ)``: the unit of cost."""

    @jax.jit
    def sgd_step(w):
        g = jax.grad(per_parameter_l2_train_loss)(w, hyperparams, train)
        return jax.tree.map(lambda p, gi: p - INNER_LR * gi, w, g)

    return seconds_per_call(sgd_step, params, number=number, repeats=repeats)


def optimizer_seconds(opt, params, hyperparams, train, val, number, repeats) -> float:
    state = opt.init(params, hyperparams)

    def step(s):
        return opt.step(s, train, val, per_parameter_l2_train_loss, val_loss, 1e-3)

    return seconds_per_call(step, state, number=number, repeats=repeats)


def compilations_over(make_opt, params, hyperparams, train, val, n_steps: int) -> int:
    """Programs compiled during ``n_steps`` steps from a fresh state, ``lr_hyper`` decaying."""
    opt = make_opt()  # a new optimizer: nothing is compiled for it yet
    state = opt.init(params, hyperparams)
    with count_compilations() as counter:
        for i in range(n_steps):
            lr = 1e-3 / (1.0 + i)
            state = opt.step(state, train, val, per_parameter_l2_train_loss, val_loss, lr)
        jax.block_until_ready(state)
    return counter.count


def baseline_rows(params, hyperparams, train, val, unit, number, repeats, n_compile):
    rows = []
    for name, cls, target in (
        ("FO", gradhpo.FOOptimizer, 2.5),
        ("One-Step", gradhpo.OneStepOptimizer, 5.0),
    ):

        def make_opt(cls=cls):
            return cls(inner_optimizer=optax.sgd(INNER_LR))

        seconds = optimizer_seconds(make_opt(), params, hyperparams, train, val, number, repeats)
        compiles = compilations_over(make_opt, params, hyperparams, train, val, n_compile)
        rows.append((name, seconds / unit, f"≤ {target}×", compiles))
    return rows


# -- HyperDistill (Lee et al., ICLR 2022): the online step and one θ estimation -------------

HD_GAMMA = 0.99
THETA_HORIZONS = (10, 100)


def make_hyperdistill(**kwargs):
    return gradhpo.OnlineHypergradientOptimizer(optax.sgd(INNER_LR), gamma=HD_GAMMA, **kwargs)


def hyperdistill_rows(params, hyperparams, train, val, unit, number, repeats, n_compile):
    """HyperDistill's step (γ = 0.99, θ = 1, t advancing), as the baseline rows."""
    opt = make_hyperdistill()
    seconds = optimizer_seconds(opt, params, hyperparams, train, val, number, repeats)
    compiles = compilations_over(make_hyperdistill, params, hyperparams, train, val, n_compile)
    return [("HyperDistill", seconds / unit, "≤ 1.3× One-Step", compiles)]


def l2_and_lr_train_loss(params, hyperparams, batch):
    return per_parameter_l2_train_loss(params, hyperparams[0], batch)


def relative_rows(params, hyperparams, train, val, number, repeats):
    """HyperDistill step / One-Step step, timed alternately (median of the per-round ratios).

    With per-parameter L2 only, ``α ∂Φ(w*)/∂λ`` needs only the penalty's part of the training
    gradient at ``w*`` (XLA drops the rest); with a learning rate among λ it needs all of it:
    one more training gradient than One-Step, HyperDistill's worst case.
    """
    cases = (
        ("per-parameter L2", hyperparams, optax.sgd(INNER_LR), per_parameter_l2_train_loss),
        (
            "per-parameter L2 + log lr",
            (hyperparams, jnp.log(INNER_LR)),
            lambda h: optax.sgd(jnp.exp(h[1])),
            l2_and_lr_train_loss,
        ),
    )
    rows = []
    for name, lam, inner, loss in cases:
        variants = [("HyperDistill", {})]
        if loss is per_parameter_l2_train_loss:
            variants.append(("HyperDistill, distill_batch", {"distill_batch": True}))
        one_step = gradhpo.OneStepOptimizer(inner)
        timed = [(one_step, one_step.init(params, lam))]
        for _, kwargs in variants:
            opt = gradhpo.OnlineHypergradientOptimizer(inner, gamma=HD_GAMMA, **kwargs)
            extra = {"example_batch": train} if kwargs else {}
            timed.append((opt, opt.init(params, lam, **extra)))
        rounds = []
        for _ in range(repeats):
            seconds = [
                seconds_per_call(
                    lambda s, o=o, loss=loss: o.step(s, train, val, loss, val_loss, 1e-3),
                    state,
                    number=number,
                    repeats=1,
                )
                for o, state in timed
            ]
            rounds.append([t / seconds[0] for t in seconds[1:]])
        medians = np.median(np.asarray(rounds), axis=0)
        rows += [(label, name, float(r)) for (label, _), r in zip(variants, medians, strict=True)]
    return rows


def vjp_seconds(params, hyperparams, train, number, repeats) -> float:
    """Time of one VJP ``α ↦ (α ∂Φ/∂w, α ∂Φ/∂λ)`` of the SGD step: a backward-pass step."""
    phi = gradhpo.InnerStep(optax.sgd(INNER_LR))
    inner_state = phi.init(params, hyperparams)

    @jax.jit
    def vjp(w):
        def step(w, lam):
            return phi(w, inner_state, lam, train, per_parameter_l2_train_loss).params

        alpha_A, alpha_B = jax.vjp(step, w, hyperparams)[1](w)
        leak = 1e-12 * sum(jnp.sum(b) for b in jax.tree.leaves(alpha_B))  # keep α B alive
        return jax.tree.map(lambda x, a: x + 1e-6 * a + leak, w, alpha_A)

    return seconds_per_call(vjp, params, number=number, repeats=repeats)


def theta_rows(params, hyperparams, train, val, unit, vjp, repeats):
    """One θ estimation (Algorithm 4) per horizon T and backward-pass points, in step units."""
    rows = []
    n, d = train["x"].shape
    draw = jax.vmap(lambda k: classification_batch(k, n, d, 10))
    for T in THETA_HORIZONS:
        batches = draw(jax.random.split(jax.random.PRNGKey(T), T))
        for points in ("interpolated", "trajectory"):
            opt = make_hyperdistill(T=T, theta_points=points)

            def setup(s, opt=opt, batches=batches):
                return opt.refit_theta(s, batches, val, per_parameter_l2_train_loss, val_loss)

            state = opt.init(params, hyperparams)
            seconds = seconds_per_call(setup, state, number=1, repeats=repeats)
            rows.append((T, points, seconds / unit, seconds / vjp, seconds / vjp / T))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few repeats")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="the hyperparameters do not enter")
    number, repeats, n_compile = (5, 3, 20) if args.quick else (50, 7, 200)

    params, hyperparams, train, val = setup(args.quick)
    unit = plain_sgd_seconds(params, hyperparams, train, number, repeats)
    rows = baseline_rows(params, hyperparams, train, val, unit, number, repeats, n_compile)
    rows += hyperdistill_rows(params, hyperparams, train, val, unit, number, repeats, n_compile)

    print(
        f"MLP with {n_params(params)} parameters and as many hyperparameters, batch "
        f"{train['y'].shape[0]}, float32, {jax.devices()[0].platform}; plain SGD step = "
        f"{unit * 1e3:.3f} ms"
    )
    header = ("step", "time / plain SGD step", "target", f"compilations over {n_compile} steps")
    print(markdown_table(header, rows))

    print("\nHyperDistill step / One-Step step, same λ and inner optimizer (target ≤ 1.3×):")
    header = ("step", "hyperparameters", "time / One-Step step")
    print(markdown_table(header, relative_rows(params, hyperparams, train, val, number, repeats)))

    vjp = vjp_seconds(params, hyperparams, train, number, repeats)
    print(
        f"\nOne θ estimation (Algorithm 4, γ = {HD_GAMMA}), in plain SGD steps and in VJPs of Φ "
        f"(one VJP = {vjp / unit:.2f} plain steps); it makes T inner steps and 2T VJPs (about "
        "3T VJP-sized passes), and its v_s VJPs are cheap here (λ enters only the L2 penalty):"
    )
    header = ("T", "backward points", "time / plain SGD step", "time / VJP", "VJPs / T")
    print(markdown_table(header, theta_rows(params, hyperparams, train, val, unit, vjp, repeats)))


if __name__ == "__main__":
    main()
