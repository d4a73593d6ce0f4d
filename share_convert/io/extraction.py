"""Extraction: a task back out of a Share checkpoint as a standard LoRA adapter (spec, section 3).

The format is the requested one, else the one the task came in; each format has its writer in
:mod:`share_convert.io.writers` (a PEFT folder, a kohya or a diffusers file). Only the tensors of
the requested task (and the bases of its modules) are read.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint.reader import Checkpoint
from ..errors import InvalidOptionError
from ..files.atomic import publish_dir, temp_dir_beside
from ..names import path_under
from .export import prepare_output_dir
from .writers import DTYPES, writer_for
from .written import Extraction


@dataclass
class ExtractedAdapter:
    """What :func:`extract` wrote."""

    task: str
    path: Path
    rank: int
    modules: int
    warnings: list[str] = field(default_factory=list)
    truncation_error: dict[str, float] | None = None
    """With ``rank``: the relative ΔW error the truncation adds, ‖ΔŴ − ΔŴ_R‖_F / ‖ΔW‖_F, as the
    mean over the task's modules and the worst module; None when nothing was truncated."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "path": str(self.path),
            "rank": self.rank,
            "modules": self.modules,
            "truncation_error": self.truncation_error,
            "warnings": self.warnings,
        }


def extract(
    checkpoint: str | Path | Checkpoint,
    task: str,
    output: str | Path,
    *,
    rank: int | None = None,
    force: bool = False,
    format: str | None = None,
    dtype: str | None = None,
) -> ExtractedAdapter:
    """Write task ``task`` of ``checkpoint`` to ``output`` as a LoRA adapter.

    ``rank`` re-truncates every module to its best rank-``rank`` approximation. ``format``
    (``peft``, ``kohya``, ``diffusers``; default: the format the task came in) selects the writer.
    ``dtype`` (``float32``, ``float16``, ``bfloat16``; default: the dtype the task's original
    factors had) is the dtype of the written factors, whatever precision the checkpoint stores
    them at (int8 and NF4 factors are read dequantized, in float32).
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    record = ckpt.task(task)
    if rank is not None and rank < 1:
        raise InvalidOptionError(f"--rank must be ≥ 1, got {rank}", hint="For example --rank 16")
    check_dtype(dtype)
    writer = writer_for(record, format, task)
    job = Extraction(ckpt, task, record, Path(output), rank, force, dtype=dtype)
    w = writer.write(job)
    return ExtractedAdapter(
        task=task,
        path=w.path,
        rank=w.rank,
        modules=w.modules,
        warnings=w.warnings,
        truncation_error=_added_error(rank, job.truncation),
    )


def check_dtype(dtype: str | None) -> None:
    """Refuse a ``--dtype`` that is not one of :data:`DTYPES`."""
    if dtype is not None and dtype not in DTYPES:
        raise InvalidOptionError(
            f"--dtype {str(dtype)[:40]!r} is not one of {', '.join(DTYPES)}",
            hint="Leave it out to write the dtype the task came in, or give e.g. --dtype bfloat16",
        )


def _added_error(rank: int | None, truncation: dict[str, float]) -> dict[str, float] | None:
    """The mean and worst relative ΔW error a ``--rank`` truncation adds over the modules (None without one)."""
    if rank is None or not truncation:
        return None
    values = list(truncation.values())
    return {"mean": sum(values) / len(values), "max": max(values)}


def extract_all(
    checkpoint: str | Path | Checkpoint,
    output: str | Path,
    *,
    rank: int | None = None,
    force: bool = False,
    format: str | None = None,
    dtype: str | None = None,
) -> list[ExtractedAdapter]:
    """Every task, one sub-folder each (named after the task), under ``output``."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    check_dtype(dtype)
    output = Path(output)
    prepare_output_dir(output, force)
    tmp = temp_dir_beside(output)
    try:  # every task is written under a temporary folder, published in one rename at the end
        for t in ckpt.tasks:  # every format is valid before anything is written
            writer_for(ckpt.task(t), format, t)
        # each task's folder is named after it: joined under the temporary folder, never outside it
        results = [
            extract(ckpt, t, path_under(tmp, t, origin=ckpt.path), rank=rank, format=format, dtype=dtype)
            for t in ckpt.tasks
        ]
        publish_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for r in results:
        r.path = output / r.path.relative_to(tmp)
    return results
