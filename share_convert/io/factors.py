"""LoRA factors as every reader hands them over: one task's ``B``, ``A`` of a module, or many
tasks' of one module stacked (scales folded in, float32)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import BadAdapterError

if TYPE_CHECKING:  # torch is imported where tensors are read, so that light commands start fast
    import torch


@dataclass
class LoraFactors:
    """One module's update with the scale folded in: ΔW = B @ A (spec, section 2, step 1).

    ``B`` is ``out × r`` and ``A`` is ``r × in``, both float32.
    """

    B: torch.Tensor
    A: torch.Tensor

    @classmethod
    def checked(cls, B: torch.Tensor, A: torch.Tensor, keys: tuple[str, str], path: str | Path) -> LoraFactors:
        """``LoraFactors(B, A)`` of tensors read from ``path`` under ``keys`` (B's, A's), or one line
        naming the tensor that holds a NaN or Inf."""
        import torch

        if bool(torch.isfinite(A.sum() + B.sum())):  # one reduction: finite sums have finite terms
            return cls(B=B, A=A)
        for key, x in ((keys[1], A), (keys[0], B)):  # which one (or only an overflowing sum)
            if not torch.isfinite(x).all():
                raise BadAdapterError(
                    f"tensor {key} contains NaN or Inf",
                    path=path,
                    hint="This adapter is broken; retrain or re-export it",
                )
        return cls(B=B, A=A)


@dataclass
class LoraStack:
    """Many tasks' factors of one module, stacked: ``B`` is ``T × out × r`` and ``A`` is
    ``T × r × in``, float32, scales folded (what :class:`LoraFactors` is for one task)."""

    B: torch.Tensor
    A: torch.Tensor

    def __len__(self) -> int:
        return int(self.B.shape[0])

    def __getitem__(self, i: int) -> LoraFactors:
        return LoraFactors(B=self.B[i], A=self.A[i])

    def __iter__(self) -> Iterator[LoraFactors]:
        return (self[i] for i in range(len(self)))
