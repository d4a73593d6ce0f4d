"""One module's result: its plan, the tensors to write and the tasks' records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint.records import TaskRows
from .planning import ModulePlan, ModulePlanner


@dataclass
class ModuleResult:
    plan: ModulePlan
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    records: Mapping[str, dict[str, Any]] = field(default_factory=dict)  # a dict, or a RecordTable
    #: the planner the plan came from (its tasks' fits serve the grouping)
    planner: ModulePlanner | None = None
    groups: list[dict[str, Any]] | None = None
    #: bases and Gram matrices of the source checkpoint kept byte for byte (continual updates)
    carried: list[str] = field(default_factory=list)
    #: each task's tensors in this module: coef_B, coef_A, private_B, private_A (those it has)
    task_parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    #: the tasks' tensors already stacked (updates of many old tasks); when set, ``task_parts`` is not written
    rows: TaskRows | None = None
