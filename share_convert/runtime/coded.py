"""Bases and coefficients held as the checkpoint's int8/NF4 codes (``keep_quantized=True``).

A checkpoint's default precision plan stores bases, coefficients and private factors as codes
(docs/precision.md). Held dequantized, none of that storage reaches serving; held as codes, each
call dequantizes what it uses, per layer:

- :class:`BasisStore`: one side of a layer's bases (n × K_B or d × K_A), the rows of each group's
  basis (n × k_g, blocks along k_g, as stored) side by side; a call decodes the columns of the
  groups its tasks use.
- :class:`RaggedCoefficients`: every loaded task's coefficient rows (E_Bᵀ: p × k_B, E_Aᵀ: p × k_A),
  per group of bases, one after the other without padding to the largest rank. A mixed batch
  decodes the rows of the tasks it holds (one ``index_select`` per side and group) and pads them
  into a (tasks + 1) × k × P stack for that call only, the batch's rows gathering their task's
  entry (the last entry, all zeros, for rows of no task here).
"""

from __future__ import annotations

import torch
from torch import nn

from ..math.quantize import Quantized
from .rows import RowStore

Group = tuple[int, int, int, int]  # a group's columns in the layer's bases: a0, a1 (basis_A), b0, b1 (basis_B)


class BasisStore(nn.Module):
    """One side of a layer's bases as codes: each group's rows (``RowStore``, rows × k_g) side by side."""

    def __init__(self, parts: list[RowStore]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.starts = [sum(p.cols for p in parts[:i]) for i in range(len(parts))]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.parts[0].rows if len(self.parts) else 0, sum(p.cols for p in self.parts))

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def held_as(self) -> str:
        return self.parts[0].held_as

    def take(self, c0: int, c1: int, dtype: torch.dtype) -> torch.Tensor:
        """Columns ``c0:c1`` as ``dtype`` values: one group's decoded alone, else every group's."""
        for start, part in zip(self.starts, self.parts):
            if start == c0 and start + part.cols == c1:
                return part.take(0, part.rows, dtype)
        whole = torch.cat([p.take(0, p.rows, dtype) for p in self.parts], 1)
        return whole[:, c0:c1]

    def extra_repr(self) -> str:
        rows, cols = self.shape
        return f"{rows}×{cols}, {self.held_as}"


class RaggedCoefficients(nn.Module):
    """Every loaded task's coefficients of one layer, unpadded: per group of bases, ``rows_B[g]``
    (E_Bᵀ rows, k_B of the group columns) and ``rows_A[g]`` (E_Aᵀ rows); ``where[task]`` is
    (group index, first row, rank p)."""

    def __init__(
        self,
        groups: list[Group],
        precision_B: str | None,
        precision_A: str | None,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ):
        super().__init__()
        self.groups = list(groups)
        self.rows_B = nn.ModuleList(RowStore(b1 - b0, dtype, device, precision_B) for _, _, b0, b1 in groups)
        self.rows_A = nn.ModuleList(RowStore(a1 - a0, dtype, device, precision_A) for a0, a1, _, _ in groups)
        self.where: dict[int, tuple[int, int, int]] = {}
        self._batches: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]] = {}

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in (*self.rows_B, *self.rows_A))

    def stores(self) -> list[RowStore]:
        return [*self.rows_B, *self.rows_A]

    @torch.no_grad()
    def append(
        self, task: int, group: Group, coef_B: torch.Tensor | Quantized, coef_A: torch.Tensor | Quantized
    ) -> None:
        """Put ``task``'s rows after the others of its group: E_Bᵀ and E_Aᵀ (p × k, codes as stored, or
        values, which a coded store quantizes as the format does)."""
        g = self.groups.index(group)
        offset = self.rows_B[g].append(coef_B)
        self.rows_A[g].append(coef_A)
        rows = coef_B.shape[0]
        self.where[task] = (g, offset, rows)
        self._batches.clear()

    @torch.no_grad()
    def remove(self, task: int) -> None:
        """Take ``task``'s rows out (the rows above them move down)."""
        g, offset, p = self.where.pop(task)
        self.rows_B[g].remove(offset, offset + p)
        self.rows_A[g].remove(offset, offset + p)
        self.where = {t: (h, o - p * (h == g and o > offset), r) for t, (h, o, r) in self.where.items()}
        self._batches.clear()

    def task(self, task: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``task``'s E_B (k_B × p) and E_A (k_A × p) in its group's columns, dequantized."""
        g, offset, p = self.where[task]
        return self.rows_B[g].take(offset, offset + p, dtype).T, self.rows_A[g].take(offset, offset + p, dtype).T

    def batch(
        self, tasks: tuple[int, ...], ids: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a mixed batch of ``tasks`` (all of one group): a map from task id (``ids`` of them, then
        the base model's -1) to an entry, and the (entries × k_A × P) and (entries × k_B × P) stacks of
        E_A and E_B, P the largest rank among ``tasks``; entry 0 is all zeros."""
        key = (tasks, ids, device)
        found = self._batches.get(key)
        if found is None:
            found = self._batch_index(tasks, ids, device)
            if len(self._batches) >= 64:  # a few batch compositions recur; keep the last ones
                self._batches.pop(next(iter(self._batches)))
            self._batches[key] = found
        lut, index, place, g, width = found
        stacks = []
        for store in (self.rows_A[g], self.rows_B[g]):
            rows = store.take_index(index, dtype)  # the batch's tasks' rows, one piece
            stack = rows.new_zeros((len(tasks) + 1) * width, store.cols)
            stack.index_copy_(0, place, rows)
            stacks.append(stack.view(len(tasks) + 1, width, store.cols).transpose(1, 2))
        return lut, stacks[0], stacks[1]

    def _batch_index(
        self, tasks: tuple[int, ...], ids: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """The index tensors of one batch composition: task id -> entry, the rows to decode and where
        each goes in the flattened (entries × P) stack, the group and P."""
        g = self.where[tasks[0]][0]
        width = max(self.where[t][2] for t in tasks)
        lut = torch.zeros(ids + 1, dtype=torch.long)
        rows, place = [], []
        for entry, t in enumerate(tasks, start=1):
            _, offset, p = self.where[t]
            lut[t] = entry
            rows.extend(range(offset, offset + p))
            place.extend(range(entry * width, entry * width + p))
        return (
            lut.to(device),
            torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(place, dtype=torch.long, device=device),
            g,
            width,
        )


__all__ = ["BasisStore", "Group", "RaggedCoefficients"]
