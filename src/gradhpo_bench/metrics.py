"""Metrics of the experiments: AUROC, mean with a 95 % interval."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive``.

    The probability that a random positive scores above a random negative (ties count
    one half): the Mann-Whitney U statistic over the product of the class sizes.

    Args:
      scores: one score per example.
      positive: one boolean per example.

    Returns:
      AUROC in [0, 1]; NaN when one class is empty.

    Example:
      >>> import numpy as np
      >>> from gradhpo_bench.metrics import auroc
      >>> auroc(np.array([0.9, 0.8, 0.1, 0.8]), np.array([True, True, False, False]))
      0.875
    """
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        if count > 1:
            ranks[order[start : start + count]] = start + (count + 1) / 2
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def mean_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t confidence interval.

    Args:
      values: one number per seed (NaNs are dropped).

    Returns:
      ``(mean, half_width)``; the half-width is NaN with fewer than two values.

    Example:
      >>> from gradhpo_bench.metrics import mean_interval
      >>> mean_interval([1.0, 2.0, 3.0])
      (2.0, 2.4841)
    """
    from scipy import stats

    x = np.asarray([v for v in values if not math.isnan(v)], float)
    if len(x) == 0:
        return float("nan"), float("nan")
    if len(x) < 2:
        return float(x.mean()), float("nan")
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half)


def format_interval(values: Sequence[float], scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± half-width"`` of ``values`` times ``scale`` (see :func:`mean_interval`).

    Example:
      >>> from gradhpo_bench.metrics import format_interval
      >>> format_interval([0.5, 0.7], scale=100, digits=1)
      '60.0 ± 127.1'
    """
    mean, half = mean_interval([v * scale for v in values])
    if math.isnan(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"
