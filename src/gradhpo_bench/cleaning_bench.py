"""``gradhpo bench cleaning``: data hyper-cleaning over seeds and noise levels.

Default: the demo's task (digits, 1000 noisy training examples, 400 clean validation, the
rest clean test; softmax regression, minibatches) for 5 seeds and noise levels 0.3 and 0.5,
mean ± 95 % interval over seeds; random search and Optuna's TPE (where installed) get the
gradient methods' mean training time per run as their budget.

With ``--dataset fashion-mnist`` or ``mnist`` it runs the Greedy paper's protocol (§5.3,
Table 2), read from the standard IDX files in ``--data-dir``: 1000 examples of the training
split whose labels are each replaced by a random class with probability p, the whole test
split (10 000 clean examples) as the validation set the weights are tuned on, full-batch
inner SGD (lr 0.1, momentum 0.9, T = 10 steps per outer update), outer Adam lr 0.1, 200
outer updates, a 3-layer conv net with 8 channels, 5 seeds; no tuning, T1-T2 (the exact
one-step hypergradient), IFT(5) (Neumann), Greedy (γ = 0.9) and exact reverse mode through
the T steps. ``--restart reset`` starts every outer update's T steps from the same
initial weights (the paper does not say); ``--restart warm`` continues one trajectory.
The paper reports accuracy on the split it tunes on; the table gives that number and the
accuracy on 10 000 held-out clean examples of the training split, beside the paper's.
The losses are means over the examples: the paper writes sums, and with lr 0.1 a sum over
1000 examples makes every inner step 1000 times larger, which wrecks the network within
the first outer update.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib

import jax
import numpy as np

from gradhpo_bench import report
from gradhpo_bench.cleaning import MethodResult, make_task, run_method, run_search
from gradhpo_bench.data import (
    IDX_SOURCES,
    cleaning_split,
    digits,
    idx_paths,
    load_idx_dataset,
)
from gradhpo_bench.methods import METHODS, Settings, build, build_all
from gradhpo_bench.metrics import format_interval

#: The Greedy paper's Table 2 (accuracy %, on the tuning split): no tuning, T1-T2, IFT(5),
#: Greedy, per data set and noise level.
PAPER = {
    ("fashion-mnist", 0.3): {"none": 59.46, "t1t2": 62.07, "ift": 60.63, "greedy": 72.57},
    ("fashion-mnist", 0.5): {"none": 53.99, "t1t2": 51.40, "ift": 47.68, "greedy": 66.21},
    ("mnist", 0.3): {"none": 70.46, "t1t2": 66.93, "ift": 71.97, "greedy": 87.06},
    ("mnist", 0.5): {"none": 51.52, "t1t2": 51.86, "ift": 54.14, "greedy": 77.73},
}
SEARCHES = ("random", "tpe")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options (besides ``--seed``, ``--out``, ``--quick``)."""
    parser.add_argument("--dataset", choices=("digits", "fashion-mnist", "mnist"), default="digits")
    parser.add_argument(
        "--data-dir",
        type=pathlib.Path,
        default=None,
        help=f"folder of the IDX files (fashion-mnist default: {IDX_SOURCES['fashion-mnist'][0]})",
    )
    parser.add_argument("--seeds", type=report.positive_int, default=5, help="seeds per cell")
    parser.add_argument(
        "--methods",
        type=_method_list,
        default=list(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default: all)",
    )
    parser.add_argument(
        "--noise", type=report.noise_fraction, nargs="+", default=[0.3, 0.5], help="noise levels"
    )
    parser.add_argument("--outer-steps", type=report.positive_int, default=200)
    parser.add_argument("--batch-size", type=report.positive_int, default=100)
    parser.add_argument(
        "--n-test",
        type=report.positive_int,
        default=2000,
        help="digits-style runs only: held-out examples from the IDX test file",
    )
    parser.add_argument(
        "--restart",
        choices=("warm", "reset"),
        default="warm",
        help="paper protocol (fashion-mnist, mnist): continue one trajectory (warm) or restart "
        "the weights at every outer update (reset)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="paper protocol: run every (seed, method) again instead of resuming from the runs "
        "stored in OUT/runs",
    )


def _method_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from "
            f"{', '.join(METHODS)}"
        )
    return [m for m in METHODS if m in names]


