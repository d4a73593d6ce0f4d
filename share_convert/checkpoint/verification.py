"""Full checks of a checkpoint: checksums, shapes, orthonormal bases, finite values, stored errors, codes and scales."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..dtypes import FLOAT_NAMES
from ..errors import CorruptCheckpointError
from ..math.linalg import frob2
from ..math.quantize import relative_rms_error
from .quantized import SCALES, role_of
from .reader import Checkpoint


def basis_tolerance(code: str | None, dtype: torch.dtype) -> float:
    """How far from the identity βᵀβ of a stored basis may be: rounding of a float dtype, or four
    times the relative RMS error of its code precision (NF4 moves βᵀβ by up to ~0.1 on 64 × 64
    bases; a damaged scale or code moves it by far more)."""
    if code is not None:
        return 4 * relative_rms_error(code)
    return 1e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4


def check_codes(ckpt: Checkpoint) -> None:
    """Every factor stored as codes (format version 4): its codes and scales present with the shapes
    and dtypes its module implies, scales finite and ≥ 0, codes in the range quantizing writes (int8
    not −128; NF4 rows of odd length end with a zero nibble); every other factor in a float dtype, and
    no scales without codes. Raises :class:`CorruptCheckpointError` at the first problem."""

    def bad(msg: str) -> None:
        raise CorruptCheckpointError(msg, path=ckpt.path, hint="Re-create the checkpoint")

    codes = ckpt.store.codes
    for name in ckpt.manifest["tensors"]:
        if name.endswith(SCALES) and name.removesuffix(SCALES) not in codes:
            bad(f"tensor {name} holds scales of no factor stored as codes")
        if role_of(name) is not None and name not in codes and ckpt.stored_meta(name)[1] not in FLOAT_NAMES:
            bad(f"tensor {name} is stored as {ckpt.stored_meta(name)[1]}, but its module names a float precision")
    for name, (precision, cols) in sorted(codes.items()):
        if not (ckpt.has(name) or ckpt.has(name + SCALES)):
            continue  # a factor this module does not store (k = 0, no private rows)
        q = ckpt.store.quantized(name)
        if not (torch.isfinite(q.scales).all() and (q.scales >= 0).all()):
            bad(f"tensor {name}{SCALES} holds a scale that is negative, NaN or Inf")
        if precision == "int8" and (q.codes == -128).any():
            bad(f"tensor {name} holds the int8 code -128, which no writer produces (codes are -127 … 127)")
        if precision == "nf4" and cols % 2 and q.codes.numel() and (q.codes[:, -1] >> 4).any():
            bad(f"tensor {name} has a non-zero padding nibble at the end of a row")


def verify_checkpoint(ckpt: Checkpoint, *, tol: float = 1e-3) -> dict[str, Any]:
    """Raise :class:`CorruptCheckpointError` at the first problem; return counts otherwise.

    Without the original adapters a stored error cannot be recomputed exactly; what is checked is
    that it is consistent with the stored ‖ΔW‖ and the reconstruction (triangle inequality).
    """
    ckpt.verify_all()
    stray = ckpt.stray_shards()
    if stray:
        raise CorruptCheckpointError(
            f"shard {stray[0].name} is not in the index (left by an interrupted write or a copy)",
            path=ckpt.path,
            hint=f"Delete it ({len(stray)} such file(s) beside the index); the checkpoint itself is whole",
        )

    def bad(msg: str) -> None:
        raise CorruptCheckpointError(msg, path=ckpt.path, hint="Re-create the checkpoint")

    check_codes(ckpt)
    for name in ckpt.manifest["tensors"]:
        t = ckpt.tensor(name)
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad(f"tensor {name} holds NaN or Inf")
    for module, info in ckpt.modules.items():
        n, d = info["out_features"], info["in_features"]
        checked: set[str] = set()
        for task in info["tasks"]:
            prefix = ckpt.bases_prefix(module, task)
            if prefix is None or prefix in checked:
                continue
            checked.add(prefix)
            beta, alpha = ckpt.bases(module, task)
            group = info["groups"][info["tasks"][task]["group"]] if "groups" in info else info
            kB, kA = group["k_B"], group["k_A"]
            if tuple(beta.shape) != (n, kB) or tuple(alpha.shape) != (d, kA):
                bad(
                    f"bases of {module} have shapes {tuple(beta.shape)}, {tuple(alpha.shape)}; expected ({n}, {kB}), ({d}, {kA})"
                )
            for side, U in (("B", beta), ("A", alpha)):
                eps = basis_tolerance(ckpt.code_precision(f"{prefix}basis_{side}"), U.dtype)
                G = U.double().T @ U.double()
                if (G - torch.eye(G.shape[0], dtype=G.dtype)).abs().max() > eps:
                    bad(f"basis_{side} of {module} is not orthonormal")
        for task, rec in info["tasks"].items():
            if task not in ckpt.tasks:
                bad(f"module {module} names unknown task {task}")
            Bh, Ah = ckpt.reconstruction(task, module)
            if Bh.shape[0] != n or Ah.shape[0] != d:
                bad(f"task {task} in {module} has factors of the wrong shape")
            if Bh.shape[1] != rec["rank"] + rec["private_rank"]:
                bad(f"task {task} in {module}: stored ranks disagree with the manifest")
            norm, e = rec.get("norm", 0.0), rec["error"]
            if not (math.isfinite(e) and e >= 0):
                bad(f"task {task} in {module}: stored error {e} is not a finite non-negative number")
            # triangle inequality: ‖ΔW‖(1 − e) ≤ ‖ΔŴ‖ ≤ ‖ΔW‖(1 + e) for any reconstruction with error e
            recon = frob2(Bh, Ah) ** 0.5
            if norm > 0 and not (norm * (1 - e) * (1 - tol) - 1e-12 <= recon <= norm * (1 + e) * (1 + tol) + 1e-12):
                bad(
                    f"task {task} in {module}: reconstruction norm {recon:.4g} is inconsistent with stored error {e:.4g}"
                )
    return {
        "checkpoint": str(ckpt.path),
        "tensors": len(ckpt.manifest["tensors"]),
        "files": len(ckpt.files),  # the single file, or the index and its shards
        "shards": len(ckpt.shard_paths) if ckpt.sharded else 0,
        "tasks": len(ckpt.tasks),
        "modules": len(ckpt.modules),
        "ok": True,
    }
