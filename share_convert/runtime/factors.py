"""A layer's per-task tensors: coefficients (stacked and padded, or ragged) and ragged private factors.

Private factors are held without padding in :class:`~share_convert.runtime.rows.RowStore` s:

- ``private_A`` rows are P_A's rows (q × d);
- ``private_Bt`` rows are P_Bᵀ's rows (q × n), the layout the checkpoint stores them in, so that a
  task's rows of either side are one contiguous slice, and int8/NF4 codes (whose scale blocks run
  along a row, share_convert.math.quantize) can be kept as they are stored.

Coefficients are stacked and zero-padded to the largest rank (float, the fast gather of a mixed
batch), or, where the checkpoint stores them as codes and they are kept so (``keep_quantized``),
held ragged as codes (:class:`~share_convert.runtime.coded.RaggedCoefficients`): a mixed batch then
dequantizes the rows of the tasks it holds and pads them for that call only.
"""

from __future__ import annotations

import torch
from torch import nn

from .coded import RaggedCoefficients
from .rows import RowStore


class TaskFactors(nn.Module):
    """Every loaded task's tensors for one layer: coefficients stacked by slot, private factors ragged.

    Coefficients (small: k × p per task) are stacked so that a mixed batch gathers them by row.
    Slot 0 is all zeros (tasks without coefficients here, and the base model); a task's slot is
    ``coef_slot[task id]``. ``coef_A`` (S+1, K_A, P) and ``coef_B`` (S+1, K_B, P) hold E_A and E_B,
    zero-padded to the largest rank P; with groups, K is the sum of the groups' k and a task's rows
    outside its group are zero.

    Private factors are held without padding (:class:`RowStore`): ``private_A`` (Σq × d, P_A's rows)
    and ``private_Bt`` (Σq × n, P_Bᵀ's rows); ``private_ranks`` maps a task id to (its first row, its
    rank q > 0). A mixed batch takes them task by task, on that task's rows.

    The coefficient stacks are buffers; ``index_select`` and ``bmm`` are differentiable, so a
    training feature can register a stack (or a task's slot of it) as an ``nn.Parameter``.
    """

    def __init__(
        self,
        coef_A: torch.Tensor,
        coef_B: torch.Tensor,
        coef_slot: torch.Tensor,
        private_A: RowStore,
        private_Bt: RowStore,
        spans: dict[int, tuple[int, int, int, int, int, int]],
        private_ranks: dict[int, tuple[int, int]],
        ragged: RaggedCoefficients | None = None,
    ):
        super().__init__()
        self.register_buffer("coef_A", coef_A)
        self.register_buffer("coef_B", coef_B)
        self.register_buffer("coef_slot", coef_slot)
        self.private_A = private_A
        self.private_Bt = private_Bt
        #: the coefficients held ragged (as codes), or None: then they are the stacks ``coef_A``/``coef_B``
        #: (which are then empty, (1, K, 0), and only carry the serving dtype and device)
        self.ragged = ragged
        #: task id -> (its slot, rows of its group in K_A: a0, a1 and in K_B: b0, b1, its rank p);
        #: kept on the host so that a single-task call reads no device tensor
        self.spans = spans
        #: task id -> (its first row in the private stores, its private rank q > 0)
        self.private_ranks = private_ranks
        #: the bytes the checkpoint stores these tensors (and the layer's bases) in, for the parts it
        #: keeps as int8/NF4 codes that are held here dequantized, by precision (see memory_report)
        self.dequantized_from: dict[str, int] = {}
        #: tasks of a mixed batch -> the rows of their private factors (for rows kept as codes)
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        """The serving dtype: the Share part is computed in it."""
        return self.coef_A.dtype

    def coefficients(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``task``'s E_B (k_B × p) and E_A (k_A × p) in its group's columns of the bases, in the serving dtype."""
        slot, a0, a1, b0, b1, p = self.spans[task]
        if self.ragged is not None:
            return self.ragged.task(task, self.dtype)
        return self.coef_B[slot, b0:b1, :p], self.coef_A[slot, a0:a1, :p]

    def mixed_coefficients(
        self, tasks: tuple[int, ...], group: tuple[int, int, int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a mixed batch whose ``tasks`` use ``group``'s bases: the map from task id (-1: the base
        model) to an entry of the stacks, and the stacks of E_A (entries × k_A × P) and E_B, entry 0 zeros."""
        if self.ragged is not None:
            return self.ragged.batch(tasks, self.coef_slot.shape[0] - 1, self.dtype, device)
        a0, a1, b0, b1 = group
        return self.coef_slot, self.coef_A[:, a0:a1], self.coef_B[:, b0:b1]

    @property
    def out_features(self) -> int:
        return self.private_Bt.cols

    @property
    def in_features(self) -> int:
        return self.private_A.cols

    def private(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``task``'s private factors in the serving dtype: P_B (n × q, a transposed view) and P_A (q × d)."""
        offset, q = self.private_ranks[task]
        dtype = self.dtype
        return self.private_Bt.take(offset, offset + q, dtype).T, self.private_A.take(offset, offset + q, dtype)

    def privates(self, tasks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`private` of each of ``tasks``; for rows kept as codes, the rows of all of them are
        dequantized in one piece (one call per side, not one per task)."""
        if len(tasks) < 2 or (self.private_A.precision is None and self.private_Bt.precision is None):
            return [self.private(t) for t in tasks]
        key = tuple(tasks)
        index = self._indices.get(key)
        if index is None or index.device != self.coef_slot.device:  # (the model was moved since)
            spans = [self.private_ranks[t] for t in tasks]
            rows = [r for offset, q in spans for r in range(offset, offset + q)]
            index = torch.tensor(rows, dtype=torch.long, device=self.coef_slot.device)
            if len(self._indices) >= 64:  # a few batch compositions recur; keep the last ones
                self._indices.pop(next(iter(self._indices), None), None)
            self._indices[key] = index
        dtype = self.dtype
        A, Bt = self.private_A.take_index(index, dtype), self.private_Bt.take_index(index, dtype)
        out, start = [], 0
        for t in tasks:
            q = self.private_ranks[t][1]
            out.append((Bt[start : start + q].T, A[start : start + q]))
            start += q
        return out

    def rows_changed(self) -> None:
        """Forget the row indices of batch compositions (a task's private rows were put in or taken out)."""
        self._indices.clear()

    def add_empty_task(self) -> None:
        """One more task id with nothing stored here: its slot map points at the zero slot (a new last id, the
        base model's moving up by one), so that stored tasks and mixed batches are unchanged."""
        self.coef_slot = torch.cat([self.coef_slot, self.coef_slot.new_zeros(1)])


__all__ = ["RaggedCoefficients", "RowStore", "TaskFactors"]
