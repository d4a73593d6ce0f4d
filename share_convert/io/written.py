"""What an extraction writer is asked to write and what it reports back (light: no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..checkpoint.reader import Checkpoint


@dataclass
class Extraction:
    """One task to write out: from which checkpoint, its record, where, at what rank and in which dtype."""

    ckpt: Checkpoint
    task: str
    record: dict[str, Any]
    output: Path
    rank: int | None  # re-truncate every module to its best rank-``rank`` approximation
    force: bool  # replace what is at ``output``
    #: receives, per module, the relative ΔW error the truncation to ``rank`` adds
    truncation: dict[str, float] = field(default_factory=dict)
    #: the factors' dtype (float32, float16, bfloat16); None: the dtype the task came in
    dtype: str | None = None

    @property
    def weights_dtype(self) -> str:
        """The safetensors dtype the factors are written in: ``dtype``'s, else the original's
        (``weights_dtype`` of the task, F32 where not recorded), whatever precision the checkpoint stores."""
        from ..dtypes import ST_OF

        return ST_OF[self.dtype] if self.dtype is not None else self.record.get("weights_dtype", "F32")


@dataclass
class Written:
    """What a writer wrote: the file or folder, the rank every module has there, the number of
    modules, and what serving engines will make of it."""

    path: Path
    rank: int
    modules: int
    warnings: list[str] = field(default_factory=list)
