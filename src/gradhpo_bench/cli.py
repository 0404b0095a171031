"""The ``gradhpo`` command: ``gradhpo demo`` and ``gradhpo bench NAME``.

gradhpo demo runs data hyper-cleaning on scikit-learn's digits with every estimator and
prints a table (test accuracy, AUROC of the learned example weights, cosine with the exact
hypergradient, wall time); gradhpo bench NAME runs one benchmark of the suite. Each
writes a Markdown report and PNG plots into --out. Every subcommand takes --seed; the
benches take --quick (a run of seconds, the CI smoke test).
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import warnings
from collections.abc import Sequence

#: Bench name -> module under gradhpo_bench.
BENCHES = {
    "toys": "toys",
    "fidelity": "fidelity",
    "cleaning": "cleaning_bench",
    "regularization": "regularization",
    "metalearning": "metalearning",
    "cost": "cost",
}

_HELP = {
    "demo": "data hyper-cleaning on digits: every estimator, a table and a plot (≤ 3 min)",
    "toys": "the Greedy toy and the DARTS toy: loss curves and fixed points",
    "fidelity": "cosine and norm ratio of every estimator against the exact hypergradient",
    "cleaning": "hyper-cleaning over seeds and noise levels (digits, or --dataset fashion-mnist)",
    "regularization": "online per-layer L2 tuning of a digits MLP from 5 starts vs grid search",
    "metalearning": "ANIL on sinusoid regression (Lee et al. 2022, App. G): meta-test MSE",
    "cost": "step time and compiled memory against the horizon, every estimator",
}


def _module(name: str):
    return importlib.import_module(f"gradhpo_bench.{name}")


def _common(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--out",
        type=_output_folder,
        default=pathlib.Path("gradhpo-results") / name,
        help=f"output folder (default gradhpo-results/{name})",
    )


def _output_folder(text: str) -> pathlib.Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty string")
    return pathlib.Path(text)


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The ``dest`` of every option of ``parser`` that ``argv`` gives explicitly.

    Example:
      >>> import argparse
      >>> from gradhpo_bench.cli import explicit_options
      >>> p = argparse.ArgumentParser()
      >>> _ = p.add_argument("--seeds", type=int, default=5)
      >>> _ = p.add_argument("--outer-steps", type=int, default=200)
      >>> sorted(explicit_options(p, ["--outer-steps=3"]))
      ['outer_steps']
    """
    given = set()
    for action in parser._actions:
        for option in action.option_strings:
            if any(arg == option or arg.startswith(option + "=") for arg in argv):
                given.add(action.dest)
    return given


def _subparser(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The parser of the subcommand ``args`` came from (``demo`` or ``bench NAME``)."""
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices[args.command]
    if args.command == "demo":
        return sub
    names = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
    return names.choices[args.name]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``gradhpo`` command.

    Returns:
      An ``argparse.ArgumentParser`` with subcommands ``demo`` and ``bench NAME``.

    Example:
      >>> from gradhpo_bench.cli import build_parser
      >>> args = build_parser().parse_args(["bench", "toys", "--quick"])
      >>> args.command, args.name, args.quick
      ('bench', 'toys', True)
    """
    import gradhpo

    parser = argparse.ArgumentParser(
        prog="gradhpo", description=__doc__.split("\n\n")[1].replace("\n", " ")
    )
    parser.add_argument("--version", action="version", version=f"gradhpo {gradhpo.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help=_HELP["demo"], description=_HELP["demo"])
    _common(demo, "demo")
    _module("demo").add_arguments(demo)
    bench = commands.add_parser("bench", help="run one benchmark: " + ", ".join(BENCHES))
    names = bench.add_subparsers(dest="name", required=True, metavar="NAME")
    for name, module in BENCHES.items():
        sub = names.add_parser(name, help=_HELP[name], description=_HELP[name])
        _common(sub, name)
        sub.add_argument("--quick", action="store_true", help="a run of seconds (smoke test)")
        _module(module).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``gradhpo`` command.

    Args:
      argv: the arguments (default ``sys.argv[1:]``).

    Returns:
      The exit status (0). Bad arguments and an unwritable output folder exit with
      status 2 and an argparse-style message before any work starts.
    """
    from gradhpo_bench import report

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = explicit_options(_subparser(parser, args), argv)  # they win over --quick
    module = _module("demo" if args.command == "demo" else BENCHES[args.name])
    check = getattr(module, "check_arguments", None)
    problem = check(args) if check is not None else None
    if problem:
        parser.error(problem)
    try:
        out = report.prepare_output_dir(args.out)
    except report.OutputDirError as err:
        parser.error(str(err))
    report.set_command(argv)
    with warnings.catch_warnings():
        # FO's "the hyperparameters do not enter val_loss_fn" is expected where λ is not in
        # L_val (the reports say FO is zero there).
        warnings.filterwarnings("ignore", message="the hyperparameters do not enter")
        text = module.main(args, out)
    print(text)
    print(f"\nwrote {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))} in {out}")
    return 0
