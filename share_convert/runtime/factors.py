"""Ragged row stores: the private factors of every task of a layer, concatenated without padding.

A layer's tasks have private ranks of their own (0, 2, 8, …). Padding them to the largest rank made
the runtime hold more than the checkpoint (and than PEFT) on real adapters, which share little. A
:class:`RowStore` holds one side's rows of every task one after the other: a task's rows are
``[offset, offset + q)``, found in the layer's ``private_ranks`` map (task id -> (offset, q)).

- ``private_A`` rows are P_A's rows (q × d);
- ``private_Bt`` rows are P_Bᵀ's rows (q × n), the layout the checkpoint stores them in, so that a
  task's rows of either side are one contiguous slice, and int8/NF4 codes (whose scale blocks run
  along a row, share_convert.math.quantize) can be kept as they are stored.

A store holds float values in the serving dtype, or, for a checkpoint loaded with
``keep_quantized=True``, the codes and per-block scales of its int8/NF4 rows: :meth:`RowStore.take`
then dequantizes only the rows a call uses (one task's, in one layer).
"""

from __future__ import annotations

import torch
from torch import nn

from ..math.quantize import (
    BLOCK,
    CODE_PRECISIONS,
    NF4_VALUES,
    Quantized,
    blocks_per_row,
    code_columns,
    dequantize,
    quantize,
)


class RowStore(nn.Module):
    """Rows of ``cols`` numbers of several tasks, concatenated: float ``values``, or ``codes`` and ``scales``.

    ``precision`` is None for float values (held in ``dtype``), or ``"int8"`` / ``"nf4"`` for codes
    (uint8/int8 codes, float32 scales per block of :data:`~share_convert.math.quantize.BLOCK` numbers).
    """

    def __init__(
        self, cols: int, dtype: torch.dtype, device: torch.device | str | None = None, precision: str | None = None
    ):
        super().__init__()
        if precision is not None and precision not in CODE_PRECISIONS:
            raise ValueError(f"a row store keeps codes of {CODE_PRECISIONS}, not {precision!r}")
        self.cols = cols
        self.precision = precision
        if precision is None:
            self.register_buffer("values", torch.zeros(0, cols, dtype=dtype, device=device))
        else:
            code_dtype = torch.int8 if precision == "int8" else torch.uint8
            self.register_buffer(
                "codes", torch.zeros(0, code_columns(precision, cols), dtype=code_dtype, device=device)
            )
            # float32 scales held as their bits (int32), so that model.to(dtype) leaves them as they are
            self.register_buffer("scales", torch.zeros(0, blocks_per_row(cols), dtype=torch.int32, device=device))

    @property
    def rows(self) -> int:
        return (self.values if self.precision is None else self.codes).shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held (codes and scales for a coded store)."""
        held = (self.values,) if self.precision is None else (self.codes, self.scales)
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def held_as(self) -> str:
        """The precision the rows are held at: a code precision, or the float values' dtype name."""
        return self.precision or str(self.values.dtype).removeprefix("torch.")

    def take(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``start:stop`` as ``dtype`` values (a view for a float store; dequantized for codes)."""
        if self.precision is None:
            return self.values[start:stop]
        return self._decoded(self.codes[start:stop], self.scales[start:stop], dtype)

    def take_index(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rows at ``index`` (a long tensor on the store's device) as ``dtype`` values, in one piece."""
        if self.precision is None:
            return self.values.index_select(0, index)
        return self._decoded(self.codes.index_select(0, index), self.scales.index_select(0, index), dtype)

    def _decoded(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows of codes and their scales dequantized, as ``dtype``."""
        start, stop, scales = 0, codes.shape[0], scales.view(torch.float32)
        if self.cols % BLOCK:  # a short last block: the reference path (pads the rows to whole blocks)
            return dequantize(Quantized(self.precision, codes, scales, (stop - start, self.cols))).to(dtype)
        # whole blocks: the same float32 products as math.quantize.dequantize, without its padded copy
        if self.precision == "int8":
            values = codes.to(torch.float32)
        else:  # one lookup per byte: its low and high nibble's levels
            values = _nf4_pairs(codes.device)[codes.long()].view(codes.shape[0], -1)
        values = values.view(stop - start, -1, BLOCK) * scales[..., None]
        return values.view(stop - start, self.cols).to(dtype)

    @torch.no_grad()
    def append(self, rows: torch.Tensor | Quantized) -> int:
        """Put ``rows`` (q × cols: values, or codes of this store's precision) after the others; their offset.

        Float rows put into a coded store are quantized (blocks along each row, as the format does)."""
        offset = self.rows
        if self.precision is None:
            values = rows.dequantize() if isinstance(rows, Quantized) else rows
            self.values = torch.cat([self.values, values.to(self.values)])
            return offset
        if not isinstance(rows, Quantized) or rows.precision != self.precision or rows.block != BLOCK:
            values = rows.dequantize() if isinstance(rows, Quantized) else rows
            rows = quantize(values.float().cpu(), self.precision)
        self.codes = torch.cat([self.codes, rows.codes.to(self.codes)])
        bits = rows.scales.to(device=self.scales.device, dtype=torch.float32).contiguous().view(torch.int32)
        self.scales = torch.cat([self.scales, bits])
        return offset

    @torch.no_grad()
    def remove(self, start: int, stop: int) -> None:
        """Take rows ``start:stop`` out (the rows after them move down by ``stop - start``)."""
        names = ("values",) if self.precision is None else ("codes", "scales")
        for name in names:
            t = getattr(self, name)
            setattr(self, name, torch.cat([t[:start], t[stop:]]))

    def extra_repr(self) -> str:
        return f"{self.rows}×{self.cols}, {self.held_as}"


_NF4_PAIRS: dict[torch.device, torch.Tensor] = {}


def _nf4_pairs(device: torch.device) -> torch.Tensor:
    """256 × 2: for each byte of NF4 codes, the levels of its low nibble (first) and high nibble."""
    table = _NF4_PAIRS.get(device)
    if table is None:
        levels = torch.tensor(NF4_VALUES, dtype=torch.float32)
        byte = torch.arange(256)
        table = _NF4_PAIRS[device] = torch.stack([levels[byte & 0x0F], levels[byte >> 4]], 1).to(device)
    return table


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
    ):
        super().__init__()
        self.register_buffer("coef_A", coef_A)
        self.register_buffer("coef_B", coef_B)
        self.register_buffer("coef_slot", coef_slot)
        self.private_A = private_A
        self.private_Bt = private_Bt
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
    def out_features(self) -> int:
        return self.private_Bt.cols

    @property
    def in_features(self) -> int:
        return self.private_A.cols

    def private(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``task``'s private factors in the serving dtype: P_B (n × q, a transposed view) and P_A (q × d)."""
        offset, q = self.private_ranks[task]
        dtype = self.coef_A.dtype
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
        dtype = self.coef_A.dtype
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


__all__ = ["RowStore", "TaskFactors"]
