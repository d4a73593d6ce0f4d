"""One module of a combined task (``combine``, docs/combine.md): its definition from the inputs'
stored parts, and its tensors in the module's bases.

In module m the new task is ΔW_new = β (Σ_t w_t C_t) αᵀ + Σ_u w_u ΔŴ_u^out, where C_t = E_B^t E_A^tᵀ
are the k_B × k_A cores of the inputs whose shared part uses the chosen set of bases, and ΔŴ^out
collects what lies outside them: the inputs' private factors, and the shared parts of inputs in
other groups of bases. ``linear`` sums the cores; ``ties`` and ``dare`` apply their rule to them
(:mod:`share_convert.math.merging`); the outside parts are summed as they are, by every method,
since they have no common coordinates.

It is stored exactly (up to the storage dtype): the core as balanced coefficients of its own
rank (SVD of the small core), the outside sum as private factors refactorized from the stacked
factors (QR of each side and SVD of the small core: exact, only numerically zero directions
dropped). Where storing the whole update as private factors is cheaper (its rank times n + d
against the coefficients plus the private part), that is stored instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checkpoint.reader import Checkpoint
from ..checkpoint.records import RecordTable
from ..math.linalg import canonicalize
from ..math.merging import dare_seed, factored_norm, merge_cores
from ..math.quantize import FLOAT_PRECISIONS, values
from ..math.quantize import store as store_at

F64 = torch.float64


@dataclass
class CombinedModule:
    """The new task in one module: its parts as stored, its record, and what was combined how."""

    #: where the bases of its coefficients are stored (None: private factors only)
    prefix: str | None
    #: its group of bases in a module with groups (None: one set of bases)
    group: int | None
    #: ``coef_B`` (k_B × p), ``coef_A`` (k_A × p), ``private_B`` (n × q), ``private_A`` (q × d), as stored
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)
    #: ‖outside part‖ / ‖ΔW_new‖: the share combined linearly outside the shared bases
    outside: float = 0.0
    #: the inputs whose cores the method's rule merged here
    ruled: list[str] = field(default_factory=list)


def combine_module(
    ckpt: Checkpoint,
    name: str,
    weights: Mapping[str, float],
    method: str,
    dtype: torch.dtype,
    *,
    density: float = 1.0,
    seed: int = 0,
) -> CombinedModule:
    """The new task in module ``name`` from ``weights`` (input task -> weight; those the module has)."""
    info = ckpt.modules[name]
    entry = ckpt.module(name)
    n, d = entry.shape
    table = RecordTable.from_dicts(info["tasks"]).select([t for t in weights if entry.has_task(t)])
    ranks = dict(zip(table.tasks, table.int_column("rank").tolist()))
    groups = dict(zip(table.tasks, table.int_column("group").tolist()))
    prefixes = {t: ckpt.bases_prefix(name, t) if ranks[t] else None for t in table.tasks}
    stored = {t: ckpt.task_tensors(t, name) for t in table.tasks}  # each input's parts, read once
    prefix = _chosen_prefix(table.tasks, prefixes, stored, weights)
    ruled = [t for t in table.tasks if prefixes[t] == prefix and prefix is not None]
    # in a module with groups every task names one (the records require it), coefficients or not
    group = groups[(ruled or table.tasks)[0]] if entry.grouped else None
    out = CombinedModule(prefix, group, ruled=ruled)

    B_def, A_def = [torch.zeros(n, 0, dtype=F64)], [torch.zeros(d, 0, dtype=F64)]
    core = beta = alpha = None
    if ruled:
        X_B = ckpt.coefficients(name, ruled, "B", prefix)  # T × k_B × p, float64, current bases
        X_A = ckpt.coefficients(name, ruled, "A", prefix)
        cores = X_B @ X_A.transpose(1, 2)  # the tasks' C_t, k_B × k_A
        w = torch.tensor([float(weights[t]) for t in ruled], dtype=F64)
        core = merge_cores(method, cores, w, density=density, seeds=[dare_seed(seed, name, t) for t in ruled])
        beta, alpha = (x.to(F64) for x in ckpt.bases(name, ruled[0]))
        B_def.append(beta @ core)
        A_def.append(alpha)
    outside_B, outside_A = [torch.zeros(n, 0, dtype=F64)], [torch.zeros(d, 0, dtype=F64)]
    for t in table.tasks:
        parts = stored[t]
        w = float(weights[t])
        if t not in ruled and "coef_B" in parts:  # another group's bases: its shared part as it is
            b, a = ckpt.bases(name, t)
            outside_B.append(w * (b.to(F64) @ parts["coef_B"].to(F64)))
            outside_A.append(a.to(F64) @ parts["coef_A"].to(F64))
        if "private_B" in parts:
            outside_B.append(w * parts["private_B"].to(F64))
            outside_A.append(parts["private_A"].to(F64).T)
    RB, RA = torch.cat(outside_B, 1), torch.cat(outside_A, 1)
    B_def, A_def = torch.cat([*B_def, RB], 1), torch.cat([*A_def, RA], 1)

    # the two exact ways to store it: coefficients of the core plus the outside part as private
    # factors, or the whole update as private factors; the one with fewer parameters
    whole_B, whole_A, whole_S = canonicalize(B_def, A_def)
    split: dict[str, torch.Tensor] = {}
    if core is not None:
        cB, cA, _ = canonicalize(core, torch.eye(core.shape[1], dtype=F64))
        if cB.shape[1]:
            split["coef_B"], split["coef_A"] = cB, cA
    PB, PA, _ = canonicalize(RB, RA)
    if PB.shape[1]:
        split["private_B"], split["private_A"] = PB, PA.T
    k_B, k_A = (beta.shape[1], alpha.shape[1]) if beta is not None else (0, 0)
    split_params = _rank(split, "coef_B") * (k_B + k_A) + _rank(split, "private_B") * (n + d)
    if whole_B.shape[1] * (n + d) < split_params:
        split = {"private_B": whole_B, "private_A": whole_A.T} if whole_B.shape[1] else {}
    if "coef_B" not in split:
        out.prefix = None
    out.parts = {k: v.to(dtype).contiguous() for k, v in split.items()}

    norm = float(whole_S.pow(2).sum().sqrt())  # ‖ΔW_new‖: its singular values
    # the error of what is stored: in a module kept in fewer bits, the new rows are stored like the others
    stored_B, stored_A = _factors(as_stored(out.parts, entry.precision), beta, alpha, n, d)
    error = factored_norm(torch.cat([B_def, -stored_B], 1), torch.cat([A_def, stored_A], 1))
    out.record = {
        "rank": _rank(out.parts, "coef_B"),
        "private_rank": _rank(out.parts, "private_B"),
        "original_rank": int(whole_B.shape[1]),  # the rank a LoRA holding ΔW_new needs
        "norm": norm,
        "error": error / norm if norm > 0 else 0.0,
    }
    if out.group is not None:
        out.record["group"] = out.group
    out.outside = factored_norm(RB, RA) / norm if norm > 0 else 0.0
    return out


def _chosen_prefix(
    tasks: list[str],
    prefixes: Mapping[str, str | None],
    stored: Mapping[str, Mapping[str, torch.Tensor]],
    weights: Mapping[str, float],
) -> str | None:
    """The set of bases the new task's coefficients use: the one whose inputs weigh most,
    Σ |w_t| ‖C_t‖_F (‖C_t‖ from the stored coefficients); the first such set on a tie."""
    score: dict[str, float] = {}
    for t in tasks:
        p = prefixes[t]
        if p is None:
            continue
        cB, cA = stored[t]["coef_B"].to(F64), stored[t]["coef_A"].to(F64)
        score[p] = score.get(p, 0.0) + abs(float(weights[t])) * float(torch.linalg.matrix_norm(cB @ cA.T))
    best = None
    for p in sorted(score):
        if best is None or score[p] > score[best]:
            best = p
    return best


def _rank(parts: Mapping[str, torch.Tensor], key: str) -> int:
    return int(parts[key].shape[1]) if key in parts else 0


def _factors(
    parts: Mapping[str, torch.Tensor], beta: torch.Tensor | None, alpha: torch.Tensor | None, n: int, d: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔŴ of the stored parts as column-form factors (n × p+q, d × p+q), float64, as extraction rebuilds it."""
    Bs, As = [torch.zeros(n, 0, dtype=F64)], [torch.zeros(d, 0, dtype=F64)]
    if "coef_B" in parts:
        Bs.append(beta @ parts["coef_B"].to(F64))
        As.append(alpha @ parts["coef_A"].to(F64))
    if "private_B" in parts:
        Bs.append(parts["private_B"].to(F64))
        As.append(parts["private_A"].to(F64).T)
    return torch.cat(Bs, 1), torch.cat(As, 1)


#: A task's part -> the role of the stacked tensor its rows are stored in.
PART_ROLES = {"coef_B": "coefs_B", "coef_A": "coefs_A", "private_B": "private_B", "private_A": "private_A"}


def as_stored(parts: Mapping[str, torch.Tensor], precision: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Each part with the values a reader gets back once its rows are stored at the module's
    ``precision`` (role -> precision): cast, or quantized along the stored rows and dequantized
    (coef_B, coef_A and private_B are stored transposed: a row per direction)."""
    out = {}
    for key, part in parts.items():
        p = precision.get(PART_ROLES[key])
        if p is None or (p in FLOAT_PRECISIONS and getattr(torch, p) == part.dtype):
            out[key] = part
            continue
        rows = part if key == "private_A" else part.T
        got = values(store_at(rows, p)).to(part.dtype)
        out[key] = got if key == "private_A" else got.T
    return out
