"""How much a collection of adapters shares: error against compression curves (spec, section 6).

:func:`plan_collection` reads the adapters module by module (like ``merge``, without writing
anything) and, for a range of storage budgets, finds the mean ΔW error of

- ``shared``: pure sharing (q = 0) with tasks weighted equally in the basis fit;
- ``shared_unweighted``: pure sharing weighted by ‖ΔW‖ (the paper's plain method);
- ``private``: no sharing, every task keeps the same number of its own top directions;
- ``private_allocated``: no sharing, ranks allocated across tasks where they lower the error most;
- ``mixed``: the planner's best mix of shared bases and private corrections per module;
- ``groups``: the same, with the tasks of each module also split into 2–4 groups with separate
  bases where that lowers the error (the best of one group and the splits is kept).

``precision_curves`` add the second axis of a plan (issue 24): per way of storing the factors
(:data:`PRECISION_CHOICES`: the float dtype, a half type, int8, int8 with 4-bit private factors,
4-bit everywhere) and per error target, the planner's least-bytes structure whose predicted error
(structure plus rounding, engine/precision.py) meets the target: its size in bytes against the
originals' bytes, and that predicted mean error. The default plan says where ``--precision`` lands.

Budgets are applied per module in proportion to its original size; errors are aggregated as in
the report (per task, the mean over its modules; then the mean over tasks). Compression ratios
count the tasks' heads (``modules_to_save``) on both sides, as ``merge``'s report does, so the
default plan's ratio here is the one ``merge`` reports (up to the small Gram matrices a checkpoint
stores beside each shared basis, which are not counted here).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..dtypes import itemsize
from ..engine.budget import BUDGET_TARGETS, allocate_budget
from ..engine.grouping import cluster_tasks
from ..engine.members import (
    ConsolidationConfig,
    Progress,
    TaskSource,
    check_compatible,
    prepare_member,
    storage_dtype,
)
from ..engine.precision import Precisions, half_type, plan_bytes, plan_for, precision_plans, predicted_metric
from ..engine.stacks import ModuleStack
from ..errors import InvalidOptionError
from .summary import base_model_warning

STRATEGIES = ("shared_unweighted", "shared", "private", "private_allocated", "mixed", "groups")
DEFAULT_RATIOS = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0)
MAX_K = 512
#: The error targets of the precision curves (mean ΔW error per module).
PRECISION_TARGETS = (0.02, 0.05, 0.1, 0.2, 0.3)


def precision_choices(dtype) -> dict[str, Precisions]:
    """The ways of storing factors the curves compare, by name (bases/coefficients/private)."""
    half = half_type(dtype)
    return {
        "float": Precisions(),
        half: Precisions.uniform(half),
        "int8": Precisions.uniform("int8"),
        "int8/int8/nf4": Precisions("int8", "int8", "nf4"),
        "nf4": Precisions.uniform("nf4"),
    }


def _aggregate(errors: dict[str, list[float]]) -> float:
    per_task = [sum(v) / len(v) for v in errors.values() if v]
    return sum(per_task) / len(per_task) if per_task else 0.0


def plan_collection(
    sources: Sequence[TaskSource],
    config: ConsolidationConfig | None = None,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Error-against-compression curves for every strategy, and the default plan's place on them."""
    config = config or ConsolidationConfig()
    config.validate()
    if not sources:
        raise InvalidOptionError("no inputs were given", hint="Pass adapter folders, files or globs")
    modules = check_compatible(sources)
    curves = {s: {r: {"params": 0, "errors": {}} for r in ratios} for s in STRATEGIES}
    chosen = {"params": 0, "errors": {}}
    at_chosen = {s: {"params": 0, "errors": {}} for s in ("shared", "private")}
    original = 0
    kinds = {"shared": 0, "mixed": 0, "private": 0}
    ladders: dict[str, tuple[list[str], list]] = {}
    dtype = storage_dtype(config, [s.weights_dtype for s in sources])
    choices = precision_choices(dtype)
    by_precision = {c: {eps: {"bytes": 0, "errors": {}} for eps in PRECISION_TARGETS} for c in choices}
    chosen_bytes, original_bytes = 0, 0
    chosen_precision: dict[str, int] = {}
    eq_cfg = replace(config, weighting="equal")
    norm_cfg = replace(config, weighting="norm")
    for step, (name, (n, d, idx)) in enumerate(modules.items()):
        if progress:
            progress(name, step, len(modules))
        members = [prepare_member(sources[i].task, sources[i].read_module(name), config) for i in idx]
        tasks = [m.task for m in members]
        stack_eq = ModuleStack(n, d, members, eq_cfg)
        K = min(stack_eq.full, MAX_K)
        planner = stack_eq.fit(K)[4]
        plain = ModuleStack(n, d, members, norm_cfg).fit(K)[4]
        orig = planner.original_params()
        original += orig
        original_bytes += sum(m.rank * (n + d) * itemsize(sources[i].weights_dtype) for m, i in zip(members, idx))
        splits = []
        for G in range(2, min(4, len(members) // 2) + 1):
            labels = cluster_tasks(planner.fits, G)
            parts = [[i for i, lab in enumerate(labels) if lab == g] for g in sorted(set(labels))]
            if len(parts) > 1:
                splits.append(
                    [(idx, ModuleStack(n, d, [members[i] for i in idx], eq_cfg).fit(MAX_K)[4]) for idx in parts]
                )

        def record(bucket: dict, plan, tasks=tasks) -> None:
            bucket["params"] += plan.params
            for t, e in zip(tasks, plan.predicted_errors):
                bucket["errors"].setdefault(t, []).append(e)

        # the planner's mix spends each budget across modules, as merge --budget does
        ladders[name] = (tasks, [planner.for_target(eps, "mean") for eps in BUDGET_TARGETS])

        for r in ratios:
            budget = int(orig / r)
            record(curves["shared_unweighted"][r], plain.pure_sharing(budget))
            record(curves["shared"][r], planner.pure_sharing(budget))
            record(curves["private"][r], planner.truncation(budget))
            record(curves["private_allocated"][r], planner.truncation_allocated(budget))
            mixed = planner.for_budget(budget)
            record(curves["groups"][r], best_split(mixed, splits, budget, orig, len(tasks)))
        default = planner.for_target(config.target_error, config.target_metric)
        kinds[default.kind] += 1
        record(chosen, default)
        at_target = {eps: planner.for_target(eps, "mean") for eps in PRECISION_TARGETS}
        for c, choice in choices.items():
            for eps in PRECISION_TARGETS:
                bucket = by_precision[c][eps]
                if choice.is_float:
                    plan = at_target[eps]
                elif choice.floor(dtype) >= eps:
                    bucket["missing"] = True
                    continue
                else:
                    found = plan_for(planner, eps, "mean", choice, dtype, known=at_target[eps])
                    if found is None:  # out of this precision's reach in this module: no point at this target
                        bucket["missing"] = True
                        continue
                    plan = found.plan
                bucket["bytes"] += plan_bytes(planner, plan, choice, dtype)
                error = predicted_metric(planner, plan, choice, dtype, "mean")
                for t in tasks:
                    bucket["errors"].setdefault(t, []).append(error)
        if config.precision == "float":
            best = (default, Precisions())
        else:
            found = precision_plans(
                planner, config.target_error, config.target_metric, config.precision, dtype, default
            )
            best = (found[0].plan, found[0].precision)
        chosen_bytes += plan_bytes(planner, best[0], best[1], dtype)
        chosen_precision[best[1].name()] = chosen_precision.get(best[1].name(), 0) + 1
        record(at_chosen["shared"], planner.pure_sharing(default.params))
        record(at_chosen["private"], planner.truncation(default.params))
    if progress:
        progress("", len(modules), len(modules))
    frontiers = {m: [(p.params, p.mean_error * len(tasks)) for p in ladder] for m, (tasks, ladder) in ladders.items()}
    for r in ratios:
        bucket = curves["mixed"][r]
        bucket["shared_modules"] = 0
        for m, j in allocate_budget(frontiers, original / r).items():
            tasks, ladder = ladders[m]
            bucket["params"] += ladder[j].params
            bucket["shared_modules"] += ladder[j].kind != "private"
            for t, e in zip(tasks, ladder[j].predicted_errors):
                bucket["errors"].setdefault(t, []).append(e)
    heads = sum(int(s.task_record().get("head_params") or 0) for s in sources)

    head_bytes = sum(int(s.task_record().get("head_bytes") or 0) for s in sources)

    # the per-(task, module) records a checkpoint stores beside the factors: 64 bytes a pair (as merge's
    # budget counts them)
    record_bytes = 64 * sum(len(idx) for (_n, _d, idx) in modules.values())

    def bytes_ratio(stored: int) -> float | None:
        return (original_bytes + head_bytes) / (stored + head_bytes + record_bytes) if stored else None

    def ratio(params: int) -> float | None:
        return (original + heads) / (params + heads) if params else None

    table = []
    for r in ratios:
        row: dict[str, Any] = {"budget_ratio": r}
        for s in STRATEGIES:
            c = curves[s][r]
            row[s] = {"ratio": ratio(c["params"]), "mean_error": _aggregate(c["errors"])}
        row["mixed"]["modules_with_shared_basis"] = curves["mixed"][r]["shared_modules"]
        table.append(row)
    default_plan = {
        "rule": config.describe(),
        # the ratio merge reports for these options: in bytes with the precisions chosen (heads on
        # both sides), in parameters with --precision float (as before precisions existed)
        "ratio": ratio(chosen["params"]) if config.precision == "float" else bytes_ratio(chosen_bytes),
        "ratio_params": ratio(chosen["params"]),
        "mean_error": _aggregate(chosen["errors"]),
        "modules_by_kind": kinds,
        "modules": len(modules),
        "at_same_storage": {s: _aggregate(v["errors"]) for s, v in at_chosen.items()},
        # in bytes, with the factors stored as --precision chooses (modules by precision chosen)
        "bytes": chosen_bytes,
        "ratio_bytes": bytes_ratio(chosen_bytes),
        "modules_by_precision": chosen_precision,
    }
    precision_curves = {
        c: [
            {
                "target_error": eps,
                "bytes": point["bytes"],
                "ratio": original_bytes / point["bytes"] if point["bytes"] else None,
                "mean_error": _aggregate(point["errors"]),
            }
            for eps, point in by_precision[c].items()
            if not point.get("missing")
        ]
        for c in choices
    }
    return {
        "tasks": len(sources),
        "modules": len(modules),
        "original_params": original,
        "head_params": heads,
        "original_bytes": original_bytes,
        "curves": table,
        "precision_curves": precision_curves,
        "default_plan": default_plan,
        "verdict": collection_verdict(table, default_plan),
        "warnings": [w for w in [base_model_warning({s.task: getattr(s, "config", None) for s in sources})] if w],
    }


class _Combined:
    """The plan of a module split into groups, seen as one plan (storage and per-task errors)."""

    def __init__(self, params: int, errors: list[float]):
        self.params, self.predicted_errors = params, errors
        self.mean_error = sum(errors) / max(len(errors), 1)


def best_split(single, splits, budget: int, orig: int, count: int):
    """The lowest mean error among one group (``single``) and the group splits, at this budget."""
    best = single
    for parts in splits:
        errors = [0.0] * count
        params = 0
        for idx, pl in parts:
            plan = pl.for_budget(int(budget * pl.original_params() / orig))
            params += plan.params
            for i, e in zip(idx, plan.predicted_errors):
                errors[i] = e
        combined = _Combined(params, errors)
        if combined.mean_error < best.mean_error - 1e-12:
            best = combined
    return best


def collection_verdict(table: list[dict[str, Any]], default_plan: dict[str, Any]) -> str:
    """One sentence: do these adapters share enough for consolidation to pay off?"""
    row = min(table, key=lambda r: abs(r["budget_ratio"] - 2.0))
    shared, mixed = row["shared"]["mean_error"], row["mixed"]["mean_error"]
    private = min(row["private"]["mean_error"], row["private_allocated"]["mean_error"])
    uses_sharing = row["mixed"]["modules_with_shared_basis"] > 0
    best_sharing = min(shared, mixed if uses_sharing else shared)
    at = f"at {row['budget_ratio']:g}× compression"
    if best_sharing < 0.8 * private:
        return (
            f"These adapters share enough structure for consolidation to pay off: {at} the best plan with shared "
            f"bases has {best_sharing:.1%} mean ΔW error against {private:.1%} for truncating each adapter alone."
        )
    return (
        f"These adapters share little: {at} shared bases reach {shared:.1%} mean ΔW error and the best plan "
        f"{mixed:.1%} (shared bases in {row['mixed']['modules_with_shared_basis']} of {default_plan['modules']} modules), "
        f"against {private:.1%} for truncating each adapter alone, so consolidation saves little beyond truncation."
    )
