"""Storage precisions of stored factors: float casts, int8 and NF4 codes with per-block scales.

A stored factor (a basis, a task's coefficients or private factors, stacked) is a 2-D tensor. Its
*precision* says how each number is kept:

- ``float32``, ``float16``, ``bfloat16``: the number itself, cast (what the format always did);
- ``int8``: blocks of :data:`BLOCK` consecutive numbers along each row share one float32 scale
  s = max|x| / 127 of the block; a number is kept as the integer round(x / s) in [−127, 127] and
  read back as code × s (absmax quantization; relative RMS error ≈ 0.6% on Gaussian values);
- ``nf4``: the same blocks with s = max|x|; a number is kept as the index (4 bits) of the nearest
  of the 16 NormalFloat values :data:`NF4_VALUES` to x / s and read back as value × s.

Why NF4 rather than int4: LoRA factors, bases and coefficients are close to Gaussian inside a block
(canonical factors are rotations of Gaussian-like updates), and NF4's levels are the quantiles of a
normal distribution (Dettmers et al. 2023, QLoRA, section 3), so they spend the 16 levels where the
values are: on Gaussian data NF4's RMS error is about 15% below int4 absmax's with the same blocks
(9.2% against 10.8% of the values' RMS, tests/test_quantize.py).

Blocks run along each row only, never across rows: a task owns whole rows of the stacked
coefficients and private factors (docs/format.md), so one task's rows, their codes and their
scales can be read alone. The last block of a row may be shorter than :data:`BLOCK`. Two NF4 codes
share a byte: element 2j in the low nibble, 2j + 1 in the high nibble (a row of odd length ends with
a zero high nibble). Scales are float32, so that no block's range is lost (float16 scales underflow
on the tail directions of a spectrum).

Quantizing is deterministic (float64 division, round half to even, nearest level with ties to the
lower level), and the dequantized values are float32: exactly what every reader computes, so
errors measured on :func:`dequantize`'s output are what extraction gives back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# the precision names and the codes' layout, one table for the format's torch-free readers and this module
from ..dtypes import (  # noqa: F401 (re-exported)
    BITS,
    BLOCK,
    CODE_PRECISIONS,
    FLOAT_PRECISIONS,
    PRECISIONS,
    blocks_per_row,
    code_columns,
)

#: The 16 NormalFloat-4 levels, ascending (QLoRA, appendix E): the averages of adjacent quantiles of
#: N(0, 1) at 16 + 1 evenly spaced probabilities on each side of 0 (8 positive, 7 negative levels and an
#: exact 0), scaled to [−1, 1]. Derived with ``ndtri`` in float64 and rounded to float32; written out
#: so that a reader never depends on a library's ``ndtri``.
NF4_VALUES = (
    -1.0,
    -0.6961929202079773,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444135189056396,
    -0.18477343022823334,
    -0.09104999154806137,
    0.0,
    0.07958032935857773,
    0.16093017160892487,
    0.24611228704452515,
    0.33791518211364746,
    0.44070979952812195,
    0.5626169443130493,
    0.7229567170143127,
    1.0,
)


@dataclass(frozen=True)
class Quantized:
    """A 2-D tensor kept as codes and per-block scales (:data:`CODE_PRECISIONS`).

    ``codes``: int8 (rows × cols) for int8; uint8 (rows × ⌈cols / 2⌉) for nf4. ``scales``: float32
    (rows × ⌈cols / block⌉). ``shape``: the (rows, cols) of the values.
    """

    precision: str
    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    block: int = BLOCK

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes plus scales."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 4

    def dequantize(self) -> torch.Tensor:
        """The values as every reader gets them (float32)."""
        return dequantize(self)

    def rows(self, start: int, stop: int) -> Quantized:
        """Rows ``start:stop`` alone: blocks never cross rows, so these are the codes and scales that
        quantizing those rows by themselves gives."""
        return Quantized(self.precision, self.codes[start:stop], self.scales[start:stop], (stop - start, self.shape[1]),
                         self.block)  # fmt: skip

    @staticmethod
    def stack(parts: list[Quantized]) -> Quantized:
        """Rows of several tensors of one precision and width, one after another (row-wise, so equal to
        quantizing the stacked values)."""
        first = parts[0]
        rows = sum(q.shape[0] for q in parts)
        codes, scales = torch.cat([q.codes for q in parts]), torch.cat([q.scales for q in parts])
        return Quantized(first.precision, codes, scales, (rows, first.shape[1]), first.block)


def check_precision(name: str) -> str:
    """``name`` if it is a storage precision; ValueError otherwise."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: one of {', '.join(PRECISIONS)}")
    return name


