"""Ragged row stores: rows of several tasks (or of a basis) concatenated without padding.

A layer's tasks have private ranks of their own (0, 2, 8, …). Padding them to the largest rank made
the runtime hold more than the checkpoint (and than PEFT) on real adapters, which share little. A
:class:`RowStore` holds one side's rows of every task one after the other: a task's rows are
``[offset, offset + q)``.

A store holds float values in the serving dtype, or, for a checkpoint loaded with
``keep_quantized=True``, the codes and per-block scales of its int8/NF4 rows as the checkpoint
stores them (blocks of 64 along each row, share_convert.math.quantize): :meth:`RowStore.take` then
dequantizes only the rows a call uses. NF4 is decoded through a 256 × 2 table (a byte's low and
high nibble's levels), one ``index_select`` per call for all the rows taken, built once per device.
"""

from __future__ import annotations

import torch
from torch import nn

from ..math.quantize import (
    BLOCK,
    CODE_PRECISIONS,
    Quantized,
    blocks_per_row,
    code_columns,
    nf4_pairs,
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
        """Rows of codes and their scales dequantized, as ``dtype``: the same float32 products
        (code or level × the block's scale) as math.quantize.dequantize, without its padded copy."""
        rows, cols, scales = codes.shape[0], self.cols, scales.view(torch.float32)
        if self.precision == "int8":
            values = codes.to(torch.float32)
        else:  # one lookup per byte: its low and high nibble's levels (int32 indices: no int64 copy)
            pairs = nf4_pairs(codes.device).index_select(0, codes.reshape(-1).to(torch.int32))
            values = pairs.view(rows, 2 * codes.shape[1])[:, :cols]
        if scales.shape[1] == 1:  # one block per row (short rows: the bases' and coefficients' k columns)
            values.mul_(scales)
        elif cols % BLOCK == 0:
            values.view(rows, -1, BLOCK).mul_(scales[..., None])
        else:  # a short last block
            values.mul_(scales.repeat_interleave(BLOCK, 1)[:, :cols])
        return values if dtype == torch.float32 else values.to(dtype)

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


__all__ = ["RowStore"]
