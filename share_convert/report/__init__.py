"""What a checkpoint or a plan says to its reader: the summary, its rendering, the plan's curves.

A lazy facade (:mod:`share_convert.facade`): what users, tests and benchmarks import from here.
"""

from __future__ import annotations

from ..facade import lazy_names

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

__getattr__, __all__ = lazy_names(__name__, _WHERE)
