"""Verified reads of a checkpoint's tensors: whole, by rows, or as stored bytes for a copy.

Every tensor read is checked against the SHA-256 recorded in the manifest (or, for a few rows of
a large tensor, against the SHA-256 of the blocks holding them), so a flipped byte is reported as
:class:`~share_convert.errors.CorruptCheckpointError` instead of silently changing a result.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import ITEMSIZE, NUMPY_NAME, torch_dtype
from ..errors import CorruptCheckpointError
from .format import block_digest, block_digests, sha256
from .quantized import CODES_VERSION, SCALES, check_layout, code_tensors
from .store import CheckpointFiles

if TYPE_CHECKING:
    import torch

    from ..math.quantize import Quantized

#: One tensor as stored: safetensors dtype, shape, bytes.
Stored = tuple[str, list[int], bytes]


class TensorStore:
    """The tensors of one checkpoint (``files``), read lazily and verified against ``manifest``'s
    checksums (``tensors``, and ``blocks`` from format version 2 on)."""

    def __init__(self, files: CheckpointFiles, manifest: dict[str, Any], version: int, lock: threading.RLock):
        self.files, self.path = files, files.path
        self._hashes: dict[str, str] = manifest.get("tensors", {})
        self._blocks: dict[str, dict[str, Any]] = manifest.get("blocks", {}) if version >= 2 else {}
        #: every block table, whatever the version: rows are read by blocks where a table says so
        self._row_blocks: dict[str, dict[str, Any]] = manifest.get("blocks", {})
        self._lock = lock
        self._cache: dict[str, Any] = {}
        self._verified: set[str] = set()  # tensors whose every byte this reader has verified
        #: factors stored as codes (format version 4): name -> (precision, columns of the values)
        self.codes: dict[str, tuple[str, int]] = code_tensors(manifest["modules"]) if version >= CODES_VERSION else {}

    def has(self, name: str) -> bool:
        return name in self.files.keys

    def _missing(self, name: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"tensor {name} is missing", path=self.path, hint="Re-create or re-download it")

    def tensor_meta(self, name: str) -> tuple[list[int], str]:
        """Shape and safetensors dtype of a tensor as :meth:`tensor` returns it, from the headers
        (nothing is read): a factor stored as codes is a float32 rows × columns tensor."""
        code = self.codes.get(name)
        if code is not None:
            return [self.code_rows(name), code[1]], "F32"
        return self.stored_meta(name)

    def stored_meta(self, name: str) -> tuple[list[int], str]:
        """Shape and safetensors dtype of a tensor as stored (codes for a quantized factor)."""
        if name not in self.files.keys:
            raise self._missing(name)
        entry = self.files.header(name)
        return list(entry["shape"]), entry["dtype"]

    def code_precision(self, name: str) -> str | None:
        """The code precision (int8, nf4) of a factor stored as codes; None for any other tensor."""
        code = self.codes.get(name)
        return code[0] if code is not None else None

    def code_rows(self, name: str) -> int:
        """The rows of quantized factor ``name``, once its codes' and scales' headers match the manifest."""
        precision, cols = self.codes[name]
        scales = self.stored_meta(name + SCALES) if self.has(name + SCALES) else None
        return check_layout(name, precision, cols, self.stored_meta(name), scales, self.path)

    def quantized(self, name: str, start: int | None = None, stop: int | None = None) -> Quantized:
        """Quantized factor ``name`` (or its rows ``start:stop``) as codes and scales, verified."""
        from ..math.quantize import BLOCK, Quantized

        precision, cols = self.codes[name]
        rows = self.code_rows(name)
        if start is None:
            start, stop = 0, rows
            codes, scales = self.tensor_as_stored(name), self.tensor_as_stored(name + SCALES)
        else:
            codes, scales = self._stored_rows(name, start, stop), self._stored_rows(name + SCALES, start, stop)
        return Quantized(precision, codes, scales, (stop - start, cols), BLOCK)

    def _entry(self, name: str) -> tuple[dict[str, Any], str]:
        expected = self._hashes.get(name)
        if name not in self.files.keys or expected is None:
            raise self._missing(name)
        return self.files.header(name), expected

    def _mismatch(self, name: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"checksum mismatch in tensor {name}: the file is corrupt",
            path=self.files.file_of(name),
            hint="Re-create or re-download it",
        )

    def raw(self, name: str) -> tuple[str, list[int], bytes, str]:
        """One tensor as stored: safetensors dtype, shape, bytes and SHA-256 (verified).

        Reads the bytes straight from the file (the header was validated by safetensors on open).
        """
        entry, expected = self._entry(name)
        begin, end = entry["data_offsets"]
        raw = self.files.read_bytes(name, begin, end)
        blocks = self._blocks.get(name)
        if blocks is not None:  # verified block by block, and the blocks' digests against the checksum
            shape = list(entry["shape"])
            step = len(raw) // shape[0] * int(blocks["rows"]) if shape and shape[0] else 0
            digests = block_digests(raw, step) if step else []
            actual = block_digest(digests) if digests == list(blocks["sha256"]) else None
        else:
            actual = sha256(raw)
        if actual != expected:
            raise self._mismatch(name)
        with self._lock:
            self._verified.add(name)
        return entry["dtype"], list(entry["shape"]), raw, expected

    def verify_once(self, name: str) -> None:
        """Verify a tensor's every byte unless this reader already has (it is then copied as it is)."""
        with self._lock:
            done = name in self._verified
        if not done:
            self.raw(name)

    def stored_layout(self, name: str) -> tuple[str, list[int], int, int, dict[str, Any] | None]:
        """Where a tensor lies in the file that holds it: dtype, shape, byte offset in that file,
        length, and its block checksums (None without)."""
        entry, _ = self._entry(name)
        begin, end = entry["data_offsets"]
        blocks = self._blocks.get(name)
        return entry["dtype"], list(entry["shape"]), self.files.data_start(name) + begin, end - begin, blocks

    def stored_bytes(self, name: str, begin: int, end: int) -> bytes:
        """Bytes ``begin:end`` of a tensor's data, unverified (callers verify what they keep)."""
        entry, _ = self._entry(name)
        start = entry["data_offsets"][0]
        return self.files.read_bytes(name, start + begin, start + end)

    def rows_raw(self, name: str, start: int, stop: int) -> Stored:
        """Rows ``start:stop`` of a tensor's bytes, verified by the blocks that hold them."""
        blocks = self._row_blocks.get(name)
        if blocks is None:
            dtype, shape, raw, _ = self.raw(name)
            row = len(raw) // shape[0] if shape and shape[0] else 0
            return dtype, [stop - start, *shape[1:]], raw[start * row : stop * row]
        entry, _ = self._entry(name)
        shape, dtype = list(entry["shape"]), entry["dtype"]
        begin, end = entry["data_offsets"]
        row = (end - begin) // shape[0]
        per = int(blocks["rows"])
        first, last = start // per, max((stop - 1) // per, start // per)
        lo, hi = first * per * row, min((last + 1) * per * row, end - begin)
        raw = self.files.read_bytes(name, begin + lo, begin + hi)
        step = per * row
        digests = blocks["sha256"]
        for b in range(first, last + 1):
            chunk = raw[(b - first) * step : (b - first + 1) * step]
            if b >= len(digests) or sha256(chunk) != digests[b]:
                raise self._mismatch(name)
        off = start * row - lo
        return dtype, [stop - start, *shape[1:]], raw[off : off + (stop - start) * row]

    def array(self, name: str) -> np.ndarray:
        """A (non-BF16) tensor as a numpy array, verified."""
        dtype, shape, raw, _ = self.raw(name)
        if dtype not in NUMPY_NAME:
            raise CorruptCheckpointError(
                f"tensor {name} has dtype {dtype}, which this table cannot hold", path=self.path, hint="Re-create it"
            )
        return np.frombuffer(raw, dtype=NUMPY_NAME[dtype]).reshape(shape)

    def rows_array(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a (non-BF16) tensor as a numpy array, verified by their blocks."""
        dtype, shape, raw = self.rows_raw(name, start, stop)
        return np.frombuffer(raw, dtype=NUMPY_NAME[dtype]).reshape(shape)

    def torch_dtype(self, name: str, dtype: str) -> torch.dtype:
        """The torch dtype of tensor ``name`` stored as ``dtype``; refused if no checkpoint holds it."""
        if dtype not in ITEMSIZE:
            raise CorruptCheckpointError(
                f"tensor {name} has dtype {dtype}, which no share-convert checkpoint holds",
                path=self.path,
                hint="Re-create or re-download it",
            )
        return torch_dtype(dtype)

    def as_tensor(self, name: str, dtype: str, shape: list[int], raw: bytes) -> torch.Tensor:
        """Stored bytes as a tensor (a copy: the map is read-only)."""
        import torch

        kind = self.torch_dtype(name, dtype)
        if not raw:
            return torch.zeros(shape, dtype=kind)
        return torch.frombuffer(bytearray(raw), dtype=kind).reshape(shape)

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor and verify its checksum (module tensors are kept for the next call); a
        factor stored as codes comes dequantized (float32, :func:`~share_convert.math.quantize.dequantize`)."""
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None:
            return cached
        if name in self.codes:
            t = self.quantized(name).dequantize()
        else:
            dtype, shape, raw, _ = self.raw(name)
            t = self.as_tensor(name, dtype, shape, raw)
        if name.startswith("modules/"):
            with self._lock:
                if len(self._cache) >= 32:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[name] = t
        return t

    def stacked(self, names: list[str]) -> torch.Tensor:
        """Tensors of one shape and dtype, read (verified) into one ``len(names) × shape`` tensor."""
        parts = [self.raw(name) for name in names]
        dtype, shape = parts[0][0], parts[0][1]
        if any(p[0] != dtype or p[1] != shape for p in parts):
            raise ValueError("stacked tensors must share one shape and dtype")
        return self.as_tensor(names[0], dtype, [len(names), *shape], b"".join(p[2] for p in parts))

    def tensor_as_stored(self, name: str) -> torch.Tensor:
        """One tensor as stored (codes for a quantized factor), verified; not cached."""
        dtype, shape, raw, _ = self.raw(name)
        return self.as_tensor(name, dtype, shape, raw)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a (stacked) tensor, reading and verifying only the blocks that hold
        them; rows of a factor stored as codes come dequantized, equal to those rows of :meth:`tensor`."""
        if name in self.codes:
            if name not in self._row_blocks:
                return self.tensor(name)[start:stop]
            return self.quantized(name, start, stop).dequantize()
        return self._stored_rows(name, start, stop)

    def _stored_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        if name not in self._row_blocks:  # small: read whole (verified once, then cached)
            return self.tensor(name)[start:stop] if name not in self.codes else self.tensor_as_stored(name)[start:stop]
        return self.as_tensor(name, *self.rows_raw(name, start, stop))

    def verify_all(self) -> None:
        """Read every tensor, verifying its checksum and those of its blocks; refuse a tensor the
        manifest does not name."""
        for name in sorted(self._hashes):
            self.raw(name)  # every byte, and for large tensors every block
        extra = self.files.keys - set(self._hashes)
        if extra:
            raise CorruptCheckpointError(
                f"tensor {sorted(extra)[0]} is not in the manifest", path=self.path, hint="Re-create it"
            )
