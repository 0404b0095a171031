"""Type aliases used across gradhpo."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

PyTree = Any
"""Any JAX pytree (nested tuples, lists, dicts, registered classes) of arrays."""

Batch = Any
"""A batch of data: any pytree of arrays the loss functions accept."""

LossFn = Callable[[PyTree, PyTree, Batch], Any]
"""``loss(params, hyperparams, batch) -> scalar``; used for both ``L_train`` and ``L_val``."""

UpdateFn = Callable[[PyTree, PyTree, Batch], PyTree]
"""``update_fn(params, hyperparams, batch) -> new_params``: a custom inner step Φ."""

OptimizerFactory = Callable[[PyTree], optax.GradientTransformation]
"""``factory(hyperparams) -> GradientTransformation``: an inner optimizer with tunable settings."""

InnerOptimizer = optax.GradientTransformation | OptimizerFactory
"""The inner optimizer: an optax transformation, or a factory of one from the hyperparameters."""
