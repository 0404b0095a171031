"""Shared fixtures: float64 scoped to a test, small problems, the compilation cache."""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

# Persistent compilation cache: repeated local runs skip XLA compilation of unchanged programs.
_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".pytest_cache" / "jax"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's in-memory caches after each test module.

    Every compiled CPU executable keeps its machine code mapped; a suite of this size would
    otherwise pass the kernel's limit on memory mappings (``vm.max_map_count``, 65530 by
    default) in one process, and XLA aborts when a mapping is refused.
    """
    yield
    jax.clear_caches()


@pytest.fixture
def x64():
    """Run the test in float64; the setting does not leak into other tests."""
    with jax.enable_x64(True):
        yield
