"""Tensor dtypes: one table for the format, the readers, the engine and the writers.

A dtype has three names: safetensors' (``"F32"``, what files and the format's records say),
the manifest's and the options' (``"float32"``, what users type), and torch's (``torch.float32``).
This module maps between them, gives sizes and unit roundoffs, and states the two policies that
depend on a dtype: which factor dtypes can be read, and which dtype a factor is kept in.
torch is imported only when a torch dtype is asked for, so that light commands start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Bytes per element, by safetensors name.
ITEMSIZE = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
#: The safetensors dtypes of LoRA factors that can be read (all are computed on in float32 or wider).
FLOAT_NAMES = ("F64", "F32", "BF16", "F16")
#: safetensors name -> the manifest's and the options' name.
NAME_OF = {"F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16"}
#: the manifest's name -> safetensors name.
ST_OF = {name: st for st, name in NAME_OF.items()}
#: safetensors name -> numpy's name, for every dtype the format may hold but BF16 (numpy has none: read through torch).
NUMPY_NAME = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
#: The largest relative rounding error of one stored number, by the manifest's name (2^-(mantissa bits + 1)).
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def itemsize(st_name: str) -> int:
    """Bytes per element of a safetensors dtype name (``"F32"`` → 4); 4 for a name it does not know."""
    return ITEMSIZE.get(st_name, 4)


def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors name -> torch dtype, for every dtype the format may hold."""
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }


def torch_dtype(st_name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"F32"`` → ``torch.float32``)."""
    return torch_dtypes()[st_name]


def st_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float32`` → ``"F32"``)."""
    return {v: k for k, v in torch_dtypes().items()}[dtype]


def kept_as(st: str) -> torch.dtype:
    """The dtype a factor stored as ``st`` is kept and written in: its own, except float64, which
    (like a dtype this table does not know) is kept in float32: LoRA training never needs float64,
    and a Share checkpoint stores float32 at most."""
    import torch

    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(st, torch.float32)


# -- storage precisions of stored factors (docs/format.md, version 4; math/quantize.py codes them) --------

#: Precisions that keep each number itself, cast.
FLOAT_PRECISIONS = ("float32", "float16", "bfloat16")
#: Precisions that keep codes plus a float32 scale per block of :data:`BLOCK` numbers along a row.
CODE_PRECISIONS = ("int8", "nf4")
#: Every storage precision a manifest may name.
PRECISIONS = FLOAT_PRECISIONS + CODE_PRECISIONS
#: Bits of one stored number (without scales).
BITS = {"float32": 32, "float16": 16, "bfloat16": 16, "int8": 8, "nf4": 4}
#: The safetensors dtype of each code precision's codes.
CODE_DTYPE = {"int8": "I8", "nf4": "U8"}
#: Numbers per scale block, along a row (the block size of QLoRA and bitsandbytes' default).
BLOCK = 64


def blocks_per_row(cols: int, block: int = BLOCK) -> int:
    """Scale blocks in a row of ``cols`` numbers (the last may be shorter)."""
    return -(-cols // block) if cols else 0


def code_columns(precision: str, cols: int) -> int:
    """Columns of the codes of a row of ``cols`` numbers: one byte each (int8), two per byte (nf4)."""
    return cols if precision == "int8" else -(-cols // 2)
