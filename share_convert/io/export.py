"""What every extraction writer shares: a task's factors as they are written out, padded to one
rank, and the check of the output folder before anything is computed."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.publish import check_parent_writable
from ..checkpoint.reader import Checkpoint
from ..errors import OutputExistsError
from ..math.linalg import canonicalize


def prepare_output_dir(path: Path, force: bool) -> None:
    """``path`` can receive a folder: absent, or an empty folder (any folder with ``force``), in a
    writable parent. Checked before any work."""
    if path.exists():
        if not path.is_dir():
            raise OutputExistsError("exists and is not a folder", path=path, hint="Choose another output folder")
        if any(path.iterdir()) and not force:
            raise OutputExistsError("exists and is not empty", path=path, hint="Pass --force to replace it")
    check_parent_writable(path)


def adapter_tensors(
    ckpt: Checkpoint,
    task: str,
    rank: int | None,
    truncation: dict[str, float] | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Per module of ``task``: balanced (B̂ n × p, Â p × d) in ``dtype`` (float64 unless asked),
    truncated to ``rank``; converted module by module, so only one module is ever in float64.

    ``truncation`` receives, per module, the relative error the truncation adds: the dropped
    singular values' norm over the original ‖ΔW‖ (Eckart–Young; over ‖ΔŴ‖ when the original's
    norm is not recorded).
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, record in ckpt.task_modules(task).items():
        Bh, Ah = ckpt.reconstruction(task, module)
        Bc, Ac, _ = canonicalize(Bh, Ah, max_rank=rank)
        if truncation is not None and rank is not None:
            full = canonicalize(Bh, Ah)[2]
            dropped = float(full[rank:].square().sum().sqrt())
            norm = float(record.get("norm") or full.square().sum().sqrt())
            truncation[module] = dropped / norm if norm > 0 else 0.0
        out[module] = (Bc.to(dtype), Ac.T.to(dtype).contiguous())
    width = max((b.shape[1] for b, _ in out.values()), default=0)
    return out, max(width, 1)


def padded(B: torch.Tensor, A: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero directions appended up to ``width`` (they change nothing in ΔW = B A)."""
    pad = width - B.shape[1]
    return torch.cat([B, B.new_zeros(B.shape[0], pad)], 1), torch.cat([A, A.new_zeros(pad, A.shape[1])], 0)
