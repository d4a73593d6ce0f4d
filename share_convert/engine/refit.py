"""A module consolidated again from its old tasks' reconstructions and new members."""

from __future__ import annotations

import torch

from ..checkpoint.reader import Checkpoint
from ..checkpoint.records import RecordTable
from ..config import ConsolidationConfig
from ..io.checkpoint_source import CheckpointTask
from ..math.bounds import OldSpan, inside_coordinates
from ..math.traces import frobenius2
from .consolidation import consolidate_module
from .members import ModuleMember, read_members
from .old_tasks import OldCoefficients
from .planning import drift_bound
from .projections import projection_eligible, projection_slack
from .results import ModuleResult


def refit_module(
    ckpt: Checkpoint,
    name: str,
    old_tasks: list[str],
    members: list[ModuleMember],
    config: ConsolidationConfig,
    dtype: torch.dtype,
) -> ModuleResult:
    """Consolidate one module again from its old tasks' reconstructions and the new members.

    The fallback of :func:`update_grouped_module` when a group would be left empty or no group
    has bases; its cost grows with the number of old tasks of that module. Old tasks' errors
    become bounds: the error before plus the drift, or :func:`share_convert.engine.planning.drift_bound`
    where the old reconstruction was a projection (:func:`projection_slack`).
    """
    sources = [CheckpointTask(ckpt, t) for t in old_tasks]
    old_members = read_members(sources, name, config)  # on the compute device, where the new join them
    members = [m.to(config.torch_device()) for m in members]
    entry = ckpt.module(name)
    records = ckpt.modules[name]["tasks"]
    projections = old_projections(ckpt, name, old_tasks)
    for m in old_members:  # the planner counts the tighter bounds of plans that stay in the old span
        if m.task in projections:
            m.slack = projections[m.task][0]
    res = consolidate_module(name, *entry.shape, old_members + members, config, dtype)
    for t in old_tasks:
        rec = res.records[t]
        before = records[t]["error"]
        rec["error_before"] = before
        rec["drift"] = max(rec["error"] - before, 0.0)
    tighten_refit(res, name, projections)
    return res


def old_projections(ckpt: Checkpoint, name: str, old_tasks: list[str]) -> dict[str, tuple[float, OldSpan]]:
    """The old tasks of one module whose stored part is a projection in their bases
    (:func:`projection_slack` finite): task -> (η, β, α of those bases, float64)."""
    table = RecordTable.from_dicts(ckpt.modules[name]["tasks"]).select(old_tasks)
    by_prefix: dict[str, list[str]] = {}
    for t in old_tasks:
        prefix = ckpt.bases_prefix(name, t)
        if prefix is not None:
            by_prefix.setdefault(prefix, []).append(t)
    out: dict[str, tuple[float, OldSpan]] = {}
    for prefix, tasks in by_prefix.items():
        if not projection_eligible(ckpt, table.select(tasks)).any():
            continue  # decided by the records: nothing to read
        beta, alpha = ckpt.tensor(f"{prefix}basis_B").double(), ckpt.tensor(f"{prefix}basis_A").double()
        old = OldCoefficients(ckpt, name, tasks, beta.shape[1], alpha.shape[1], prefix)
        gram_B, gram_A = beta.T @ beta, alpha.T @ alpha
        norm2 = old.form([(1.0, None, None)])
        slack = projection_slack(
            ckpt, ckpt.module(name), table.select(tasks), old, beta, alpha, norm2, (gram_B, gram_A)
        )
        eligible = torch.isfinite(slack).nonzero().flatten().tolist()
        if eligible:  # the Cholesky factors once per set of bases, not once per task
            span = OldSpan(beta, alpha, torch.linalg.cholesky(gram_B), torch.linalg.cholesky(gram_A))
            for i in eligible:
                out[tasks[i]] = (float(slack[i]), span)
    return out


def tighten_refit(res: ModuleResult, name: str, projections: dict[str, tuple[float, OldSpan]]) -> None:
    """Replace the bound error before + drift of :func:`refit_module`'s old tasks by :func:`drift_bound`
    where their stored part was a projection in the old bases (``projections``).

    The refit encodes each old task's reconstruction ΔŴ_before afresh as ΔŴ_after, so D = ΔŴ_before −
    ΔŴ_after and its part outside the old span is ΔŴ_after's: ‖(I − Π_old) ΔŴ_after‖² = ‖ΔŴ_after‖² −
    ‖Π_old ΔŴ_after‖², from products of the new factors with the old bases (n-sized, per task, as the
    refit itself is). When the refit keeps each task's own top directions, ΔŴ_after lies in the old span
    and the bound is Pythagoras', √(e² + d²).
    """
    f64 = torch.float64
    for t, (slack, span) in projections.items():
        rec = res.records[t]
        Bn, An = result_factors(res, name, t)
        outside = 0.0
        if Bn.shape[1]:
            VB, VA = inside_coordinates(span.beta, Bn, span.L_B), inside_coordinates(span.alpha, An, span.L_A)
            within = frobenius2(VB, VA)
            outside = float((frobenius2(Bn, An) - within).clamp_min(0).sqrt()) / rec["norm"]
        before, drift = (torch.tensor([rec[c]], dtype=f64) for c in ("error_before", "drift"))
        bound = drift_bound(before, drift, torch.tensor([outside], dtype=f64), torch.tensor([slack], dtype=f64))
        rec["error"] = min(float(bound), rec["error"])


def result_factors(res: ModuleResult, name: str, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A task's ΔŴ in a freshly consolidated module as column factors (n × w, d × w), float64."""
    parts = res.task_parts.get(task, {})
    rec = res.records[task]
    prefix = f"modules/{name}/g{rec['group']}/" if res.groups else f"modules/{name}/"
    cols_B, cols_A = [], []
    if "coef_B" in parts:
        cols_B.append(res.tensors[f"{prefix}basis_B"].double() @ parts["coef_B"].double())
        cols_A.append(res.tensors[f"{prefix}basis_A"].double() @ parts["coef_A"].double())
    if "private_B" in parts:
        cols_B.append(parts["private_B"].double())
        cols_A.append(parts["private_A"].double().T)
    if not cols_B:  # nothing stored: ΔŴ_after = 0
        return torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.float64)
    return torch.cat(cols_B, 1), torch.cat(cols_A, 1)
