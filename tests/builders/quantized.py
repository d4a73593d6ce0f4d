"""Quantized checkpoints built without the engine's planner: a float checkpoint rewritten at given precisions.

:func:`requantize` reads a Share checkpoint and writes the same tasks, modules and records with
:class:`~share_convert.checkpoint.writer.CheckpointWriter`, each factor role at the precision asked
for (int8, nf4, a float cast, or as stored). The records (ranks, norms, errors) are copied as they
are, or (the default) raised to what the stored values can be proven to reach: the float error plus
the quantization's change of ΔŴ, ‖ΔW − ΔŴ_q‖ ≤ ‖ΔW − ΔŴ‖ + ‖ΔŴ − ΔŴ_q‖, so that ``verify``'s check
of the stored errors against the reconstructions holds. These files test the format and its readers,
not the planner's errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from share_convert.checkpoint.quantized import ROLES, role_of
from share_convert.checkpoint.reader import Checkpoint
from share_convert.checkpoint.records import RecordTable
from share_convert.checkpoint.writer import CheckpointWriter

#: Mixed precisions: NF4 bases, int8 coefficients, bfloat16 private rows.
MIXED = {
    "basis_B": "nf4",
    "basis_A": "nf4",
    "coefs_B": "int8",
    "coefs_A": "int8",
    "private_B": "bfloat16",
    "private_A": "bfloat16",
}


def precisions(spec: str | Mapping[str, str | None]) -> dict[str, str]:
    """Role -> precision from one precision for every role, or a mapping (roles left out: as stored)."""
    if isinstance(spec, str):
        return dict.fromkeys(ROLES, spec)
    return {role: p for role, p in spec.items() if p is not None}


def requantize(
    source: Path, out: Path, spec: str | Mapping[str, str | None], *, bound_errors: bool = True, **writer_options
) -> Path:
    """Write ``source``'s checkpoint to ``out`` with its factors at ``spec`` (:func:`precisions`);
    ``bound_errors``: the records' errors raised to the bound above (else copied as they are)."""
    _write(source, out, precisions(spec), None, writer_options)
    if bound_errors:
        _write(source, out, precisions(spec), _bounds(source, out), writer_options)
    return out


def _bounds(source: Path, written: Path) -> dict[str, dict[str, float]]:
    """Module -> task -> e + ‖ΔŴ − ΔŴ_q‖ / ‖ΔW‖ (``source``: the float checkpoint, ``written``: its rewrite)."""
    out: dict[str, dict[str, float]] = {}
    with Checkpoint(source) as before, Checkpoint(written) as after:
        for module, info in before.modules.items():
            here = out.setdefault(module, {})
            for task, rec in info["tasks"].items():
                Bf, Af = before.reconstruction(task, module)
                Bq, Aq = after.reconstruction(task, module)
                change = torch.linalg.matrix_norm(Bf @ Af.T - Bq @ Aq.T).item()
                here[task] = rec["error"] + (change / rec["norm"] if rec["norm"] > 0 else 0.0)
    return out


def _write(source: Path, out: Path, wanted: dict[str, str], errors: dict | None, writer_options: dict) -> None:
    with Checkpoint(source) as ckpt, CheckpointWriter(out, **writer_options) as writer:
        modules = {name: ckpt.modules[name].copy() for name in ckpt.modules}
        for name, info in modules.items():
            if errors is not None:
                table = RecordTable.from_dicts(info["tasks"])
                info["tasks"] = table.updated(error=np.array([errors[name][t] for t in table.tasks]))
        stacked = {f"{p}{s}" for p in ("coefs_", "private_") for s in "BA"}
        for name in ckpt.manifest["tensors"]:
            role = role_of(name)
            if name.startswith("records/") or name.endswith(".scales") or "/rotations_" in name:
                continue
            if name.endswith("/chain_rows") or role in stacked:
                continue  # written by add_module below
            if role is not None:
                writer.add(name, ckpt.tensor(name), wanted.get(role))
            else:
                ckpt.copy_to(writer, name)
        for name, info in modules.items():
            rows = ckpt.task_rows(name, list(info["tasks"]))
            rows.precision = {r: p for r, p in wanted.items() if r in stacked}
            writer.add_module(name, rows)
        keep = {k: v for k, v in ckpt.manifest.items() if k not in ("tensors", "blocks", "record_columns")}
        writer.finish(dict(keep, modules=modules))
