"""The Share checkpoint format's constants and checksums (docs/format.md).

A checkpoint is one self-describing ``.safetensors`` file, or above a size its shards with an
index in the Hugging Face convention. Format version 2 (written) stores per module, for all of its
tasks at once:

- ``modules/<module>/basis_B`` (n × k_B) and ``basis_A`` (d × k_A): the shared bases β, α;
- ``modules/<module>/gram_B`` (k_B × k_B) and ``gram_A``: the weighted stack's Gram matrix in
  basis coordinates, kept for continual updates (spec, section 5);
- ``modules/<module>/coefs_B`` (P × k_B) and ``coefs_A`` (P × k_A): every task's coefficients,
  one row per coefficient column (task t owns ``p_t`` consecutive rows);
- ``modules/<module>/private_B`` (Q × n) and ``private_A`` (Q × d): every task's private
  correction, one row per private direction;

and, for the whole checkpoint, the per-(task, module) figures as two dense tables
``records/int`` (T × M × 8, int32) and ``records/float`` (T × M × 4, float64), plus
``tasks/<task>/heads/<key>`` (non-LoRA tensors, byte for byte). The number of tensors and the
size of the header grow with tasks + modules, never with their product.

The ``__metadata__`` entry ``share_convert`` holds a JSON manifest (format version, options,
tasks, module shapes and ranks, history, a SHA-256 of every tensor and of every block of rows of
the large ones), and ``share_convert_sha256`` the SHA-256 of that manifest text.

Version 3 adds, per set of bases, a basis-rotation chain (``rotations_B``, ``rotations_A``,
``chain_rows``): coefficient rows written under earlier bases, read rotated into the current ones
(:class:`~share_convert.checkpoint.records.Chain`; ``add`` then writes only what changed). Files without a
chain are written as version 2.

Version 4 may store any factor (bases, coefficients, private rows) as int8 or NF4 codes with
float32 scales per block of 64 numbers along each row (``<name>`` and ``<name>.scales``; each
module's ``precision`` names every role's precision): readers return them dequantized
(:mod:`.quantized`). Files without codes are written as version 2 or 3.

Version 1 (one tensor per task, module and side; figures in JSON) stays readable: the reader
(:mod:`.reader`) presents every version through the same accessors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are touched: reading a manifest does not need it
    import torch

FORMAT_NAME = "share-convert"
#: The highest format version this reader knows. Files are written as version 2 unless a module
#: stores a basis-rotation chain (version 3; see :class:`~share_convert.checkpoint.records.Chain`)
#: or a factor as int8/nf4 codes (version 4; :mod:`~share_convert.checkpoint.quantized`).
FORMAT_VERSION = 4
#: The tensors of a chain, beside the bases they lead to: ``<prefix>rotations_B`` and so on.
CHAIN_PARTS = ("rotations_B", "rotations_A", "chain_rows")
MANIFEST_KEY = "share_convert"
MANIFEST_SHA_KEY = "share_convert_sha256"
#: The tensors one task may have in one module (format version 1: ``tasks/<task>/<module>/<part>``).
TASK_PARTS = ("coef_B", "coef_A", "private_B", "private_A")
#: Tensors larger than this carry a SHA-256 per block of rows too, so that reading one task's rows
#: reads and verifies about this many bytes rather than the whole tensor.
BLOCK_BYTES = 1 << 16
MIN_BLOCKS = 16


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def sha256(data: bytes | memoryview) -> str:
    """The hex SHA-256 of ``data``: every checksum of the format."""
    return hashlib.sha256(data).hexdigest()


def block_digest(blocks: Sequence[str]) -> str:
    """The checksum of a tensor stored with block checksums: the SHA-256 of its blocks' hex digests, joined."""
    return sha256("".join(blocks).encode())


def block_digests(raw: bytes | memoryview, step: int) -> list[str]:
    """The SHA-256 of every ``step`` bytes of ``raw`` (the last block may be shorter)."""
    view = memoryview(raw)
    return [sha256(view[i : i + step]) for i in range(0, len(raw), step)]


def block_rows(shape: Sequence[int], itemsize: int) -> int | None:
    """Rows per checksum block of a tensor, or None when one checksum covers it (small or 1-D)."""
    if len(shape) < 2 or not shape[0]:
        return None
    row = itemsize
    for s in shape[1:]:
        row *= s
    if row * shape[0] <= BLOCK_BYTES or row == 0:
        return None
    # blocks of at most BLOCK_BYTES, and at least MIN_BLOCKS of them: a few rows cost a few blocks
    return max(min(BLOCK_BYTES // row, -(-shape[0] // MIN_BLOCKS)), 1)
