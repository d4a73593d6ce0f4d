"""One module's result: its plan, the tensors to write and the tasks' records."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint.records import TaskRows
from ..math.quantize import CODE_PRECISIONS, Quantized, quantize
from .planning import ModulePlan, ModulePlanner
from .precision import TaskCodes


@dataclass
class ModuleResult:
    """One module computed: its plan, the tensors to write (or copy) and each task's record."""

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
    #: stored role (basis_B, coefs_A, private_B, …) -> precision name; a role not in it is stored in
    #: the module's float dtype, as before precisions existed (docs/format.md)
    precision: dict[str, str] = field(default_factory=dict)
    #: the codes the encoder already made of tasks' rows stored as codes (engine/precision.TaskCodes)
    task_codes: TaskCodes = field(default_factory=TaskCodes)

    def cost(self) -> int:
        """What plans are compared by: bytes where the plan was costed in bytes, else parameters."""
        return self.plan.bytes if self.plan.bytes is not None else self.plan.params


@dataclass
class GroupPart:
    """One group of bases' share of a module with groups (spec, section 6): what its bases cost and
    which tasks use them, their records, and its tensors (computed, copied, or already stacked)."""

    k_B: int
    k_A: int
    kind: str
    params: int
    #: the tasks the group's manifest entry lists, in its order
    tasks: list[str]
    records: Mapping[str, dict[str, Any]]
    #: each task's planned private rank; None: the rank its record shows
    private_ranks: Mapping[str, int] | None = None
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    task_parts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    carried: list[str] = field(default_factory=list)
    rows: TaskRows | None = None
    precision: dict[str, str] = field(default_factory=dict)
    task_codes: TaskCodes = field(default_factory=TaskCodes)
    #: bytes of the group's plan, where it was costed in bytes
    bytes: int | None = None

    @classmethod
    def of(cls, res: ModuleResult, tasks: list[str], private_ranks: Mapping[str, int] | None = None) -> GroupPart:
        """The part of a group computed as a module of its own (its bases under ``g<j>/``)."""
        plan = res.plan
        return cls(plan.k_B, plan.k_A, plan.kind, plan.params, tasks, res.records, private_ranks,
                   res.tensors, res.task_parts, res.carried, res.rows, res.precision, res.task_codes,
                   plan.bytes)  # fmt: skip


def assemble_groups(
    parts: list[GroupPart], order: list[str], alternatives: dict[str, int | None] | None, dtype: torch.dtype
) -> ModuleResult:
    """One module result from its groups' parts (merge's split, or add's update of some groups):
    the plan's sizes summed, one manifest entry per group, each task's record marked with its
    group, in ``order``; the tasks' rows stacked when every part has them stacked."""
    result = ModuleResult(plan=ModulePlan(0, 0, [], [], 0, alternatives))
    result.groups = []
    if parts and all(part.bytes is not None for part in parts):
        result.plan.bytes = sum(part.bytes for part in parts)
    where: dict[str, tuple[int, dict[str, Any]]] = {}
    for j, part in enumerate(parts):
        result.tensors.update(part.tensors)
        result.task_parts.update(part.task_parts)
        result.task_codes.update(part.task_codes)
        result.carried += part.carried
        result.precision.update(part.precision)  # the groups of a module share their precisions
        entry = {"k_B": part.k_B, "k_A": part.k_A, "kind": part.kind, "params": part.params, "tasks": part.tasks}
        result.groups.append(entry)
        result.plan.k_B += part.k_B
        result.plan.k_A += part.k_A
        result.plan.params += part.params
        for task, rec in part.records.items():
            where[task] = (j, rec)
    for task in order:
        j, rec = where[task]
        result.records[task] = dict(rec, group=j)
        ranks = parts[j].private_ranks
        result.plan.private_ranks.append(ranks[task] if ranks is not None else rec["private_rank"])
        result.plan.predicted_errors.append(rec["error"])
    if parts and all(part.rows is not None for part in parts):
        result.rows = TaskRows.concat([part.rows for part in parts], dtype)
    if result.rows is not None and result.precision:
        result.rows.precision = rows_precision(result.precision)
    return result


def rows_precision(precision: dict[str, str]) -> dict[str, str]:
    """The precisions of a module's stacked per-task tensors (coefs_*, private_*): TaskRows.precision."""
    return {role: p for role, p in precision.items() if role.startswith(("coefs_", "private_"))}


