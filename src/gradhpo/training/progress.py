"""The one progress policy of gradhpo: a bar on a terminal, none under CI, tqdm optional."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("gradhpo")

# Values of the CI variable that mean "not under CI" (unset or empty counts as off too).
_CI_OFF = ("", "0", "false", "no", "off")


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether to draw a progress bar.

    An explicit ``progress`` wins; otherwise a bar is drawn on a terminal (standard error
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
