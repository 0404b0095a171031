"""The baselines a user would pick instead: random search and Optuna's TPE, on a time budget.

Both search a box of fixed hyperparameter values: each trial trains the model from scratch
with λ held fixed (no hypergradient) and scores it by the validation loss; the best trial by
validation loss is the result. A search stops starting trials once its budget is spent; it
always runs at least one trial. The budget counts the trials' training time, measured the way
the gradient methods' time is (the compiled training steps; metrics excluded), so "the same
budget" means the same training compute.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np


class SearchResult(NamedTuple):
    """The best trial of a search.

    Attributes:
      name: ``"random search"`` or ``"TPE (Optuna)"``.
      best: the best λ (a flat numpy vector).
      score: its validation loss.
      payload: what the trial function returned beside the score for the best trial.
      trials: how many trials ran.
      seconds: the training time the trials spent (what the budget counts).
    """

    name: str
    best: np.ndarray
    score: float
    payload: Any
    trials: int
    seconds: float


Trial = Callable[[np.ndarray], tuple[float, Any, float]]
"""``trial(λ) -> (validation loss, payload, training seconds)``."""


def random_search(
    trial: Trial, dim: int, low: float, high: float, budget_s: float, seed: int
) -> SearchResult:
    """Random search: λ uniform in ``[low, high]^dim``, trials until ``budget_s`` is spent.

    Args:
      trial: ``trial(λ) -> (validation loss, payload, training seconds)``.
      dim: the number of hyperparameters.
      low, high: the box.
      budget_s: budget of training seconds (as the trials report them).
      seed: seeds the draws.

    Returns:
      A :class:`SearchResult`.

    Example:
      >>> import numpy as np
      >>> from gradhpo_bench.search import random_search
      >>> r = random_search(lambda lam: (float(np.sum(lam**2)), None, 0.1), 2, -1, 1, 0.25, 0)
      >>> r.trials, r.score <= 2.0
      (3, True)

    References:
      Bergstra & Bengio, "Random Search for Hyper-Parameter Optimization", JMLR 2012.
    """
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, Any] | None = None
    trials, spent = 0, 0.0
    while trials == 0 or spent < budget_s:
        lam = rng.uniform(low, high, dim).astype(np.float32)
        score, payload, seconds = trial(lam)
        trials, spent = trials + 1, spent + seconds
        if best is None or score < best[0]:
            best = (score, lam, payload)
    score, lam, payload = best
    return SearchResult("random search", lam, score, payload, trials, spent)


def optuna_available() -> bool:
    """Whether the optional ``optuna`` extra is installed.

    Example:
      >>> from gradhpo_bench.search import optuna_available
      >>> isinstance(optuna_available(), bool)
      True
    """
    try:
        import optuna  # noqa: F401
    except ImportError:
        return False
    return True


def tpe_search(
    trial: Trial, dim: int, low: float, high: float, budget_s: float, seed: int
) -> SearchResult | None:
    """Optuna's TPE sampler over ``[low, high]^dim``, trials until ``budget_s`` is spent.

    Args:
      trial, dim, low, high, budget_s, seed: as for :func:`random_search`.

    Returns:
      A :class:`SearchResult`, or ``None`` when optuna is not installed.

    Example:
      >>> from gradhpo_bench.search import tpe_search, optuna_available
      >>> r = tpe_search(lambda lam: (float((lam**2).sum()), None, 0.1), 1, -1, 1, 0.01, 0)
      >>> r is None or r.trials >= 1
      True

    References:
      Bergstra et al., "Algorithms for Hyper-Parameter Optimization", NeurIPS 2011 (TPE);
      Akiba et al., "Optuna", KDD 2019.
    """
    if not optuna_available():
        return None
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    payloads: dict[int, Any] = {}
    spent = [0.0]

    def objective(t) -> float:
        lam = np.asarray([t.suggest_float(f"h{i}", low, high) for i in range(dim)], np.float32)
        score, payloads[t.number], seconds = trial(lam)
        spent[0] += seconds
        return score

    while len(study.trials) == 0 or spent[0] < budget_s:
        study.optimize(objective, n_trials=1)
    best = study.best_trial
    lam = np.asarray([best.params[f"h{i}"] for i in range(dim)], np.float32)
    return SearchResult(
        "TPE (Optuna)",
        lam,
        float(best.value),
        payloads[best.number],
        len(study.trials),
        spent[0],
    )