def check_arguments(args: argparse.Namespace) -> str | None:
    """Reject options that do not apply, before any work."""
    explicit = getattr(args, "explicit", ())
    if args.dataset == "digits":
        if args.data_dir is not None:
            return "argument --data-dir: only for --dataset fashion-mnist or mnist"
        for name in ("restart", "fresh"):
            if name in explicit:
                return f"argument --{name}: only for --dataset fashion-mnist or mnist"
        return None
    if "methods" in explicit:
        return "argument --methods: the paper protocol (fashion-mnist, mnist) runs its five methods"
    try:
        idx_paths(args.dataset, args.data_dir)
        _idx_cache(args.dataset, args.data_dir)  # read and checked now, not mid-run
    except (FileNotFoundError, ValueError) as err:
        return f"argument --data-dir: {err}"
    return None


def _load(args: argparse.Namespace, seed: int, noise: float):
    """The split for one seed and noise level, its model name and sizes."""
    if args.dataset == "digits":
        n_train, n_val = (100, 50) if args.quick else (1000, 400)
        x, y = digits()
        return cleaning_split(x, y, n_train=n_train, n_val=n_val, noise=noise, seed=seed), "softmax"
    arrays = _idx_cache(args.dataset, args.data_dir)
    n_train, n_val = (40, 20) if args.quick else (1000, 1000)
    n_test = min(args.n_test, len(arrays["test_labels"]))
    data = cleaning_split(
        arrays["train_images"],
        arrays["train_labels"],
        n_train=n_train,
        n_val=n_val,
        noise=noise,
        seed=seed,
        test=(arrays["test_images"][:n_test], arrays["test_labels"][:n_test]),
    )
    return data, "conv"


_IDX: dict = {}


def _idx_cache(name, folder):
    if (name, folder) not in _IDX:
        _IDX[name, folder] = load_idx_dataset(name, folder)
    return _IDX[name, folder]


def _cell(results: list[MethodResult], field: str) -> str:
    return format_interval([getattr(r, field) for r in results], 100.0, 1)


#: The paper protocol's methods and their names in its Table 2.
PAPER_METHODS = {
    "none": ("none", "no tuning"),
    "one-step": ("t1t2", "T1-T2 (exact one-step)"),
    "neumann": ("ift", "IFT(5) (Neumann)"),
    "greedy": ("greedy", "Greedy (γ = 0.9)"),
    "exact": (None, "exact (reverse mode, T steps)"),
}
HELD_OUT = 10_000


