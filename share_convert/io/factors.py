"""LoRA factors as every reader hands them over: one task's ``B``, ``A`` of a module, or many
tasks' of one module stacked (scales folded in, float32)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are read, so that light commands start fast
    import torch


@dataclass
class LoraFactors:
    """One module's update with the scale folded in: ΔW = B @ A (spec, section 2, step 1).

    ``B`` is ``out × r`` and ``A`` is ``r × in``, both float32.
    """

    B: torch.Tensor
    A: torch.Tensor


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
