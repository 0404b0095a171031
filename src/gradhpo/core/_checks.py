"""Argument validation shared by every optimizer and loop: one message per kind of mistake."""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def positive_int(name: str, value: Any) -> int:
    """``value`` as an ``int >= 1`` (numpy integers accepted); a ValueError naming ``name``.

    Example:
      >>> import numpy as np
      >>> from gradhpo.core._checks import positive_int
      >>> positive_int("T", np.int64(3))
      3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def real_in(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``).

    Example:
      >>> from gradhpo.core._checks import real_in
      >>> real_in("gamma", 0.5, 0.0, 1.0)
      0.5
    """
    bracket = "(" if low_open else "["
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and (low < value if low_open else low <= value)
        and value <= high
    )
    if not ok:
        raise ValueError(f"{name} must be a number in {bracket}{low:g}, {high:g}], got {value!r}")
    return float(value)


def lr_hyper_rule(has_outer_optimizer: bool, lr_hyper: Any, *, schedules: bool = False) -> None:
    """The ``lr_hyper`` rule: required without an ``outer_optimizer``, ``None`` with one.

    Args:
      has_outer_optimizer: whether the optimizer was built with an ``outer_optimizer``.
      lr_hyper: the value given.
      schedules: a callable (a schedule of the hyper-update count) is accepted too.

    Example:
      >>> from gradhpo.core._checks import lr_hyper_rule
      >>> lr_hyper_rule(False, 0.1)
      >>> lr_hyper_rule(True, 0.1)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: lr_hyper must be None when the optimizer has an outer_optimizer ...
    """
    if has_outer_optimizer:
        if lr_hyper is not None:
            raise ValueError(
                "lr_hyper must be None when the optimizer has an outer_optimizer (its own "
                "learning rate or optax schedule sets the step size); got a value"
            )
        return
    if lr_hyper is None:
        accepted = "a float, a scalar array" + (
            ", an optax schedule or a callable of the hyper-update count" if schedules else ""
        )
        raise ValueError(
            f"lr_hyper is required ({accepted}: the step size of gradient descent on the "
            "hyperparameters) when the optimizer has no outer_optimizer"
        )
    if schedules and callable(lr_hyper):
        return
    if isinstance(lr_hyper, bool) or not isinstance(
        lr_hyper, numbers.Real | jax.Array | np.ndarray | np.generic
    ):
        raise TypeError(f"lr_hyper must be a float or a scalar array, got {lr_hyper!r}")
    if jnp.shape(lr_hyper) != ():
        raise ValueError(f"lr_hyper must be a scalar, got shape {jnp.shape(lr_hyper)}")
    if not jnp.issubdtype(jnp.result_type(lr_hyper), jnp.number) or jnp.issubdtype(
        jnp.result_type(lr_hyper), jnp.complexfloating
    ):
        raise TypeError(f"lr_hyper must be a real number, got dtype {jnp.result_type(lr_hyper)}")
    if isinstance(lr_hyper, jax.core.Tracer):
        return  # traced (inside the caller's jit): its value is not known here
    value = float(lr_hyper)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"lr_hyper must be a finite number >= 0, got {value}")


def flag(name: str, value: Any) -> bool:
    """``value`` as a ``bool``: ``True``/``False`` (numpy booleans too); anything else refused.

    A string such as ``"no"`` is an error, never ``True``.

    Example:
      >>> from gradhpo.core._checks import flag
      >>> flag("strict", False)
      False
    """
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)
