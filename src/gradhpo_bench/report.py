"""Reports of the experiments: output folders, Markdown tables, plots, progress, provenance."""

from __future__ import annotations

import math
import os
import pathlib
import platform
import shlex
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradhpo.training.progress import progress_bar as _progress_bar
from gradhpo.training.progress import progress_enabled as _progress_enabled


class OutputDirError(ValueError):
    """The output folder cannot be created or written."""


def quick_value(args: Any, name: str, quick: Any) -> Any:
    """Option ``name`` for this run: ``quick`` under ``--quick``, unless given explicitly.

    Explicit flags win over ``--quick`` (the command line's ``args.explicit`` names them).

    Example:
      >>> import argparse
      >>> from gradhpo_bench.report import quick_value
      >>> args = argparse.Namespace(quick=True, seeds=7, explicit={"seeds"}, steps=200)
      >>> quick_value(args, "seeds", 2), quick_value(args, "steps", 5)
      (7, 5)
    """
    if getattr(args, "quick", False) and name not in getattr(args, "explicit", ()):
        return quick
    return getattr(args, name)


def prepare_output_dir(path: str | pathlib.Path) -> pathlib.Path:
    """Create ``path`` (and parents) and check that a file can be written in it.

    Called before any work starts, so an unwritable folder fails at once.

    Args:
      path: the output folder.

    Returns:
      The folder as a ``Path``.

    Raises:
      OutputDirError: it exists as a file, cannot be created, or is not writable.

    Example:
      >>> import tempfile, pathlib
      >>> from gradhpo_bench.report import prepare_output_dir
      >>> prepare_output_dir(pathlib.Path(tempfile.mkdtemp()) / "a" / "b").is_dir()
      True
    """
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output folder {path} exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".gradhpo-write-test-"):
            pass
    except OSError as err:
        raise OutputDirError(
            f"cannot write to output folder {path}: {err.strerror or err}; choose another "
            "with --out"
        ) from None
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        tiny = 0 < abs(value) < 1e-3
        return f"{value:.3g}" if tiny or abs(value) >= 1e4 else f"{value:.3f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; floats with three decimals (three significant digits below 1e-3).

    Example:
      >>> from gradhpo_bench.report import markdown_table
      >>> print(markdown_table(["a", "b"], [["x", 0.12345], ["y", float("nan")]]))
      | a | b |
      |---|---|
      | x | 0.123 |
      | y | — |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def parse_markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in ``text``, as lists of ``{column: cell}`` rows.

    Example:
      >>> from gradhpo_bench.report import parse_markdown_tables
      >>> parse_markdown_tables("x\\n| a | b |\\n|---|---|\\n| 1 | 2 |\\n")
      [[{'a': '1', 'b': '2'}]]
    """
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip("|").split("|")]
                rows.append(dict(zip(header, cells, strict=True)))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


_COMMAND: list[str] | None = None


def set_command(argv: Sequence[str]) -> None:
    """Record the ``gradhpo`` arguments that reports state (:func:`provenance`)."""
    global _COMMAND
    _COMMAND = list(argv)


def provenance(argv: Sequence[str] | None = None) -> str:
    """Markdown lines stating the command and the versions that produced a report.

    Example:
      >>> from gradhpo_bench.report import provenance
      >>> "gradhpo demo --quick" in provenance(["demo", "--quick"])
      True
    """
    import jax
    import numpy as np
    import optax

    import gradhpo

    if argv is None:
        argv = sys.argv[1:] if _COMMAND is None else _COMMAND
    command = "gradhpo " + " ".join(shlex.quote(a) for a in argv)
    versions = (
        f"gradhpo {gradhpo.__version__}, jax {jax.__version__}, optax {optax.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}"
    )
    device = f"{jax.devices()[0].platform}, {os.cpu_count()} CPU cores, {platform.machine()}"
    return f"Command: `{command}`  \nVersions: {versions}  \nDevice: {device}\n"


def write_text(path: pathlib.Path, text: str) -> pathlib.Path:
    """Write ``text`` (with a final newline) and return the path."""
    path.write_text(text.rstrip("\n") + "\n")
    return path


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (imported lazily)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: pathlib.Path) -> pathlib.Path:
    """Save ``fig`` as a PNG at 110 dpi, close it, return the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def progress_enabled() -> bool:
    """Whether to draw a progress bar: gradhpo's one policy (a terminal, and not under CI).

    Example:
      >>> import os
      >>> from unittest import mock
      >>> from gradhpo_bench.report import progress_enabled
      >>> with mock.patch.dict(os.environ, {"CI": "true"}):
      ...     progress_enabled()
      False
    """
    return _progress_enabled(None)