def _paper_split(args, seed: int, noise: float):
    """§5.3: 1000 noisy training examples, validation = the test split, a held-out split."""
    arrays = _idx_cache(args.dataset, args.data_dir)
    x, y = arrays["train_images"], arrays["train_labels"]
    held = 20 if args.quick else min(HELD_OUT, len(y) // 2)
    order = np.random.default_rng(12345).permutation(len(y))  # one fixed held-out split
    pool, rest = order[held:], order[:held]
    n_train = 40 if args.quick else 1000
    n_val = 20 if args.quick else len(arrays["test_labels"])
    return cleaning_split(
        x[pool],
        y[pool],
        n_train=n_train,
        n_val=1,
        noise=noise,
        seed=seed,
        val=(arrays["test_images"][:n_val], arrays["test_labels"][:n_val]),
        test=(x[rest], y[rest]),
        replacement=True,
    )


def paper_main(args: argparse.Namespace, out: pathlib.Path) -> str:
    """The Greedy paper's §5.3 protocol on fashion-mnist or mnist; write the report."""
    seeds = [args.seed + i for i in range(report.quick_value(args, "seeds", 2))]
    noises = report.quick_value(args, "noise", args.noise[:1])
    steps = report.quick_value(args, "outer_steps", 3)
    settings = Settings(T=4 if args.quick else 10)
    methods = [
        dataclasses.replace(build(k, settings), name=PAPER_METHODS[k][1]) for k in PAPER_METHODS
    ]
    reset = args.restart == "reset"
    bar = report.progress_bar(len(seeds) * len(noises) * len(methods) * steps, "cleaning")
    # Each (noise, seed, method) run is stored when it ends: a full run takes hours on a CPU.
    store = report.RunStore(out / "runs", fresh=args.fresh)
    table: dict[tuple[float, str], list[MethodResult]] = {}
    for noise in noises:
        for seed in seeds:
            data = _paper_split(args, seed, noise)
            task, model = make_task(data, "conv", seed, None, 0.0 if reset else None)
            key = jax.random.PRNGKey(seed)
            for m in methods:
                compute = functools.partial(
                    run_method,
                    m,
                    task,
                    data,
                    settings,
                    steps,
                    key,
                    bar,
                    probes=False,
                    evaluate_adapted=reset,
                )
                name = f"{args.dataset}-p{noise}-{args.restart}-seed{seed}-{m.key}"
                fingerprint = (
                    f"{name} quick={args.quick} outer_steps={steps} {settings.describe()} "
                    f"train={len(data.train.y)} val={len(data.val.y)} held={len(data.test.y)}"
                )
                loaded = store.loaded
                r = store.get(MethodResult, name, fingerprint, compute)
                if store.loaded > loaded:
                    bar.update(steps)
                table.setdefault((noise, m.key), []).append(r)
    bar.close()

    header = [
        "method",
        "acc on tuning split (%)",
        "paper (tuning split)",
        "held-out acc (%)",
        "per seed, tuning split (%)",
        "AUROC",
        "time (s)",
    ]
    sections = []
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(noises), figsize=(6 * len(noises), 4.2), squeeze=False)
    for ax, noise in zip(axes[0], noises, strict=True):
        rows = []
        for key in PAPER_METHODS:
            results = table[noise, key]
            paper_key = PAPER_METHODS[key][0]
            value = PAPER.get((args.dataset, noise), {}).get(paper_key)
            rows.append(
                [
                    results[0].label,
                    _cell(results, "val_acc"),
                    "—" if value is None else f"{value:.2f}",
                    _cell(results, "test_acc"),
                    ", ".join(f"{100 * r.val_acc:.1f}" for r in results),
                    format_interval([r.auroc for r in results], 1.0, 3),
                    format_interval([r.seconds for r in results], 1.0, 1),
                ]
            )
            curve = np.mean([r.curve for r in results], axis=0)
            ax.plot(100 * curve, label=results[0].label)
        gain = [
            100 * (g.val_acc - n.val_acc)
            for g, n in zip(table[noise, "greedy"], table[noise, "none"], strict=True)
        ]
        paper = PAPER.get((args.dataset, noise))
        paper_gain = f"{paper['greedy'] - paper['none']:+.2f}" if paper else "—"
        ax.set_title(f"noise {noise}: mean held-out accuracy, {len(seeds)} seeds", fontsize=10)
        report.label_axes(ax, "outer update", "held-out accuracy (%)", legend=7)
        sections += [
            f"## Noise p = {noise}",
            "",
            report.markdown_table(header, rows),
            "",
            f"Greedy − no tuning on the tuning split: {format_interval(gain, 1.0, 2)} points "
            f"(paper {paper_gain}).",
            "",
        ]
    report.save_figure(fig, out / "cleaning.png")
    return report.write_report(
        out / "cleaning.md",
        f"Data hyper-cleaning, the Greedy paper's protocol: {args.dataset}, {len(seeds)} seeds",
        [
            f"Data: {args.dataset}, {len(data.train.y)} training examples, each label replaced "
            f"by a uniformly drawn class with probability p; the tuning (validation) split is "
            f"the first {len(data.val.y)} examples of the test file, clean; held-out: "
            f"{len(data.test.y)} clean examples of the training file, disjoint from the "
            f"training examples. Model: {model.name}. Full-batch inner steps, mean losses; "
            f"{steps} outer updates; weights "
            + (
                "restarted from the same initialisation at every outer update"
                if reset
                else "continued over the outer updates (one trajectory)"
            )
            + f" (--restart {args.restart}). Settings: {settings.describe()}. Cells: mean ± "
            f"95 % interval (Student t) over seeds {seeds[0]}..{seeds[-1]}; the accuracies are "
            "of the weights after the last outer update. The paper: Greedy paper, Table 2. "
            f"Each run is stored in runs/ as it ends; {store.loaded} of the "
            f"{len(seeds) * len(noises) * len(methods)} runs were loaded from an earlier "
            "invocation with the same settings (--fresh runs all again).",
            "",
            *sections,
        ],
    )


