"""Quantized factors in a checkpoint (format version 4, docs/format.md): which tensors hold codes, and their layout.

A stored factor (role :data:`ROLES`) kept at a code precision (:data:`~share_convert.math.quantize.CODE_PRECISIONS`)
is two tensors: its codes under the factor's name (``I8`` rows × cols for int8, ``U8`` rows × ⌈cols / 2⌉
for nf4) and its per-block scales under the name + :data:`SCALES` (``F32`` rows × ⌈cols / 64⌉). The
manifest says which: each module's entry names the precision of every stored role (``precision``),
and the number of columns follows from the module's shape (bases and coefficients: the width of
their bases, private rows: n or d). Nothing else is recorded, so nothing can disagree.

The codes' and scales' headers are untrusted input: :func:`check_layout` compares them with what the
manifest implies before a byte of them is read, so that a crafted file is refused in one line rather
than read out of bounds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..dtypes import BLOCK, CODE_DTYPE, NAME_OF, PRECISIONS, blocks_per_row, code_columns  # noqa: F401 (re-exported)
from ..errors import CorruptCheckpointError

#: The stored factors of a module that may be kept at any precision (Gram matrices, rotations,
#: rows and records keep their float64/float32/int64 dtypes).
ROLES = ("basis_B", "basis_A", "coefs_B", "coefs_A", "private_B", "private_A")
#: Suffix of the tensor holding a quantized factor's scales.
SCALES = ".scales"
#: The precision names and the codes' layout are :mod:`share_convert.dtypes`' (the one table that
#: math/quantize.py codes by), so that reading a manifest and its headers never imports torch.
PRECISION_NAMES = PRECISIONS


#: The first format version that may hold codes.
CODES_VERSION = 4


def role_of(name: str) -> str | None:
    """The factor role a tensor name ends with (``modules/m/coefs_B`` -> ``coefs_B``), or None."""
    role = name.rsplit("/", 1)[-1]
    return role if name.startswith("modules/") and role in ROLES else None


def role_tensors(module: str, info: Mapping[str, Any]) -> Iterator[tuple[str, str, int]]:
    """Every factor tensor module ``module`` (manifest entry ``info``) may store: (name, role, columns).

    Bases and coefficients live under ``modules/<module>/`` or, with groups, ``modules/<module>/g<j>/``
    (their columns: that set's ``k_B``/``k_A``); the private rows under ``modules/<module>/``
    (columns n for ``private_B``, d for ``private_A``)."""
    groups = info.get("groups")
    sets = [(f"modules/{module}/g{j}/", g) for j, g in enumerate(groups)] if groups else [(f"modules/{module}/", info)]
    for prefix, bases in sets:
        for side in "BA":
            k = bases.get(f"k_{side}", 0)
            yield f"{prefix}basis_{side}", f"basis_{side}", k
            yield f"{prefix}coefs_{side}", f"coefs_{side}", k
    yield f"modules/{module}/private_B", "private_B", info["out_features"]
    yield f"modules/{module}/private_A", "private_A", info["in_features"]


def code_tensors(modules: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, int]]:
    """Tensor name -> (code precision, columns of its values), for every factor a (version 4)
    manifest's modules say is stored as codes."""
    out: dict[str, tuple[str, int]] = {}
    for module, info in modules.items():
        precision = info.get("precision") or {}
        if not any(p in CODE_DTYPE for p in precision.values()):
            continue
        for name, role, cols in role_tensors(module, info):
            if precision.get(role) in CODE_DTYPE:
                out[name] = (precision[role], cols)
    return out


def check_layout(
    name: str,
    precision: str,
    cols: int,
    codes: tuple[list[int], str],
    scales: tuple[list[int], str] | None,
    path: Path | None,
) -> int:
    """The rows of quantized tensor ``name``, once its codes' and scales' headers (shape, dtype; None:
    no scales tensor) are what ``precision`` and ``cols`` imply; :class:`CorruptCheckpointError` otherwise."""
    shape, dtype = codes
    rows = shape[0] if len(shape) == 2 else -1
    want_codes = ([rows, code_columns(precision, cols)], CODE_DTYPE[precision])
    want_scales = ([rows, blocks_per_row(cols)], "F32")
    problem = None
    if rows < 0 or (list(shape), dtype) != want_codes:
        problem = f"holds {dtype} {list(shape)}, not the {precision} codes of a {cols}-column tensor"
    elif scales is None:
        problem = f"has no scales (tensor {name}{SCALES} is missing)"
    elif (list(scales[0]), scales[1]) != want_scales:
        problem = f"has scales {scales[1]} {list(scales[0])}, not F32 {want_scales[0]}"
    if problem:
        raise CorruptCheckpointError(
            f"tensor {name} {problem}", path=path, hint="Re-create or re-download it; the file is damaged or crafted"
        )
    return rows


def module_precisions(
    modules: Mapping[str, Mapping[str, Any]], dtypes: Mapping[str, str], codes: Mapping[str, str]
) -> dict[str, dict[str, str]]:
    """Each module's ``precision`` entry as a writer stored its factors: role -> precision, for the
    roles it stored (``dtypes``: tensor name -> safetensors dtype; ``codes``: name -> code precision).

    Every module gets one when any factor is stored as codes (format version 4); otherwise only a
    module whose factors are not all in its ``dtype`` (so that float checkpoints stay byte for byte
    as earlier releases wrote them). One precision per role per module: a module whose groups store
    one role at two precisions is refused (ValueError)."""
    out: dict[str, dict[str, str]] = {}
    for module, info in modules.items():
        precision: dict[str, str] = {}
        for name, role, _cols in role_tensors(module, info):
            if name not in dtypes:
                continue
            here = codes.get(name) or NAME_OF.get(dtypes[name], dtypes[name])
            if precision.setdefault(role, here) != here:
                raise ValueError(
                    f"module {module} stores {role} at {precision[role]} and {here}: one precision per role"
                )
        if codes or any(p != info.get("dtype", "float32") for p in precision.values()):
            out[module] = dict(sorted(precision.items(), key=lambda item: ROLES.index(item[0])))
    return out
