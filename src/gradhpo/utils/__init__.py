"""Utilities: pytree arithmetic, compilation counting, dependence checks."""

from gradhpo.utils.compile import CompilationCounter, count_compilations
from gradhpo.utils.dependence import output_depends_on
from gradhpo.utils.tree import (
    all_finite,
    is_inexact,
    leading_axis_length,
    stack_batches,
    tree_add,
    tree_cosine,
    tree_dot,
    tree_lerp,
    tree_norm,
    tree_scale,
    tree_select,
)

__all__ = [
    "CompilationCounter",
    "all_finite",
    "count_compilations",
    "is_inexact",
    "leading_axis_length",
    "output_depends_on",
    "stack_batches",
    "tree_add",
    "tree_cosine",
    "tree_dot",
    "tree_lerp",
    "tree_norm",
    "tree_scale",
    "tree_select",
]
