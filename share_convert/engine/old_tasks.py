"""The old tasks of a checkpoint's module, known only through their stored coefficients.

Their coefficients batched (:class:`OldCoefficients`), their weighted Gram matrices, and modules
copied unchanged for the tasks that stay (``add`` and ``remove``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..checkpoint.entries import ModuleEntry
from ..checkpoint.format import CHAIN_PARTS
from ..checkpoint.reader import Checkpoint
from ..checkpoint.records import RecordTable
from ..checkpoint.writer import CheckpointWriter
from ..math.bounds import quadratic_form, task_cores, use_cores
from .planning import task_weights


def carry_module(
    ckpt: Checkpoint, writer: CheckpointWriter, name: str, keep: list[str], dropped: Sequence[str], weighting: str
) -> dict[str, Any] | None:
    """Copy one module unchanged for the tasks in ``keep``; recompute its Gram matrices without ``dropped``."""
    entry = ckpt.module(name)
    info = ckpt.modules[name]  # the stored entry, carried into the new manifest
    table = RecordTable.from_dicts(info["tasks"])
    kept = set(keep)
    left_tasks = [t for t in table.tasks if t in kept]
    if not left_tasks:
        return None
    prefixes = sorted({ckpt.bases_prefix(name, t) for t in one_per_group(entry, table)} - {None})
    for prefix in prefixes:
        for part in ("basis_B", "basis_A"):
            ckpt.copy_to(writer, f"{prefix}{part}")
        if dropped_here(ckpt, name, prefix, dropped):
            grams = grams_of(ckpt, name, prefix, left_tasks, weighting)
            for side in ("B", "A"):
                writer.add(f"{prefix}gram_{side}", grams[side].to(torch.float32))
        else:
            for side in ("B", "A"):
                ckpt.copy_to(writer, f"{prefix}gram_{side}")
    left = table.select(left_tasks)
    if ckpt.version >= 2 and len(left) == len(table):  # every task stays: the stacked tensors as they are
        stacked = [f"{p}{part}" for p in prefixes for part in ("coefs_B", "coefs_A", *CHAIN_PARTS)]
        for tname in [*stacked, f"modules/{name}/private_B", f"modules/{name}/private_A"]:
            if ckpt.has(tname):
                ckpt.copy_to(writer, tname)
        writer.set_module_rows(name, left.tasks, left.int_column("coef_row"), left.int_column("private_row"))
    else:
        writer.add_module(name, ckpt.task_rows(name, left_tasks))
    # untouched by this update: no drift
    out = {**info, "tasks": left.updated(error_before=left.float_column("error"), drift=0.0)}
    if entry.grouped:
        out["groups"] = [dict(g, tasks=[t for t in g["tasks"] if t in kept]) for g in info["groups"]]
    return out


def one_per_group(entry: ModuleEntry, table: RecordTable) -> list[str]:
    """One task of each group of bases in a module (the only one when it has no groups)."""
    if not entry.grouped:
        return table.tasks[:1]
    first: dict[int, str] = {}
    for t, g in zip(table.tasks, table.int_column("group").tolist()):
        first.setdefault(g, t)
    return list(first.values())


def dropped_here(ckpt: Checkpoint, name: str, prefix: str, dropped: Sequence[str]) -> bool:
    entry = ckpt.module(name)
    return any(entry.has_task(t) and ckpt.bases_prefix(name, t) == prefix for t in dropped)


def grams_of(ckpt: Checkpoint, name: str, prefix: str, tasks: Sequence[str], weighting: str) -> dict[str, torch.Tensor]:
    """Σ_i w_i c_i c_iᵀ (float64) over ``tasks``' stored coefficients, for the bases under ``prefix``.

    Used when tasks leave a basis: subtracting their terms from the stored float32 matrices would
    leave rounding noise that reads as spurious directions in the next update.
    """
    here = [t for t in tasks if ckpt.bases_prefix(name, t) == prefix]
    k_B, k_A = (ckpt.tensor_meta(f"{prefix}basis_{side}")[0][1] for side in ("B", "A"))
    old = OldCoefficients(ckpt, name, here, k_B, k_A, prefix)
    norms = RecordTable.from_dicts(ckpt.modules[name]["tasks"]).select(here).float_column("norm")
    root = task_weights(norms, weighting).sqrt()[:, None, None]
    return {"B": batch_gram(old.XB * root), "A": batch_gram(old.XA * root)}


class OldCoefficients:
    """The old tasks of one module in coordinates, zero-padded to one width and batched.

    ``XB`` (T × k × r) and ``XA`` hold each task's coefficients in the current bases (rows written
    under older bases come rotated through the chain); the padding changes no product below, so
    every per-task quantity of an update is a batched k-sized product.
    """

    def __init__(self, ckpt: Checkpoint, name: str, tasks: list[str], k_B: int, k_A: int, prefix: str | None = None):
        self.tasks = tasks
        if k_B and k_A and tasks:
            self.XB = ckpt.coefficients(name, tasks, "B", prefix)
            self.XA = ckpt.coefficients(name, tasks, "A", prefix)
            table = RecordTable.from_dicts(ckpt.modules[name]["tasks"]).select(tasks)
            self.ranks = torch.from_numpy(table.int_column("rank").copy())
        else:
            self.XB = torch.zeros(len(tasks), k_B, 0, dtype=torch.float64)
            self.XA = torch.zeros(len(tasks), k_A, 0, dtype=torch.float64)
            self.ranks = torch.zeros(len(tasks), dtype=torch.int64)
        self._cores: torch.Tensor | None = None

    def form(self, terms: Sequence[tuple[float, torch.Tensor | None, torch.Tensor | None]]) -> torch.Tensor:
        """:func:`quadratic_form` of these tasks (their cores computed once)."""
        if self._cores is None and use_cores(self.XB, self.XA):
            self._cores = task_cores(self.XB, self.XA)
        return quadratic_form(self.XB, self.XA, terms, self._cores)


def batch_gram(X: torch.Tensor) -> torch.Tensor:
    """Σ_i X_i X_iᵀ over a batch ``T × k × r``."""
    flat = X.transpose(0, 1).reshape(X.shape[1], X.shape[0] * X.shape[2])
    return flat @ flat.T


def prefix_tasks(ckpt: Checkpoint, name: str, prefix: str) -> list[str]:
    """The tasks whose coefficient rows are stored under ``prefix``, in their order in the module."""
    table = RecordTable.from_dicts(ckpt.modules[name]["tasks"])
    if not ckpt.module(name).grouped:
        return list(table.tasks)
    group = int(prefix.rstrip("/").rsplit("/g", 1)[1])
    return [t for t, g in zip(table.tasks, table.int_column("group").tolist()) if g == group]
