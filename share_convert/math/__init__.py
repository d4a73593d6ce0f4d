"""The method's mathematics: canonical factors, bases, traces and errors, bounds.

This facade names, lazily, what tests, benchmarks and users import (nothing is imported until a
name is asked for, so that light commands start fast); the package's own modules import each
other directly, never through it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: name -> the module of this package that defines it
_WHERE = {
    "block_form": "bounds",
    "drift_bound": "bounds",
    "frobenius2": "traces",
    "quadratic_form": "bounds",
    "trace_product": "traces",
    "canonicalize": "linalg",
    "canonicalize_padded": "linalg",
    "left_batched": "linalg",
    "principal_basis": "linalg",
    "relative_error": "linalg",
    "residual_spectrum": "linalg",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