def progress_bar(total: int, desc: str):
    """A bar over ``total`` outer steps where :func:`progress_enabled`, else a no-op.

    Returns:
      An object with ``update(n)`` and ``close()``.
    """
    return _progress_bar(total, desc, "outer step")


def positive_int(text: str) -> int:
    """An ``argparse`` type: an integer >= 1.

    Example:
      >>> from gradhpo_bench.report import positive_int
      >>> positive_int("3")
      3
    """
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def noise_fraction(text: str) -> float:
    """An ``argparse`` type: a fraction of corrupted labels in [0, 0.9].

    Example:
      >>> from gradhpo_bench.report import noise_fraction
      >>> noise_fraction("0.3")
      0.3
    """
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.9], got {text!r}") from None
    if not 0.0 <= value <= 0.9:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.9], got {value}")
    return value


def write_report(path: pathlib.Path, title: str, lines: Sequence[str]) -> str:
    """Write a Markdown report: ``# title``, the :func:`provenance` lines, then ``lines``.

    Args:
      path: the ``.md`` file to write.
      title: the heading.
      lines: the body, one string per line (tables are single strings).

    Returns:
      The report's text.

    Example:
      >>> import pathlib, tempfile
      >>> from gradhpo_bench.report import write_report
      >>> path = pathlib.Path(tempfile.mkdtemp()) / "r.md"
      >>> write_report(path, "Title", ["body"]).splitlines()[0]
      '# Title'
    """
    text = "\n".join([f"# {title}", "", provenance(), *lines])
    write_text(path, text)
    return text


class RunStore:
    """Finished runs of a long bench, one ``.npz`` file each, so an interrupted bench resumes.

    A run is a ``NamedTuple`` of strings, numbers and arrays, stored under its ``name`` with
    a ``fingerprint`` (a string of every setting that changes its result). A later call with
    the same name and fingerprint loads it instead of running it again; a different
    fingerprint runs it again and replaces the file.

    Args:
      folder: where the files go (created on the first store).
      fresh: ignore stored runs (run everything again, replacing the files).

    Example:
      >>> import pathlib, tempfile
      >>> from typing import NamedTuple
      >>> import numpy as np
      >>> from gradhpo_bench.report import RunStore
      >>> class R(NamedTuple):
      ...     label: str
      ...     value: float
      ...     curve: np.ndarray
      >>> store = RunStore(pathlib.Path(tempfile.mkdtemp()))
      >>> first = store.get(R, "seed0", "lr=0.1", lambda: R("a", 1.5, np.arange(3.0)))
      >>> again = store.get(R, "seed0", "lr=0.1", lambda: R("never run", 0.0, np.zeros(0)))
      >>> again.label, again.value, again.curve.tolist(), store.loaded
      ('a', 1.5, [0.0, 1.0, 2.0], 1)
    """

    def __init__(self, folder: pathlib.Path, fresh: bool = False):
        self.folder, self.fresh, self.loaded = pathlib.Path(folder), fresh, 0

    def get(self, cls: type, name: str, fingerprint: str, compute):
        """The stored run ``name`` (a ``cls``) if its fingerprint matches, else ``compute()``."""
        path = self.folder / f"{name}.npz"
        if not self.fresh and path.is_file():
            with np.load(path, allow_pickle=False) as stored:
                if str(stored["_fingerprint"]) == fingerprint:
                    self.loaded += 1
                    return cls(**{f: _unpack(stored[f]) for f in cls._fields})
        result = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez(
            partial,
            _fingerprint=fingerprint,
            **{f: np.asarray(v) for f, v in result._asdict().items()},
        )
        os.replace(partial, path)  # a run is stored whole or not at all
        return result


def _unpack(value):
    return value.item() if value.ndim == 0 else value


def label_axes(ax, xlabel: str, ylabel: str | None = None, *, xlog=False, ylog=False, legend=8):
    """Labels, log scales, a light grid and a legend (font size ``legend``; 0 for none)."""
    ax.set_xlabel(xlabel)
    if ylabel is not None:
        ax.set_ylabel(ylabel)
    if xlog:
        ax.set_xscale("log")
    if ylog:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend)


def publish(out: pathlib.Path, stem: str, fig: Any, title: str, lines: Sequence[str]) -> str:
    """Save ``fig`` as ``out/stem.png`` and the report as ``out/stem.md``; return the report."""
    save_figure(fig, out / f"{stem}.png")
    return write_report(out / f"{stem}.md", title, lines)
