"""Chains of rotations: an update that keeps the old coefficient rows where they are (format version 3)."""

from __future__ import annotations

import numpy as np
import torch

from ..checkpoint.format import BLOCK_BYTES
from ..checkpoint.reader import Checkpoint
from ..checkpoint.records import Chain, RecordTable, TaskRows
from ..dtypes import st_name as st_dtype
from .old_tasks import prefix_tasks
from .planning import ModulePlan

#: Coefficient tensors up to this size (bytes, one side) are written again rather than chained: a
#: chain pays when copying the old rows with their block checksums saves real work (the format's
#: blocks start at this size).
CHAIN_MIN_BYTES = BLOCK_BYTES


def chain_step(
    ckpt: Checkpoint,
    name: str,
    prefix: str,
    old_tasks: list[str],
    k_B: int,
    k_A: int,
    plan: ModulePlan,
    dtype: torch.dtype,
) -> Chain | None:
    """The chain of ``prefix`` before this update (empty if it has none) when the update can keep
    the old rows where they are; None when they must be written again. This update's rotation is
    added by :func:`appended_rows`."""
    if ckpt.version < 2 or not (k_B and k_A) or (plan.k_B, plan.k_A) != (k_B, k_A):
        return None
    if not ckpt.has(f"{prefix}coefs_B") or old_tasks != prefix_tasks(ckpt, name, prefix):
        return None  # no rows yet, or some of them belong to tasks that leave
    (rows, _), stored_dtype = ckpt.tensor_meta(f"{prefix}coefs_B")
    if stored_dtype != st_dtype(dtype):
        return None  # stored in another dtype than this update writes
    itemsize = dtype.itemsize
    if rows * k_B * itemsize <= CHAIN_MIN_BYTES:
        return None  # small: written again costs nothing worth a chain
    old = ckpt.chain(prefix)
    covered = int(old.ends[-1]) if old is not None else 0
    length = (len(old) if old is not None else 0) + (rows > covered)
    # a chain whose rotations (float64) would take more bytes than the rows they rotate is folded into them
    if length * (k_B * k_B + k_A * k_A) * 8 > rows * (k_B + k_A) * itemsize:
        return None
    if old is None:
        f64 = torch.float64
        return Chain(torch.zeros(0, k_B, k_B, dtype=f64), torch.zeros(0, k_A, k_A, dtype=f64), np.zeros(0, np.int64))
    return old


def appended_rows(
    ckpt: Checkpoint,
    name: str,
    prefix: str,
    table: RecordTable,
    new_rows: TaskRows,
    chain: Chain,
    RB: torch.Tensor,
    RA: torch.Tensor,
) -> TaskRows:
    """The module's rows after an update that keeps the old rows where they are: the stored
    tensors copied, the new tasks' rows after them, and the chain extended by this update's
    rotation (R_B = β_newᵀ β_old, R_A = α_newᵀ α_old): every older version's rotation to the
    current bases is composed with it, and the rows written under the old bases become a version."""
    rows = ckpt.tensor_meta(f"{prefix}coefs_B")[0][0]
    covered = int(chain.ends[-1]) if len(chain) else 0
    rotations_B, rotations_A, ends = RB @ chain.rotations_B, RA @ chain.rotations_A, chain.ends
    if rows > covered:
        rotations_B, rotations_A = torch.cat([rotations_B, RB[None]]), torch.cat([rotations_A, RA[None]])
        ends = np.append(ends, rows)
    T = len(table)
    base = {prefix: rows}
    private, private_row = new_rows.private, np.concatenate([np.zeros(T, dtype=np.int64), new_rows.private_row])
    private_name = f"modules/{name}/private_B"
    if ckpt.has(private_name) and prefix == f"modules/{name}/":  # one set of bases: the private rows are all ours
        stored = ckpt.tensor_meta(private_name)[0][0]
        base["private"] = stored
        private_row = np.concatenate([table.int_column("private_row"), new_rows.private_row + stored])
    elif ckpt.has(private_name):  # a group's tasks: their private rows gathered from the module's
        old = ckpt.task_rows(name, table.tasks)
        gathered = old.private[0].shape[0] if old.private is not None else 0
        private_row = np.concatenate([old.private_row, new_rows.private_row + gathered])
        if old.private is not None:
            parts = [old.private] + ([new_rows.private] if new_rows.private is not None else [])
            private = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return TaskRows(
        tasks=[*table.tasks, *new_rows.tasks],
        prefixes=[prefix] * (T + len(new_rows.tasks)),
        coefs={prefix: new_rows.coefs[prefix]} if prefix in new_rows.coefs else {},
        coef_row=np.concatenate([table.int_column("coef_row"), new_rows.coef_row + rows]),
        private=private,
        private_row=private_row,
        chains={prefix: Chain(rotations_B, rotations_A, ends)},
        base=base,
        source=ckpt,
    )
