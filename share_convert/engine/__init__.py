"""The per-module engine: members, stacks, planning, encoding, grouping, incremental updates, the pipeline over modules.

A lazy facade (:mod:`share_convert.facade`): what users, tests and benchmarks import from here.
"""

from __future__ import annotations

from ..facade import lazy_names

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
    "combine": "combine",
    "combine_module": "combination",
    "consolidate_module": "consolidation",
    "coordinates": "encoding",
    "drift_bound": "planning",
    "encode_in_bases": "encoding",
    "encode_private_only": "encoding",
    "exact_coordinates": "encoding",
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

__getattr__, __all__ = lazy_names(__name__, _WHERE)
