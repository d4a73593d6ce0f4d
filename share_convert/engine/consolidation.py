"""One module consolidated: stack, bases, plan, encoding (spec, sections 2 and 6).

Given a module's members (:mod:`.members`), :func:`consolidate_module` stacks them (weighted,
:mod:`.stacks`), finds the principal bases, lets the planner choose the shared k and each task's
private rank (:func:`plan_group`, one plan step: :func:`choose_plan`), then encodes every task in
the bases as stored (:mod:`.encoding`) and measures its ΔW error; with ``--groups`` it also tries
splitting the tasks into groups with bases of their own. Only one module's stack is in memory.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from ..config import ConsolidationConfig
from .encoding import (
    FLOAT,
    StoredBases,
    coordinates,
    encode_in_bases,
    encode_private_only,
    store_bases,
    store_grams,
)
from .grouping import cluster_tasks
from .members import ModuleMember
from .planning import BasisSpectra, ModulePlan, ModulePlanner, choose_plan
from .precision import Precisions, TaskCodes, measured_metric, meets, plan_for, tighter
from .results import GroupPart, ModuleResult, assemble_groups
from .sharing_floor import SharingFloor
from .stacks import ModuleStack


def consolidate_module(
    name: str,
    n: int,
    d: int,
    members: list[ModuleMember],
    config: ConsolidationConfig,
    dtype: torch.dtype,
    clock: dict[str, float] | None = None,
    stack: ModuleStack | None = None,
) -> ModuleResult:
    """Bases, plan, coefficients, private factors and errors for one module.

    ``stack`` is the members' stack when it was built already (the budget pass's, with its bases).

    ``config`` has a fixed k, an energy or an error target: a ``--budget`` is turned into an error
    target per module by :func:`merge` first. With ``config.groups`` other than '1', the tasks are
    also split into groups with separate bases (spec, section 6), and the split is kept when it is
    cheaper at the same error target.
    """
    single = consolidate_group(name, n, d, members, config, dtype, clock, stack=stack)
    mode = config.mode()
    if str(config.groups) == "1" or mode in ("fixed", "energy") or len(members) < 4:
        return single
    options = range(2, min(4, len(members) // 2) + 1) if config.groups == "auto" else [int(config.groups)]
    best = single
    # the groups of a module share its precisions (docs/format.md): those the whole module chose
    shared_precision = None if config.precision == "float" else (single.plan.precision or FLOAT)
    for G in options:
        labels = cluster_tasks(single.planner.fits, G)
        found = sorted(set(labels))
        if len(found) < 2:
            continue
        parts = [[m for m, lab in zip(members, labels) if lab == g] for g in found]
        results = [
            consolidate_group(
                name, n, d, part, config, dtype, clock, prefix=f"modules/{name}/g{j}/", precision=shared_precision
            )
            for j, part in enumerate(parts)
        ]
        groups = [
            GroupPart.of(res, [m.task for m in part], {m.task: q for m, q in zip(part, res.plan.private_ranks)})
            for part, res in zip(parts, results)
        ]
        combined = assemble_groups(groups, [m.task for m in members], single.plan.alternatives, dtype)
        if combined.cost() < best.cost():
            best = combined
    return best


def consolidate_group(
    name: str,
    n: int,
    d: int,
    members: list[ModuleMember],
    config: ConsolidationConfig,
    dtype: torch.dtype,
    clock: dict[str, float] | None = None,
    prefix: str | None = None,
    precision: Precisions | None = None,
    stack: ModuleStack | None = None,
) -> ModuleResult:
    """One set of shared bases for ``members`` (all of a module's tasks, or one group of them).

    The plan step chooses the structure and where to store it (``precision``, when given, is imposed:
    the groups of a module share their precisions). Under an error target, a plan stored in fewer
    bits is encoded, its errors measured from the values as read back, and it is kept only where
    they meet the target: otherwise the structure is planned tighter once, then the next plan in
    bytes is tried, the float plan last (:func:`encode_checked`).
    """
    t0 = time.perf_counter()
    if stack is None:
        stack = ModuleStack(n, d, members, config)
    beta, alpha, plan, planner = plan_group(stack, config, dtype, precision)
    t1 = time.perf_counter()
    result = encode_checked(name, members, stack, beta, alpha, plan, planner, config, dtype, prefix)
    if clock is not None:
        clock["decompose"] += t1 - t0
        clock["encode"] += time.perf_counter() - t1
    return result


def encode_checked(
    name: str,
    members: list[ModuleMember],
    stack: ModuleStack,
    beta: torch.Tensor,
    alpha: torch.Tensor,
    plan: ModulePlan,
    planner: ModulePlanner,
    config: ConsolidationConfig,
    dtype: torch.dtype,
    prefix: str | None,
) -> ModuleResult:
    """:func:`encode_group` of ``plan``; under an error target, a plan with stored precisions whose
    measured errors miss it is planned tighter once, then replaced by its fallbacks in order."""
    checked = config.mode() == "target" and plan.precision is not None and not plan.precision.is_float
    result = encode_group(name, members, stack, beta, alpha, plan, planner, dtype, prefix)
    if not checked:
        return result
    target, metric = config.target_error, config.target_metric
    frozen = planner.frozen_stats(plan.k_B, plan.k_A)
    tries = [None, *plan.fallbacks]
    retried = False
    while True:
        table = result.records
        errors = [table[m.task]["error"] for m in members]
        value = measured_metric(errors, stack.norms, metric, frozen, planner.count)
        if meets(value, target) or not tries:
            return result
        current = result.plan
        found = None
        if not retried and current.bytes is not None:
            retried = True
            start = tighter(planner, current, metric, value, target)
            found = plan_for(planner, target, metric, current.precision, dtype, start=start)
        if found is None:
            tries.pop(0)
            if not tries:
                return result
            found = tries[0]
            retried = False
        nxt = dataclasses.replace(found.plan)
        nxt.precision, nxt.bytes, nxt.structural_target = found.precision, found.bytes, found.target
        if found.precision.is_float and tries and found is tries[-1]:
            tries = []  # the float plan: as before precisions existed, kept whatever it measures
        beta, alpha = stack.at_least(beta, alpha, nxt.k_B, nxt.k_A)
        result = encode_group(name, members, stack, beta, alpha, nxt, planner, dtype, prefix)


def encode_group(
    name: str,
    members: list[ModuleMember],
    stack: ModuleStack,
    beta: torch.Tensor,
    alpha: torch.Tensor,
    plan: ModulePlan,
    planner: ModulePlanner,
    dtype: torch.dtype,
    prefix: str | None,
) -> ModuleResult:
    """Every task of one set of bases encoded at ``plan`` (its structure and precision)."""
    precision = plan.precision or FLOAT
    norms, weights = stack.norms, stack.weights
    result = ModuleResult(plan=plan)
    result.planner = planner
    result.precision = precision.roles(dtype, plan) if not precision.is_float else {}
    bases = StoredBases.of(*store_bases(name, beta, alpha, plan, dtype, result, prefix, precision))
    coords = coordinates(members, bases)
    codes = TaskCodes()  # the codes made to measure errors, kept for the writer
    if bases is None:  # no shared part: every task keeps its own top directions
        encoded = encode_private_only(members, plan.private_ranks, dtype, norms, precision, codes)
    else:
        encoded = encode_in_bases(members, plan.private_ranks, bases, dtype, norms, coords, precision=precision,
                                  codes=codes)  # fmt: skip
    result.task_codes = codes
    for i, m in enumerate(members):
        tensors, record = encoded[i]
        result.task_parts[m.task] = tensors
        result.records[m.task] = record
    weighted = [(m.task, weights[i]) for i, m in enumerate(members)]
    store_grams(name, result, weighted, plan, prefix, precision=precision)
    return result


def plan_group(
    stack: ModuleStack,
    config: ConsolidationConfig,
    dtype: torch.dtype | None = None,
    precision: Precisions | None = None,
    *,
    bases: bool = True,
):
    """The bases and plan of one stack under ``config``: (β, α, plan, planner). With ``dtype`` (the
    storage dtype), the plan also says where its factors are stored (``config.precision``, or the
    imposed ``precision``) and what that costs in bytes. With ``bases`` false (the budget pass, which
    needs plans only) β and α may be None.

    Under an error target, a stack wider than :data:`.stacks.EXACT_COLUMNS` columns is first
    priced without bases (:class:`.sharing_floor.SharingFloor`): when no shared plan can cost less
    than independent truncation, no basis is fitted. Otherwise the bases start at 48 vectors, and
    when a wider basis may pay, they are fitted once at the widest k the bound allows against the
    plan in hand (:meth:`.stacks.ModuleStack.wide_fit`), not widened step by step.
    """
    full = stack.full
    mode = config.mode()
    if mode == "fixed":
        K = min(config.k or 0, full)
    elif mode == "energy" or full <= 64:
        K = full
    else:  # start small; wider bases only when they may pay
        K = min(48, full)
    floor, wide_used = None, None
    if mode == "target" and K < full and stack.bounded:
        bare = stack.no_basis_planner()
        if SharingFloor.applies(bare):
            floor = SharingFloor(bare, config.target_error, config.target_metric)
            private = bare.for_target(config.target_error, config.target_metric)
            if str(config.groups) == "1" and floor.rules_out(private.params):
                if dtype is not None and (precision is not None or config.precision != "float"):
                    empty = stack.stack_B.new_zeros(0)
                    private = choose_plan(
                        bare, config, BasisSpectra(empty, empty, stack.energy_totals), dtype, precision, known=private
                    )
                private.alternatives = {**(private.alternatives or {}), "shared_at_least": floor.least()}
                return stack.stack_B.new_zeros((stack.n, 0)), stack.stack_A.new_zeros((stack.d, 0)), private, bare
    fit = stack.fit(K)
    while True:
        beta, alpha, sB, sA, planner = fit
        spectra = BasisSpectra(sB, sA, stack.energy_totals)
        plan = choose_plan(planner, config, spectra)
        if config.mode() in ("fixed", "energy") or not _wider_may_pay(planner, plan, K, full):
            break
        if floor is not None:  # one fit at the widest k that can still beat this plan
            wide_K = floor.cap(plan.params, full)
            if wide_K > K:
                wide = stack.wide_fit(wide_K)
                wide_plan = choose_plan(wide.planner, config, BasisSpectra(wide.s_B, wide.s_A, stack.energy_totals))
                if (wide_plan.params, wide_plan.mean_error) < (plan.params, plan.mean_error):
                    plan, planner, wide_used = wide_plan, wide.planner, wide
                    spectra = BasisSpectra(wide.s_B, wide.s_A, stack.energy_totals)
                    K = full  # the one wide fit: no widening after it
            break
        K = min(2 * K, full)
        fit = stack.widen(K, fit)
    in_bits = dtype is not None and (precision is not None or config.precision != "float")
    if in_bits:
        # the structure in the float dtype decides how wide the bases are; the plan in fewer bits needs
        # a little more structure, so where it lands at their edge the bases grow by a quarter (the new
        # vectors only: doubling them would cost many modules a fit of twice the width), twice at most
        for _ in range(3):
            known = plan if _ == 0 and config.mode() == "target" else None  # this planner's plan at the target
            plan = choose_plan(planner, config, spectra, dtype, precision, known=known)
            if config.mode() in ("fixed", "energy") or not _wider_may_pay(planner, plan, K, full) or _ == 2:
                break
            K = min(K + max(16, K // 4), full)
            fit = stack.widen(K, fit)
            beta, alpha, sB, sA, planner = fit
            spectra = BasisSpectra(sB, sA, stack.energy_totals)
    if wide_used is not None:
        # the vectors of a wide fit are formed only as far as a plan uses them: the plan's and, with
        # stored precisions, its fallbacks' (a retry that needs more forms them: encode_checked)
        plans = [plan, *(p.plan for p in plan.fallbacks)] if in_bits else [plan]
        widths = (max(p.k_B for p in plans), max(p.k_A for p in plans))
        beta, alpha = stack.bases(wide_used, *widths) if bases else (None, None)
    return beta, alpha, plan, planner


def _wider_may_pay(planner: ModulePlanner, plan: ModulePlan, K: int, full: int) -> bool:
    """Whether bases wider than the K vectors computed may hold a cheaper plan than ``plan``.

    Never when any plan beyond K (its bases and coefficients alone) costs more than ``plan``;
    otherwise when the best k is at the edge, or when it is a mix of sharing and private
    corrections in the upper half of the bases: there the storage varies little with k (the
    planner's costs are flat within a fraction of a percent on noisy sets), so a fit of K vectors
    alone does not tell whether a wider basis pays.
    """
    if K >= full or planner.shared_params(K + 1, K + 1) >= plan.params:
        return False
    k = max(plan.k_B, plan.k_A)
    return k >= K or (plan.kind == "mixed" and 2 * k >= K)
