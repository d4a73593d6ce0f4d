"""The Share checkpoint: one self-describing ``.safetensors`` file (format in docs/format.md).

Tensors:

- ``modules/<module>/basis_B`` (n × k_B) and ``basis_A`` (d × k_A): the shared bases β, α;
- ``modules/<module>/gram_B`` (k_B × k_B) and ``gram_A``: the weighted stack's Gram matrix in
  basis coordinates, kept for continual updates (spec, section 5);
- ``tasks/<task>/<module>/coef_B`` (k_B × p) and ``coef_A`` (k_A × p): the coefficients;
- ``tasks/<task>/<module>/private_B`` (n × q) and ``private_A`` (q × d): the private correction;
- ``tasks/<task>/heads/<key>``: non-LoRA tensors, byte for byte.

The ``__metadata__`` entry ``share_convert`` holds a JSON manifest (format version, options,
tasks, per-module ranks and errors, history, a SHA-256 of every tensor), and
``share_convert_sha256`` the SHA-256 of that manifest text.

:class:`CheckpointWriter` streams tensors to disk as they are produced and publishes the file
atomically; :class:`Checkpoint` reads lazily, verifying each tensor it reads.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import weakref
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .atomic import temp_file_beside
from .errors import (
    CorruptCheckpointError,
    OutputExistsError,
    UnknownTaskError,
    UnsupportedFormatError,
    first_line,
)

FORMAT_NAME = "share-convert"
FORMAT_VERSION = 1
MANIFEST_KEY = "share_convert"
MANIFEST_SHA_KEY = "share_convert_sha256"
_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
#: The tensors one task may have in one module: ``tasks/<task>/<module>/<part>``.
TASK_PARTS = ("coef_B", "coef_A", "private_B", "private_A")


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_output(path: Path, force: bool) -> None:
    """Refuse to overwrite an existing output unless ``force``; check its folder is writable."""
    if path.exists() and not force:
        raise OutputExistsError("already exists", path=path, hint="Pass --force to overwrite it")
    check_parent_writable(path)


def check_parent_writable(path: Path) -> None:
    """The folder that will hold ``path`` exists and is writable (checked before any work)."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputExistsError("the output folder does not exist", path=parent, hint="Create it first")
    if not os.access(parent, os.W_OK):
        raise OutputExistsError("the output folder is not writable", path=parent, hint="Choose another output")


