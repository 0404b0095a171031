"""``gradhpo bench cleaning``: data hyper-cleaning over seeds and noise levels.

Default: the demo's task (digits, 1000 noisy training examples, 400 clean validation, the
rest clean test; softmax regression) for 5 seeds and noise levels 0.3 and 0.5, mean ± 95 %
interval over seeds. With ``--dataset fashion-mnist`` or ``mnist`` it runs the Greedy
paper's protocol (its Table 2): 1000 training examples, a 3-layer conv net with 8 channels,
inner SGD lr 0.1 momentum 0.9, T = 10, outer Adam lr 0.1, 200 outer updates, γ = 0.9, read
from the standard IDX files in ``--data-dir``. The paper reports accuracy on the clean split
it tunes on; the table gives that number and the accuracy on a held-out split, beside the
paper's. Random search and Optuna's TPE (where installed) get the gradient methods' mean
training time per run as their budget.
"""

from __future__ import annotations

import argparse
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
from gradhpo_bench.methods import METHODS, Settings, build_all
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
        help="held-out examples from the IDX test file",
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
    if args.dataset == "digits":
        if args.data_dir is not None:
            return "argument --data-dir: only for --dataset fashion-mnist or mnist"
        return None
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


def main(args: argparse.Namespace, out: pathlib.Path) -> str:
    """Run the cleaning bench; write ``cleaning.md`` and ``cleaning.png``; return the report."""
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
