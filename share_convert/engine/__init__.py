"""The per-module engine: members, stacks, planning, encoding, grouping, incremental updates, the pipeline over modules.

This facade names, lazily, what tests, benchmarks and users import (nothing is imported until a
name is asked for, so that light commands start fast); the package's own modules import each
other directly, never through it.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: name -> the module of this package that defines it
_WHERE = {
    "BUDGET_TARGETS": "budget",
    "ConsolidationConfig": "members",
    "FrozenTasks": "fits",
    "ModulePlan": "planning",
    "ModulePlanner": "planning",
    "ModuleStack": "stacks",
    "StoredBases": "encoding",
    "_wider_may_pay": "consolidation",
    "add": "add_tasks",
    "allocate_budget": "budget",
    "check_compatible": "members",
    "consolidate_module": "consolidation",
    "coordinates": "encoding",
    "drift_bound": "planning",
    "encode_in_bases": "encoding",
    "encode_private_only": "encoding",
    "encode_task": "encoding",
    "merge": "pipeline",
    "only_modules": "members",
    "plan_group": "consolidation",
    "prepare_member": "members",
    "prepare_members": "members",
    "quadratic_form": "old_tasks",
    "read_members": "members",
    "remove": "remove_tasks",
    "store_bases": "encoding",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