class CheckpointWriter:
    """Writes a safetensors file tensor by tensor, without holding the tensors in memory.

    Tensor data goes to a temporary file beside the target as it arrives; :meth:`finish` writes
    the header, appends the data and renames the result over the target in one step, so a crash
    at any moment leaves the previous file (if any) intact and no partial file at the target.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        fd, self._data_path = temp_file_beside(self.path, ".data.tmp")
        self._data = os.fdopen(fd, "wb")
        self._entries: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []
        self._offset = 0
        self.hashes: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        raw = tensor_bytes(tensor)
        self.add_raw(name, _ST_DTYPES[tensor.dtype], list(tensor.shape), raw, sha256(raw))

    def add_stacked(self, names: list[str], stacked: torch.Tensor) -> None:
        """Add ``stacked[i]`` under ``names[i]``: one conversion to bytes for many small tensors."""
        if not names:
            return
        raw = tensor_bytes(stacked)
        size = len(raw) // len(names)
        dtype, shape = _ST_DTYPES[stacked.dtype], list(stacked.shape[1:])
        for i, name in enumerate(names):
            part = raw[i * size : (i + 1) * size]
            self.add_raw(name, dtype, shape, part, sha256(part))

    def add_raw(self, name: str, dtype: str, shape: list[int], raw: bytes, digest: str) -> None:
        """Add a tensor as stored bytes whose SHA-256 is already known (copies between checkpoints)."""
        if name in self._entries:
            raise ValueError(f"duplicate tensor name {name}")
        self._data.write(raw)
        self._entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [self._offset, self._offset + len(raw)]}
        self._order.append(name)
        self._offset += len(raw)
        self.hashes[name] = digest

    def finish(self, manifest: dict[str, Any]) -> None:
        """Publish the file atomically with ``manifest`` (plus tensor hashes) in its metadata."""
        manifest = dict(manifest, tensors={k: self.hashes[k] for k in sorted(self.hashes)})
        text = json.dumps(manifest, separators=(",", ":"), allow_nan=False)
        header: dict[str, Any] = {
            "__metadata__": {"format": "pt", MANIFEST_KEY: text, MANIFEST_SHA_KEY: sha256(text.encode())}
        }
        header.update(self._entries)
        blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data.flush()
        os.fsync(self._data.fileno())
        self._data.close()
        parent = self.path.parent if str(self.path.parent) else Path(".")
        fd, tmp = temp_file_beside(self.path)
        try:
            with os.fdopen(fd, "wb") as out, open(self._data_path, "rb") as data:
                out.write(struct.pack("<Q", len(blob)))
                out.write(blob)
                while chunk := data.read(1 << 24):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
            _fsync_dir(parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self._data_path.unlink(missing_ok=True)

    def abort(self) -> None:
        if not self._data.closed:
            self._data.close()
        self._data_path.unlink(missing_ok=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _close_all(resources: list[Any]) -> None:
    for r in reversed(resources):
        r.close()
    resources.clear()


def is_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a safetensors file carrying a Share manifest."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return MANIFEST_KEY in (f.metadata() or {})
    except Exception:
        return False


class Checkpoint:
    """A Share checkpoint opened lazily: the manifest is parsed, tensors are read on demand.

    Every tensor read is checked against the SHA-256 recorded in the manifest, so a flipped byte
    is reported as :class:`CorruptCheckpointError` instead of silently changing a result.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CorruptCheckpointError("no such file", path=self.path, hint="Check the path")
        try:
            self._file = safe_open(str(self.path), framework="pt")
            meta = self._file.metadata() or {}
        except Exception as e:
            raise CorruptCheckpointError(
                f"not a readable safetensors file ({first_line(e, 160)})",
                path=self.path,
                hint="Re-create or re-download the checkpoint",
            ) from None
        if MANIFEST_KEY not in meta:
            raise CorruptCheckpointError(
                "is a safetensors file but not a Share checkpoint (no share_convert manifest)",
                path=self.path,
                hint="Create one with 'share-convert merge'",
            )
        text = meta[MANIFEST_KEY]
        if sha256(text.encode()) != meta.get(MANIFEST_SHA_KEY):
            raise CorruptCheckpointError(
                "manifest checksum mismatch: the file is corrupt", path=self.path, hint="Re-create or re-download it"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(text)
        except json.JSONDecodeError:
            raise CorruptCheckpointError(
                "manifest is not valid JSON", path=self.path, hint="Re-create or re-download it"
            ) from None
        if self.manifest.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(
                "manifest is not a share-convert manifest", path=self.path, hint="Re-create it"
            )
        version = self.manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
            raise UnsupportedFormatError(
                f"format version {version!r}; this share-convert reads versions up to {FORMAT_VERSION}",
                path=self.path,
                hint="Upgrade share-convert",
            )
        self._keys = set(self._file.keys())
        self._cache: dict[str, torch.Tensor] = {}
        # held open from here, so that raw reads see this file even if the path is replaced later
        self._handle = open(self.path, "rb")  # noqa: SIM115 (lives as long as the reader)
        self._layout: tuple[mmap.mmap, int, dict[str, Any]] | None = None
        self._open: list[Any] = [self._handle]  # closed by close(), or when the reader is collected
        self._closer = weakref.finalize(self, _close_all, self._open)

    def close(self) -> None:
        """Release the file (also done when the reader is garbage-collected)."""
        self._closer()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- manifest views ---------------------------------------------------------------------------------
    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        return self.manifest["tasks"]

    @property
    def modules(self) -> dict[str, dict[str, Any]]:
        return self.manifest["modules"]

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {})

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.manifest.get("history", [])

    def task(self, name: str) -> dict[str, Any]:
        if name not in self.tasks:
            names = ", ".join(sorted(self.tasks))
            raise UnknownTaskError(f"no task named {name!r}", path=self.path, hint=f"Available tasks: {names}")
        return self.tasks[name]

    # -- tensors --------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._keys

    def tensor_meta(self, name: str) -> tuple[list[int], str]:
        """Shape and safetensors dtype of a tensor, from the header (nothing is read)."""
        if name not in self._keys:
            raise CorruptCheckpointError(
                f"tensor {name} is missing", path=self.path, hint="Re-create or re-download it"
            )
        entry = self._mapped()[2][name]
        return list(entry["shape"]), entry["dtype"]

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor and verify its checksum (bases and grams are kept for the next call)."""
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        t = self._read(name)
        if name.startswith("modules/"):
            if len(self._cache) >= 16:
                self._cache.pop(next(iter(self._cache)))
            self._cache[name] = t
        return t

    def _read(self, name: str) -> torch.Tensor:
        dtype, shape, raw, _ = self.raw(name)
        if not raw:
            return torch.zeros(shape, dtype=self._torch_dtype(name, dtype))
        return torch.frombuffer(bytearray(raw), dtype=self._torch_dtype(name, dtype)).reshape(shape)

    def _torch_dtype(self, name: str, dtype: str) -> torch.dtype:
        if dtype not in _TORCH_DTYPES:
            raise CorruptCheckpointError(
                f"tensor {name} has dtype {dtype}, which no share-convert checkpoint holds",
                path=self.path,
                hint="Re-create or re-download it",
            )
        return _TORCH_DTYPES[dtype]

    def stacked(self, names: list[str]) -> torch.Tensor:
        """Tensors of one shape and dtype, read (verified) into one ``len(names) × shape`` tensor."""
        parts = [self.raw(name) for name in names]
        dtype, shape = parts[0][0], parts[0][1]
        if any(p[0] != dtype or p[1] != shape for p in parts):
            raise ValueError("stacked tensors must share one shape and dtype")
        data = b"".join(p[2] for p in parts)
        torch_dtype = self._torch_dtype(names[0], dtype)
        if not data:
            return torch.zeros([len(names), *shape], dtype=torch_dtype)
        return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape([len(names), *shape])

    def raw(self, name: str) -> tuple[str, list[int], bytes, str]:
        """One tensor as stored: safetensors dtype, shape, bytes and SHA-256 (verified).

        Reads the bytes straight from the file (the header was validated by safetensors on open):
        many small coefficient tensors are read per update, and this avoids a tensor per read.
        """
        expected = self.manifest.get("tensors", {}).get(name)
        if name not in self._keys or expected is None:
            raise CorruptCheckpointError(
                f"tensor {name} is missing", path=self.path, hint="Re-create or re-download it"
            )
        data, start, header = self._mapped()
        entry = header[name]
        begin, end = entry["data_offsets"]
        raw = data[start + begin : start + end]
        if len(raw) != end - begin:
            raise CorruptCheckpointError(
                f"tensor {name} cannot be read (the file is truncated)",
                path=self.path,
                hint="Re-create or re-download it",
            )
        if sha256(raw) != expected:
            raise CorruptCheckpointError(
                f"checksum mismatch in tensor {name}: the file is corrupt",
                path=self.path,
                hint="Re-create or re-download it",
            )
        return entry["dtype"], list(entry["shape"]), raw, expected

    def _mapped(self) -> tuple[mmap.mmap, int, dict[str, Any]]:
        """The file mapped read-only, where its data starts, and its header (parsed once)."""
        if not self._closer.alive:
            raise ValueError(f"the checkpoint reader of {self.path} is closed")
        if self._layout is None:
            try:
                data = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ)
                self._open.append(data)
                (size,) = struct.unpack("<Q", data[:8])
                header = json.loads(data[8 : 8 + size])
            except (OSError, ValueError, struct.error):
                raise CorruptCheckpointError(
                    "the file changed or cannot be read", path=self.path, hint="Re-create or re-download it"
                ) from None
            self._layout = (data, 8 + size, header)
        return self._layout

    def copy_to(self, writer: CheckpointWriter, name: str) -> None:
        """Copy one tensor into ``writer`` byte for byte, verified, keeping its checksum."""
        writer.add_raw(name, *self.raw(name))

    def bases_prefix(self, module: str, task: str | None = None) -> str | None:
        """Where the bases of ``module`` (for ``task``, when the module has groups) are stored; None if k = 0."""
        info = self.modules[module]
        if "groups" in info:
            if task is None:
                raise ValueError(f"module {module} has groups: name the task")
            j = info["tasks"][task]["group"]
            return f"modules/{module}/g{j}/" if info["groups"][j]["k_B"] else None
        return f"modules/{module}/" if info["k_B"] else None

    def bases(self, module: str, task: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        prefix = self.bases_prefix(module, task)
        if prefix is None:
            return None, None
        return self.tensor(f"{prefix}basis_B"), self.tensor(f"{prefix}basis_A")

    def grams(self, module: str, task: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        prefix = self.bases_prefix(module, task)
        if prefix is None:
            return None, None
        return self.tensor(f"{prefix}gram_B"), self.tensor(f"{prefix}gram_A")

    def task_tensors(self, task: str, module: str) -> dict[str, torch.Tensor]:
        """The stored coefficients and private factors of one task in one module."""
        out = {}
        for part in TASK_PARTS:
            name = f"tasks/{task}/{module}/{part}"
            if name in self._keys:
                out[part] = self.tensor(name)
        return out

    def reconstruction(
        self, task: str, module: str, bases: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔŴ of one task in one module as column-form factors (B̂: n × p+q, Â: d × p+q), float64.

        B̂ = [β E_B, P_B], Â = [α E_A, P_Aᵀ]: the shared part plus the private correction.
        """
        info = self.modules[module]
        n, d = info["out_features"], info["in_features"]
        beta, alpha = bases if bases is not None else self.bases(module, task)
        parts = self.task_tensors(task, module)
        Bs = [torch.zeros(n, 0, dtype=torch.float64)]
        As = [torch.zeros(d, 0, dtype=torch.float64)]
        if "coef_B" in parts and beta is not None:
            Bs.append(beta.double() @ parts["coef_B"].double())
            As.append(alpha.double() @ parts["coef_A"].double())
        if "private_B" in parts:
            Bs.append(parts["private_B"].double())
            As.append(parts["private_A"].double().T)
        return torch.cat(Bs, 1), torch.cat(As, 1)

    def heads(self, task: str) -> dict[str, torch.Tensor]:
        return {k: self.tensor(f"tasks/{task}/heads/{k}") for k in self.task(task).get("heads", [])}

    def verify_all(self) -> None:
        """Read every tensor, verifying its checksum."""
        for name in sorted(self.manifest.get("tensors", {})):
            self.tensor(name)
        extra = self._keys - set(self.manifest.get("tensors", {}))
        if extra:
            raise CorruptCheckpointError(
                f"tensor {sorted(extra)[0]} is not in the manifest", path=self.path, hint="Re-create it"
            )