def stored_bytes(rows: int, cols: int, precision: str, block: int = BLOCK) -> int:
    """Bytes a ``rows × cols`` tensor takes at ``precision``, scales included: what the planner counts."""
    if precision in FLOAT_PRECISIONS:
        return rows * cols * BITS[precision] // 8
    check_precision(precision)
    return rows * (code_columns(precision, cols) + 4 * blocks_per_row(cols, block))


def bits_per_number(rows: int, cols: int, precision: str, block: int = BLOCK) -> float:
    """Stored bits per number of a ``rows × cols`` tensor at ``precision``, scales included."""
    count = rows * cols
    return 8 * stored_bytes(rows, cols, precision, block) / count if count else float(BITS[precision])


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` (rows × cols) as float64 blocks (rows × blocks × block), a fresh tensor the caller may
    overwrite; a row whose length is not a whole number of blocks is zero-padded."""
    rows, cols = x.shape
    nb = blocks_per_row(cols, block)
    if cols == nb * block:  # whole blocks: the float64 copy itself, no padded buffer
        return x.to(torch.float64, memory_format=torch.contiguous_format, copy=True).view(rows, nb, block)
    padded = torch.zeros(rows, nb * block, dtype=torch.float64, device=x.device)
    padded[:, :cols] = x
    return padded.view(rows, nb, block)


def _codes(x: torch.Tensor, precision: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes of ``x`` (rows × blocks × block: int8 codes as integral float64 values, NF4 level
    indices as int64) and the float32 scales (rows × blocks), before packing."""
    blocks = _blocked(x.detach(), block)
    # max |x| per block, without a copy of |x| (exact: the padding zeros never exceed it)
    absmax = torch.maximum(blocks.amax(-1), blocks.amin(-1).neg())
    if precision == "int8":
        scales = (absmax / 127).to(torch.float32)
        # divide by the float32 scale as stored, so that code × scale is the nearest value a reader can form
        div = torch.where(scales > 0, scales, 1).to(torch.float64)
        return torch.round_(blocks.div_(div[..., None])).clamp_(-127, 127), scales
    scales = absmax.to(torch.float32)
    div = torch.where(scales > 0, scales, 1).to(torch.float64)
    # the nearest level: the number of midpoints strictly below the value (ties go to the lower level)
    idx = torch.bucketize(blocks.div_(div[..., None]).clamp_(-1, 1), _nf4_midpoints(x.device), right=False)
    return idx, scales


def _nf4_midpoints(device: torch.device) -> torch.Tensor:
    levels = torch.tensor(NF4_VALUES, dtype=torch.float64, device=device)
    return (levels[1:] + levels[:-1]) / 2


def _check_quantizable(x: torch.Tensor, precision: str, caller: str) -> None:
    if precision not in CODE_PRECISIONS:
        raise ValueError(f"{caller}() takes {' or '.join(CODE_PRECISIONS)}, got {precision!r}")
    if x.dim() != 2:
        raise ValueError(f"{caller}() takes a 2-D tensor, got shape {tuple(x.shape)}")


def quantize(x: torch.Tensor, precision: str, block: int = BLOCK) -> Quantized:
    """``x`` (2-D, any float dtype) as codes and per-block scales at ``precision`` (int8 or nf4)."""
    _check_quantizable(x, precision, "quantize")
    rows, cols = x.shape
    codes, scales = _codes(x, precision, block)
    if precision == "int8":
        codes = codes.view(rows, -1)[:, :cols].to(torch.int8).contiguous()
        return Quantized(precision, codes, scales, (rows, cols), block)
    idx = codes.view(rows, -1)[:, :cols].to(torch.uint8)
    if cols % 2:
        idx = torch.cat([idx, torch.zeros(rows, 1, dtype=torch.uint8, device=x.device)], 1)
    pairs = idx.view(rows, -1, 2)
    codes = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    return Quantized(precision, codes, scales, (rows, cols), block)


def round_trip(x: torch.Tensor, precision: str, block: int = BLOCK) -> torch.Tensor:
    """``dequantize(quantize(x, precision))``, equal to it number for number, without packing the
    codes: what the engine measures errors on (float32)."""
    _check_quantizable(x, precision, "round_trip")
    rows, cols = x.shape
    codes, scales = _codes(x, precision, block)
    if precision == "int8":
        values = codes.to(torch.float32)
    else:
        values = torch.tensor(NF4_VALUES, dtype=torch.float32, device=x.device)[codes]
    # the reader's product: float32 value × float32 scale
    return values.mul_(scales[..., None]).view(rows, -1)[:, :cols].contiguous()


def dequantize(q: Quantized) -> torch.Tensor:
    """The float32 values of ``q``: code × scale (int8) or level × scale (nf4), per block."""
    rows, cols = q.shape
    nb = blocks_per_row(cols, q.block)
    if q.precision == "int8":
        values = q.codes.to(torch.float32)
    elif q.precision == "nf4":
        # one lookup per byte: its two levels (low nibble first), from a 256 × 2 table
        pairs = nf4_pairs(q.codes.device).index_select(0, q.codes.reshape(-1).to(torch.int32))
        values = pairs.view(rows, -1)[:, :cols]
    else:
        raise ValueError(f"unknown code precision {q.precision!r}")
    if cols == nb * q.block:  # whole blocks: scale in place, no padded buffer
        values = values.contiguous()  # a fresh tensor: the codes are never written
        return values.view(rows, nb, q.block).mul_(q.scales.to(torch.float32)[..., None]).view(rows, cols)
    padded = torch.zeros(rows, nb * q.block, dtype=torch.float32, device=values.device)
    padded[:, :cols] = values
    out = padded.view(rows, nb, q.block) * q.scales.to(torch.float32)[..., None]
    return out.view(rows, -1)[:, :cols].contiguous()


_NF4_PAIRS: dict[torch.device, torch.Tensor] = {}


def nf4_pairs(device: torch.device) -> torch.Tensor:
    """256 × 2 float32, made once per device: for each byte of NF4 codes, the levels of its low nibble
    (first) and of its high nibble, so that one lookup per byte decodes two numbers."""
    table = _NF4_PAIRS.get(device)
    if table is None:
        levels = torch.tensor(NF4_VALUES, dtype=torch.float32)
        byte = torch.arange(256)
        table = torch.stack([levels[byte & 0x0F], levels[byte >> 4]], 1).to(device).contiguous()
        _NF4_PAIRS[device] = table
    return table


def store(x: torch.Tensor, precision: str, block: int = BLOCK) -> torch.Tensor | Quantized:
    """``x`` kept at ``precision``: cast for a float precision, :func:`quantize` for a code."""
    if precision in FLOAT_PRECISIONS:
        return x.to(getattr(torch, precision))
    return quantize(x, precision, block)


def stored_values(x: torch.Tensor, precision: str, block: int = BLOCK) -> torch.Tensor:
    """What a reader gets back of ``x`` (2-D) stored at ``precision``: ``values(store(x, precision))``."""
    if precision in FLOAT_PRECISIONS:
        return x.to(getattr(torch, precision))
    return round_trip(x, precision, block)


def values(stored: torch.Tensor | Quantized) -> torch.Tensor:
    """What a reader gets back from :func:`store`'s result: the tensor itself, or the dequantized values."""
    return stored.dequantize() if isinstance(stored, Quantized) else stored


def relative_rms_error(precision: str) -> float:
    """The relative RMS error of one number stored at ``precision``, for Gaussian values in blocks of
    :data:`BLOCK`: the planner's estimate before it measures the exact error (float: the unit roundoff
    over √3, the RMS of a uniform rounding error; codes: measured once on N(0, 1) samples, see tests)."""
    return {
        "float32": 2.0**-24 / math.sqrt(3),
        "float16": 2.0**-11 / math.sqrt(3),
        "bfloat16": 2.0**-8 / math.sqrt(3),
        "int8": 0.006,
        "nf4": 0.093,
    }[check_precision(precision)]
