"""What a checkpoint or a plan says to its reader: the summary, its rendering, the plan's curves.

This facade names, lazily, what tests, benchmarks and users import (nothing is imported until a
name is asked for, so that light commands start fast); the package's own modules import each
other directly, never through it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: name -> the module of this package that defines it
_WHERE = {
    "MAX_ROWS": "render",
    "plan_collection": "curves",
    "plot_curves": "plots",
    "ratio_ticks": "plots",
    "render": "render",
    "render_plan": "render",
    "storage_role": "summary",
    "summarize": "summary",
    "verdict": "summary",
    "why": "summary",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
