"""The one progress policy of gradhpo: a bar on a terminal, none under CI, tqdm optional."""

from __future__ import annotations

import logging
import os
import sys
import time

import jax

logger = logging.getLogger("gradhpo")


class _PrimaryProcessOnly(logging.Filter):
    """Under several processes (``jax.distributed``), only process 0 logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return jax.process_index() == 0


logger.addFilter(_PrimaryProcessOnly())

# Values of the CI variable that mean "not under CI" (unset or empty counts as off too).
_CI_OFF = ("", "0", "false", "no", "off")


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to draw a progress bar.

    Under several processes only process 0 draws one. Otherwise an explicit ``progress``
    wins; without one, a bar is drawn on a terminal (standard error
    is a TTY) unless the ``CI`` environment variable is set to anything but
    ``""``, ``0``, ``false``, ``no`` or ``off`` (so ``CI=true``, ``CI=1`` and ``CI=on``
    all turn it off).

    Example:
      >>> import os
      >>> from unittest import mock
      >>> from gradhpo.training.progress import progress_enabled
      >>> with mock.patch.dict(os.environ, {"CI": "on"}):
      ...     progress_enabled(), progress_enabled(True)
      (False, True)
    """
    if jax.process_index() != 0:  # several processes: process 0 draws the one bar
        return False
    if progress is not None:
        return bool(progress)
    if os.environ.get("CI", "").strip().lower() not in _CI_OFF:
        return False
    return sys.stderr.isatty()


class _NoProgress:
    """The bar where none is drawn: the same methods, doing nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, progress: bool | None = None):
    """A tqdm bar of ``total`` units where :func:`progress_enabled`, else a no-op object.

    tqdm is optional: without it there is no bar (a note on the ``"gradhpo"`` logger).

    Returns:
      An object with ``update(n)``, ``set_postfix(**values)`` and ``close()``.

    Example:
      >>> from gradhpo.training.progress import progress_bar
      >>> bar = progress_bar(10, "demo", "episode", progress=False)
      >>> bar.update(1); bar.close()
    """
    if not progress_enabled(progress):
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        logger.info("tqdm is not installed: no progress bar")
        return _NoProgress()
    return tqdm(total=total, desc=desc, unit=unit, leave=False)


class StepBar:
    """The training loops' bar over inner steps, with compilation shown as its own phase.

    Until the first compiled program has run, the bar reads ``"<name> (compiling)"``;
    then it counts inner steps, advanced from inside a compiled episode by
    :func:`report` (a host callback every few windows) or by the host between windows.
    The seconds spent compiling are shown beside it.

    Example:
      >>> from gradhpo.training.progress import StepBar
      >>> bar = StepBar(100, "demo", progress=False)
      >>> bar.advance(10); bar.sync(20); bar.close()
      >>> bar.count, bar.values["compile"].endswith("s")
      (20, True)
    """

    def __init__(self, total: int, name: str, progress: bool | None = None):
        self.name, self.bar = name, progress_bar(total, f"{name} (compiling)", "step", progress)
        self.shown = not isinstance(self.bar, _NoProgress)
        self.count = 0
        self.started = time.perf_counter()
        self.compiling = True
        self.values: dict[str, str] = {}
        _ACTIVE.append(self)

    def ran(self) -> None:
        """A compiled program has started running: the compiling phase is over."""
        if self.compiling:
            self.compiling = False
            seconds = time.perf_counter() - self.started
            logger.debug("%s: compiled and started in %.1f s", self.name, seconds)
            self.values["compile"] = f"{seconds:.1f}s"
            if self.shown:
                self.bar.set_description(self.name, refresh=False)
                self.bar.set_postfix(**self.values)

    def advance(self, steps: int) -> None:
        """``steps`` more inner steps done."""
        self.ran()
        self.count += steps
        self.bar.update(steps)

    def sync(self, count: int) -> None:
        """Exactly ``count`` inner steps done (an episode's end: no tick is lost)."""
        if count != self.count:
            self.advance(count - self.count)

    def postfix(self, **values: str) -> None:
        """Values shown after the bar (beside the compile time)."""
        self.values.update(values)
        if self.shown:
            self.bar.set_postfix(**self.values)

    def close(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self.bar.close()


_ACTIVE: list[StepBar] = []  # the bar of the run in progress, for the compiled callbacks


def advance(steps) -> None:
    """Advance the bar of the run in progress by ``steps`` inner steps (none: nothing)."""
    if _ACTIVE:
        _ACTIVE[-1].advance(int(steps))


def report(window: jax.Array, stride: int, window_steps: int) -> None:
    """Inside a compiled episode: after every ``stride``-th window, advance the bar.

    A host callback once per ``stride`` windows (only in programs compiled with a bar);
    nothing in the computation depends on it.
    """
    jax.lax.cond(
        (window + 1) % stride == 0,
        lambda: jax.debug.callback(advance, stride * window_steps),
        lambda: None,
    )