def main(args: argparse.Namespace, out: pathlib.Path) -> str:
    """Run the cleaning bench; write ``cleaning.md`` and ``cleaning.png``; return the report."""
    if args.dataset in ("fashion-mnist", "mnist"):
        return paper_main(args, out)
    seeds = [args.seed + i for i in range(report.quick_value(args, "seeds", 2))]
    noises = report.quick_value(args, "noise", args.noise[:1])
    steps = report.quick_value(args, "outer_steps", 5)
    settings = Settings(T=4 if args.quick else 10)
    methods = build_all(args.methods, settings)
    bar = report.progress_bar(len(seeds) * len(noises) * len(methods) * steps, "cleaning")
    table: dict[tuple[float, str], list[MethodResult]] = {}
    trials: dict[tuple[float, str], list[int]] = {}
    model_name = ""
    for noise in noises:
        for seed in seeds:
            data, model = _load(args, seed, noise)
            task, m = make_task(data, model, seed, min(args.batch_size, len(data.train.y)))
            model_name = m.name
            key = jax.random.PRNGKey(seed)
            runs = [
                run_method(x, task, data, settings, steps, key, progress=bar, probes=False)
                for x in methods
            ]
            for method, r in zip(methods, runs, strict=True):
                table.setdefault((noise, method.key), []).append(r)
            tuned = [r for x, r in zip(methods, runs, strict=True) if x.key != "none"]
            budget = float(np.mean([r.seconds for r in tuned or runs]))
            for kind in SEARCHES:
                found = run_search(kind, task, data, settings, steps, key, budget, seed)
                if found is not None:
                    table.setdefault((noise, kind), []).append(found[1])
                    trials.setdefault((noise, kind), []).append(found[0].trials)
    bar.close()

    paper = args.dataset in ("fashion-mnist", "mnist")
    header = ["method", "test acc (%)", "acc on tuning split (%)", "AUROC", "time (s)"]
    if paper:
        header.append("paper (tuning split)")
    sections = []
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(noises), figsize=(6 * len(noises), 4.2), squeeze=False)
    for ax, noise in zip(axes[0], noises, strict=True):
        rows = []
        for key in (*METHODS, *SEARCHES):
            results = table.get((noise, key))
            if not results:
                continue
            label = results[0].label.split(" (")[0] if key in SEARCHES else results[0].label
            if key in SEARCHES:
                label += f" ({np.mean(trials[noise, key]):.0f} trials on average)"
            row = [
                label,
                _cell(results, "test_acc"),
                _cell(results, "val_acc"),
                format_interval([r.auroc for r in results], 1.0, 3),
                format_interval([r.seconds for r in results], 1.0, 2),
            ]
            if paper:
                value = PAPER.get((args.dataset, noise), {}).get(key)
                row.append("—" if value is None else f"{value:.2f}")
            rows.append(row)
            if key in METHODS:
                curve = np.mean([r.curve for r in results], axis=0)
                ax.plot(100 * curve, label=results[0].label)
        if paper and (args.dataset, noise) in PAPER:
            rows.append(
                [
                    "IFT(5) (paper only)",
                    "—",
                    "—",
                    "—",
                    "—",
                    f"{PAPER[args.dataset, noise]['ift']:.2f}",
                ]
            )
        ax.set_title(f"noise {noise}: mean test accuracy over {len(seeds)} seeds", fontsize=10)
        report.label_axes(ax, "outer step", "test accuracy (%)", legend=7)
        sections += [f"## Noise {noise}", "", report.markdown_table(header, rows), ""]
    report.save_figure(fig, out / "cleaning.png")

    data_line = (
        "digits (scikit-learn), 1000 noisy training / 400 clean validation / the rest clean test"
        if args.dataset == "digits" and not args.quick
        else f"{args.dataset}, {len(data.train.y)} noisy training / {len(data.val.y)} clean "
        f"validation (the tuning split) / {len(data.test.y)} clean held-out test"
    )
    return report.write_report(
        out / "cleaning.md",
        f"Data hyper-cleaning: {args.dataset}, {len(seeds)} seeds",
        [
            f"Data: {data_line}; model: {model_name}; minibatches of "
            f"{min(args.batch_size, len(data.train.y))}; {steps} outer steps. Settings: "
            f"{settings.describe()}. Cells: mean ± 95 % interval (Student t) over seeds "
            f"{seeds[0]}..{seeds[-1]}. Random search and TPE draw every λ_i in [-4, 4], train "
            "with λ fixed for the same outer steps, keep the best validation loss; their budget "
            "is the gradient methods' mean training time per run in the same seed (the time "
            "column: compiled steps after compilation, metrics excluded, for both).",
            "",
            *sections,
        ],
    )