def module_rows(name: str, res: ModuleResult, dtype: torch.dtype) -> TaskRows:
    """The module's per-task tensors stacked as the format stores them (``res.rows`` when an update
    stacked them already), with the precisions of its stacked roles."""
    if res.rows is not None:
        return res.rows
    tasks = []
    for task, rec in res.records.items():
        prefix = f"modules/{name}/g{rec['group']}/" if res.groups else f"modules/{name}/"
        tasks.append((task, prefix, res.task_parts.get(task, {})))
    rows = TaskRows.of_parts(tasks, dtype)
    rows.precision = rows_precision(res.precision)
    return rows


def quantize_for_writing(name: str, res: ModuleResult, dtype: torch.dtype) -> None:
    """Stack the module's rows and quantize what it stores as codes, on the thread (or Ray worker) that
    computed the module, so that the writer, which takes modules one at a time, only writes bytes.
    Quantizing is deterministic and row by row: the codes are those the writer would compute, and a
    stacked tensor whose every task's rows the encoder already quantized (``res.task_codes``) is the
    stack of those codes."""
    if not any(p in CODE_PRECISIONS for p in res.precision.values()):
        return
    for tname, tensor in res.tensors.items():
        precision = res.precision.get(tname.rsplit("/", 1)[-1])
        if precision in CODE_PRECISIONS and isinstance(tensor, torch.Tensor):
            res.tensors[tname] = quantize(tensor, precision)
    fresh = res.rows is None  # stacked from res.task_parts below, in the order of res.records
    rows = module_rows(name, res, dtype)
    stacked = [(f"{prefix}coefs_{side}", f"coefs_{side}", part, prefix) for prefix, pair in rows.coefs.items()
               for side, part in zip("BA", pair)]  # fmt: skip
    if rows.private is not None:
        stacked += [(f"private_{side}", f"private_{side}", part, None) for side, part in zip("BA", rows.private)]
    for key, role, part, prefix in stacked:
        precision = rows.precision.get(role)
        if precision in CODE_PRECISIONS and key not in rows.codes:
            known = _known_codes(name, res, role, prefix, precision) if fresh else None
            rows.codes[key] = (
                known if known is not None and known.shape == tuple(part.shape) else quantize(part, precision)
            )
    res.rows = rows
    res.task_codes = TaskCodes()


def _known_codes(name: str, res: ModuleResult, role: str, prefix: str | None, precision: str) -> Quantized | None:
    """The codes of the stacked ``role`` (coefs_B of the tasks under ``prefix``, or private_A, …) gathered
    from the batches the encoder quantized, in :meth:`TaskRows.of_parts`'s order; None when a task
    lacks them. One gather of rows, not one object per task (a module may have thousands)."""
    key = role.replace("coefs_", "coef_")
    batches: dict[int, int] = {}  # id of a batch's Quantized -> its index in `sources`
    sources: list[Quantized] = []
    runs: list[list[int]] = []  # [source, start, stop], consecutive rows of one source merged
    for task, rec in res.records.items():
        if key not in res.task_parts.get(task, {}):
            continue
        if prefix is not None and res.groups and prefix != f"modules/{name}/g{rec['group']}/":
            continue
        where = res.task_codes.get(task, {}).get(key)
        if where is None or where[0].precision != precision:
            return None
        codes, start, stop = where
        source = batches.setdefault(id(codes), len(sources))
        if source == len(sources):
            sources.append(codes)
        if runs and runs[-1][0] == source and runs[-1][2] == start:
            runs[-1][2] = stop
        else:
            runs.append([source, start, stop])
    if not runs:
        return None
    sources = [q if q.codes.device.type == "cpu" else _on_cpu(q) for q in sources]
    if len(runs) == 1:
        source, start, stop = runs[0]
        return sources[source].rows(start, stop)
    offsets = [0]
    for q in sources:
        offsets.append(offsets[-1] + q.shape[0])
    # rows start … stop − 1 of each run, as rows of the sources stacked: one index for them all
    first = torch.tensor([offsets[s] + a for s, a, _ in runs], dtype=torch.int64)
    length = torch.tensor([b - a for _, a, b in runs], dtype=torch.int64)
    before = torch.cumsum(length, 0) - length  # where each run's rows begin in the index
    index = torch.arange(int(length.sum())) + torch.repeat_interleave(first - before, length)
    whole = Quantized.stack(sources) if len(sources) > 1 else sources[0]
    rows = int(index.numel())
    return Quantized(precision, whole.codes.index_select(0, index), whole.scales.index_select(0, index),
                     (rows, whole.shape[1]), whole.block)  # fmt: skip


def _on_cpu(q: Quantized) -> Quantized:
    return Quantized(q.precision, q.codes.cpu(), q.scales.cpu(), q.shape, q.block)
