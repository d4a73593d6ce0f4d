"""A checkpoint's tasks as tensors: bases, each task's coefficients and private factors, ΔŴ.

Format version 2 stacks every task's coefficient rows per set of bases and its private rows per
module (:mod:`.format`); version 3 adds, per set of bases, a basis-rotation chain: rows written
under earlier bases are read rotated into the current ones (:class:`~.records.Chain`). These
functions read through a :class:`~share_convert.checkpoint.reader.Checkpoint`'s accessors (the
verified reads, the records) and are its methods' bodies; version-1 files are read by
:mod:`.compat`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CorruptCheckpointError
from .compat import Reader, v1_coefficients, v1_task_rows, v1_task_tensors
from .quantized import CODE_DTYPE
from .records import Chain, RecordTable, TaskRows, gather_rows

if TYPE_CHECKING:
    import torch

    from ..math.quantize import Quantized

#: A pair of bases (β, α), or (None, None) where a module stores none (k = 0).
Bases = tuple["torch.Tensor | None", "torch.Tensor | None"]


def read_chain(ckpt: Reader, prefix: str) -> Chain | None:
    """The basis-rotation chain stored with the bases under ``prefix`` (format version 3), checked
    against them and their coefficient rows; None without one."""
    import torch

    if ckpt.version < 3 or not ckpt.has(f"{prefix}chain_rows"):
        return None
    ends = ckpt.store.array(f"{prefix}chain_rows").astype(np.int64)
    RB = ckpt.tensor(f"{prefix}rotations_B").to(torch.float64)
    RA = ckpt.tensor(f"{prefix}rotations_A").to(torch.float64)
    k_B = ckpt.tensor_meta(f"{prefix}basis_B")[0][1]
    k_A = ckpt.tensor_meta(f"{prefix}basis_A")[0][1]
    P = ckpt.tensor_meta(f"{prefix}coefs_B")[0][0]
    V = len(ends)
    if (
        ends.ndim != 1
        or tuple(RB.shape) != (V, k_B, k_B)
        or tuple(RA.shape) != (V, k_A, k_A)
        or bool((np.diff(ends) <= 0).any())
        or (V and (ends[0] <= 0 or ends[-1] > P))
    ):
        raise CorruptCheckpointError(
            f"the rotation chain of {prefix} does not match its bases and rows", path=ckpt.path, hint="Re-create it"
        )
    return Chain(RB, RA, ends)


def prefix_of(ckpt: Reader, module: str, rec: dict[str, Any]) -> str | None:
    """Where the bases of a task with record ``rec`` in ``module`` are stored; None if k = 0."""
    info = ckpt.modules[module]
    if "groups" in info:
        return f"modules/{module}/g{rec['group']}/" if info["groups"][rec["group"]]["k_B"] else None
    return f"modules/{module}/" if info["k_B"] else None


def bases_prefix(ckpt: Reader, module: str, task: str | None = None) -> str | None:
    """Where the bases of ``module`` (for ``task``, when the module has groups) are stored; None if k = 0."""
    info = ckpt.modules[module]
    if "groups" in info:
        if task is None:
            raise ValueError(f"module {module} has groups: name the task")
        return prefix_of(ckpt, module, ckpt.task_modules(task)[module])
    return f"modules/{module}/" if info["k_B"] else None


def task_tensors(ckpt: Reader, task: str, module: str) -> dict[str, torch.Tensor]:
    """The coefficients (``coef_B`` k_B × p, ``coef_A`` k_A × p) in the current bases and private
    factors (``private_B`` n × q, ``private_A`` q × d) of one task in one module; absent parts are
    left out. Coefficients written under older bases (a chain, format version 3) come rotated,
    as float32; the others as stored."""
    if ckpt.version < 2:
        return v1_task_tensors(ckpt, task, module)
    rec = ckpt.task_modules(task)[module]
    out = {}
    p, q = rec["rank"], rec["private_rank"]
    prefix = prefix_of(ckpt, module, rec)
    if p and prefix is not None:
        row = rec["coef_row"]
        chain = ckpt.chain(prefix)
        for side in "BA":
            stored = ckpt.rows(f"{prefix}coefs_{side}", row, row + p)
            if chain is not None and row < chain.ends[-1]:  # written under older bases: rotated to these
                stored = chain.rotate(stored.double(), np.arange(row, row + p), side).float()
            out[f"coef_{side}"] = stored.T
    if q:
        row = rec["private_row"]
        out["private_B"] = ckpt.rows(f"modules/{module}/private_B", row, row + q).T
        out["private_A"] = ckpt.rows(f"modules/{module}/private_A", row, row + q)
    return out


def task_rows(ckpt: Reader, module: str, tasks: Sequence[str]) -> TaskRows:
    """The stored coefficients and private factors of ``tasks`` (all in ``module``), stacked as
    format version 2 stores them: one gather per tensor in version 2, one read per task in version 1.

    Rows of a set of bases with a chain keep their coordinates and come with the chain of the
    rows gathered (``TaskRows.chains``) when they stay in the order of their versions; otherwise
    they are rotated into the current bases (in the module's dtype)."""
    import torch

    info = ckpt.modules[module]
    table: RecordTable = RecordTable.from_dicts(info["tasks"]).select(tasks)
    groups = table.int_column("group")
    prefixes = (
        [f"modules/{module}/g{g}/" for g in groups.tolist()]
        if "groups" in info
        else [f"modules/{module}/"] * len(tasks)
    )
    if ckpt.version < 2:
        return v1_task_rows(ckpt, module, tasks, prefixes)
    ranks, q = table.int_column("rank"), table.int_column("private_rank")
    coef_row = np.zeros(len(tasks), dtype=np.int64)
    coefs = {}
    codes: dict[str, Quantized] = {}
    chains: dict[str, Chain] = {}
    for prefix in sorted(set(prefixes)):
        mine = np.array([p == prefix for p in prefixes], dtype=bool)
        if not ranks[mine].any():
            continue
        index = gather_rows(table.int_column("coef_row")[mine], ranks[mine])
        pick = torch.from_numpy(index)
        coefs[prefix] = tuple(ckpt.tensor(f"{prefix}coefs_{side}")[pick] for side in "BA")
        gather_codes(ckpt, codes, f"{prefix}coefs_", f"{prefix}coefs_", pick)
        chain = ckpt.chain(prefix)
        if chain is not None:  # rows keep the coordinates they were written in, when they can
            kept = chain.select(index)
            if kept is not None:
                chains[prefix] = kept
            else:
                cB, cA = coefs[prefix]
                coefs[prefix] = (
                    chain.rotate(cB.double(), index, "B").to(cB.dtype),
                    chain.rotate(cA.double(), index, "A").to(cA.dtype),
                )
                for side in "BA":  # new values: their codes are computed again when written
                    codes.pop(f"{prefix}coefs_{side}", None)
        coef_row[mine] = np.cumsum(ranks[mine]) - ranks[mine]
    private = None
    if q.any():
        pick = torch.from_numpy(gather_rows(table.int_column("private_row"), q))
        private = tuple(ckpt.tensor(f"modules/{module}/private_{side}")[pick] for side in "BA")
        gather_codes(ckpt, codes, f"modules/{module}/private_", "private_", pick)
    rows = TaskRows(list(tasks), prefixes, coefs, coef_row, private, np.cumsum(q) - q, chains)  # type: ignore[arg-type]
    rows.precision = {r: p for r, p in ckpt.module(module).precision.items() if r in _ROW_ROLES and p in CODE_DTYPE}
    rows.codes = codes
    return rows


#: The roles of a module's stacked per-task rows.
_ROW_ROLES = ("coefs_B", "coefs_A", "private_B", "private_A")


def gather_codes(ckpt: Reader, codes: dict[str, Quantized], name: str, key: str, pick: torch.Tensor) -> None:
    """Rows ``pick`` of the codes and scales of ``<name>B`` and ``<name>A`` into ``codes[<key><side>]``,
    where those factors are stored as codes (so that writing them again writes the same bytes)."""
    from ..math.quantize import Quantized

    for side in "BA":
        if ckpt.store.code_precision(name + side) is None:
            continue
        q = ckpt.store.quantized(name + side)
        codes[key + side] = Quantized(q.precision, q.codes[pick], q.scales[pick], (len(pick), q.shape[1]), q.block)


def coefficients(ckpt: Reader, module: str, tasks: Sequence[str], side: str, prefix: str | None = None) -> torch.Tensor:
    """The coefficients ``coef_<side>`` of ``tasks`` in ``module`` in the current bases (rows of
    older bases rotated through the chain), zero-padded to the widest: a ``len(tasks) × k × p_max``
    float64 batch (one gather per module, or one read per rank in version 1)."""
    import torch

    table = RecordTable.from_dicts(ckpt.modules[module]["tasks"]).select(tasks)
    prefix = prefix or f"modules/{module}/"
    k = ckpt.tensor_meta(f"{prefix}basis_{side}")[0][1]
    ranks = table.int_column("rank")
    width = int(ranks.max()) if len(ranks) else 0
    if ckpt.version < 2:
        return v1_coefficients(ckpt, module, tasks, side, table, k, width)
    if not width:
        return torch.zeros(len(tasks), k, 0, dtype=torch.float64)
    stacked = ckpt.tensor(f"{prefix}coefs_{side}").double()  # P × k
    index = gather_rows(table.int_column("coef_row"), ranks)
    chain = ckpt.chain(prefix)
    if len(index) == stacked.shape[0] and (ranks == width).all() and (index == np.arange(len(index))).all():
        # every row, in order, all tasks of one rank (the common case): a view, no indexed copy
        rows = chain.rotate(stacked, index, side) if chain is not None else stacked
        return rows.view(len(tasks), width, k).transpose(1, 2)
    rows = stacked[torch.from_numpy(index)]
    if chain is not None:  # rows written under older bases, rotated into these
        rows = chain.rotate(rows, index, side)
    # every task's rows go to its slot of the padded batch, in one indexed copy
    X = torch.zeros(len(tasks), k, width, dtype=torch.float64)
    task_idx = torch.from_numpy(np.repeat(np.arange(len(tasks)), ranks))
    col_idx = torch.from_numpy(gather_rows(np.zeros(len(tasks), dtype=np.int64), ranks))
    X[task_idx, :, col_idx] = rows
    return X


def reconstruction(
    ckpt: Reader, task: str, module: str, bases: Bases | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔŴ of one task in one module as column-form factors (B̂: n × p+q, Â: d × p+q), float64.

    B̂ = [β E_B, P_B], Â = [α E_A, P_Aᵀ]: the shared part plus the private correction.
    """
    import torch

    info = ckpt.modules[module]
    n, d = info["out_features"], info["in_features"]
    beta, alpha = bases if bases is not None else ckpt.bases(module, task)
    parts = ckpt.task_tensors(task, module)
    Bs = [torch.zeros(n, 0, dtype=torch.float64)]
    As = [torch.zeros(d, 0, dtype=torch.float64)]
    if "coef_B" in parts and beta is not None:
        Bs.append(beta.double() @ parts["coef_B"].double())
        As.append(alpha.double() @ parts["coef_A"].double())
    if "private_B" in parts:
        Bs.append(parts["private_B"].double())
        As.append(parts["private_A"].double().T)
    return torch.cat(Bs, 1), torch.cat(As, 1)
