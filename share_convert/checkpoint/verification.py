"""Full checks of a checkpoint: checksums, shapes, orthonormal bases, finite values, stored errors."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from ..math.linalg import frob2
from .reader import Checkpoint


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
            eps = 1e-2 if beta.dtype in (torch.bfloat16, torch.float16) else 1e-4
            for side, U in (("B", beta), ("A", alpha)):
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
