"""Reading a Share checkpoint (format in :mod:`.format`): :class:`Checkpoint`, opened lazily.

The reader is assembled from one collaborator per concern, and its methods delegate to them:

- :class:`~.store.CheckpointFiles`: the file or the index and its shards, held open and mapped;
- :func:`open_manifest` (here): the manifest checked (checksum, format, version, fields);
- :class:`~.tensors.TensorStore`: verified reads of tensors, rows and stored bytes;
- :class:`~.tables.TaskRecords`: the per-(task, module) records, the modules' entries
  (:mod:`.compat` presents every version as version 1 did);
- :mod:`.coefficients`: bases, each task's coefficients (rotated through a chain) and ΔŴ.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import NAME_OF, itemsize
from ..errors import CorruptCheckpointError, UnsupportedFormatError
from . import coefficients as _coefficients
from .entries import ModuleEntry
from .format import FORMAT_NAME, FORMAT_VERSION, MANIFEST_KEY, MANIFEST_SHA_KEY, sha256
from .manifest import check_manifest, parse_manifest
from .quantized import SCALES, role_of
from .records import Chain, TaskRows
from .store import CheckpointFiles
from .tables import TaskRecords, completed_history_entry
from .tensors import TensorStore

if TYPE_CHECKING:  # torch is imported where tensors are touched: reading a manifest does not need it
    import numpy as np
    import torch

    from .writer import CheckpointWriter


def open_manifest(meta: dict[str, Any], path: Path) -> tuple[dict[str, Any], int]:
    """The manifest in a checkpoint's metadata and its format version, checked before anything
    uses them: its checksum, its format, a version this reader knows, its fields (:func:`check_manifest`)."""
    text = meta[MANIFEST_KEY]
    if not isinstance(text, str):
        raise CorruptCheckpointError("manifest is not a string", path=path, hint="Re-create it")
    if sha256(text.encode()) != meta.get(MANIFEST_SHA_KEY):
        raise CorruptCheckpointError(
            "manifest checksum mismatch: the file is corrupt", path=path, hint="Re-create or re-download it"
        )
    manifest: dict[str, Any] = parse_manifest(text, path)  # bounded in size and depth
    if manifest.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError("manifest is not a share-convert manifest", path=path, hint="Re-create it")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptCheckpointError(
            f"the manifest's format version is {str(version)[:20]!r}, not a version number",
            path=path,
            hint="Re-create or re-download it",
        )
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"format version {version!r}; this share-convert reads versions up to {FORMAT_VERSION}",
            path=path,
            hint="Upgrade share-convert",
        )
    check_manifest(manifest, path)  # types, ranges and names, before anything uses them
    return manifest, version


class Checkpoint:
    """A Share checkpoint opened lazily: the manifest is parsed, tensors are read on demand.

    Every tensor read is checked against the SHA-256 recorded in the manifest (or, for a few rows
    of a large tensor, against the SHA-256 of the blocks holding them), so a flipped byte is
    reported as :class:`CorruptCheckpointError` instead of silently changing a result. Versions 1
    to 4 are presented through the same accessors; factors stored as codes (version 4) are read
    dequantized, as float32.
    """

    def __init__(self, path: str | Path):
        """Open ``path``: a checkpoint file, a shard index, the name given to ``-o`` when the
        checkpoint was written in shards (its index beside it is opened), or a folder holding
        exactly one shard index."""
        # a reader is shared by the worker threads of an update: caches and lazy state change under this lock
        self._lock = threading.RLock()
        files = CheckpointFiles(path, self._lock)
        self.path = files.path
        self.manifest, self.version = open_manifest(files.meta, self.path)
        files.hold()  # held open from here, so that reads see these files even if the paths are replaced later
        self.store = TensorStore(files, self.manifest, self.version, self._lock)
        self.records = TaskRecords(self.store, self.manifest, self.version, self._lock, self.path)
        self._history: list[dict[str, Any]] | None = None
        self._chains: dict[str, Chain | None] = {}
        self._entries: dict[str, ModuleEntry] = {}

    # -- files ------------------------------------------------------------------------------------------
    @property
    def shard_paths(self) -> list[Path]:
        """The files read: one, or the shards of an index (``path`` is then the index)."""
        return self.store.files.shard_paths

    @property
    def sharded(self) -> bool:
        """Whether this checkpoint is stored in shards with an index (``path``)."""
        return self.store.files.sharded

    @property
    def files(self) -> list[Path]:
        """Every file of the checkpoint: the single file, or the index followed by its shards."""
        return self.store.files.files

    def file_of(self, name: str) -> Path:
        """The file that holds tensor ``name``."""
        return self.store.files.file_of(name)

    def stray_shards(self) -> list[Path]:
        """Files beside a sharded checkpoint named as its shards but not in its index; none for a single file."""
        return self.store.files.stray_shards()

    def close(self) -> None:
        """Release the files (also done when the reader is garbage-collected)."""
        self.store.files.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- manifest views ---------------------------------------------------------------------------------
    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        return self.manifest["tasks"]

    @property
    def modules(self) -> Mapping[str, dict[str, Any]]:
        """Module name -> its entry, with ``tasks``: task name -> its record in that module."""
        return self.records.modules

    def module(self, name: str) -> ModuleEntry:
        """Module ``name``'s entry, typed (:class:`~.entries.ModuleEntry`), read once; KeyError if there is none."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                entry = ModuleEntry.of(name, self.modules[name])
                self._entries[name] = entry
            return entry

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {})

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per operation. In version 2 the stored entries name the tasks each operation
        added (with their errors then); the last entry is completed from the record tables
        (:func:`~.tables.completed_history_entry`)."""
        history = self.manifest.get("history", [])
        if self.version < 2 or not history:
            return history
        if self._history is None:
            last = completed_history_entry(history[-1], self.record_tables(), list(self.tasks))
            self._history = [*history[:-1], last]
        return self._history

    def task(self, name: str) -> dict[str, Any]:
        """The manifest's entry of task ``name``; :class:`UnknownTaskError` if there is none."""
        return self.records.task(name)

    # -- records ---------------------------------------------------------------------------------------
    def record_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """The per-(task, module) tables (tasks × modules × columns; see RECORD_INT, RECORD_FLOAT)."""
        return self.records.record_tables()

    def task_record_rows(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """One task's rows of the record tables (modules × columns), reading only that task's rows."""
        return self.records.task_record_rows(task)

    def task_modules(self, task: str) -> dict[str, dict[str, Any]]:
        """Module name -> the task's record there, for the modules that have the task."""
        return self.records.task_modules(task)

    # -- tensors --------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return self.store.has(name)

    def tensor_meta(self, name: str) -> tuple[list[int], str]:
        """Shape and safetensors dtype of a tensor as :meth:`tensor` returns it, from the header
        (nothing is read): a factor stored as codes is float32 (:meth:`stored_meta`: as stored)."""
        return self.store.tensor_meta(name)

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor and verify its checksum (module tensors are kept for the next call)."""
        return self.store.tensor(name)

    def stacked(self, names: list[str]) -> torch.Tensor:
        """Tensors of one shape and dtype, read (verified) into one ``len(names) × shape`` tensor."""
        return self.store.stacked(names)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a (stacked) tensor, reading and verifying only the blocks that hold them."""
        return self.store.rows(name, start, stop)

    def raw(self, name: str) -> tuple[str, list[int], bytes, str]:
        """One tensor as stored: safetensors dtype, shape, bytes and SHA-256 (verified)."""
        return self.store.raw(name)

    def verify_once(self, name: str) -> None:
        """Verify a tensor's every byte unless this reader already has (it is then copied as it is)."""
        self.store.verify_once(name)

    def stored_layout(self, name: str) -> tuple[str, list[int], int, int, dict[str, Any] | None]:
        """Where a tensor lies in the file that holds it (:meth:`file_of`): dtype, shape, byte
        offset in that file, length, and its block checksums (None without)."""
        return self.store.stored_layout(name)

    def stored_bytes(self, name: str, begin: int, end: int) -> bytes:
        """Bytes ``begin:end`` of a tensor's data, unverified (callers verify what they keep)."""
        return self.store.stored_bytes(name, begin, end)

    def file_descriptor(self, name: str) -> int:
        """The open file that holds tensor ``name`` (its path may since have been replaced)."""
        return self.store.files.file_descriptor(name)

    def file_bytes(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` of the file that holds tensor ``name``."""
        return self.store.files.file_bytes(name, offset, size)

    def copy_to(self, writer: CheckpointWriter, name: str) -> None:
        """Copy one tensor into ``writer`` byte for byte, verified, keeping its checksum (a factor
        stored as codes: its codes and its scales)."""
        code = self.code_precision(name)
        if code is not None:
            self.store.code_rows(name)  # its headers checked before they are copied
        writer.add_raw(name, *self.raw(name))
        if code is not None:
            writer.add_raw(name + SCALES, *self.raw(name + SCALES), precision=code)

    # -- storage precisions (format version 4) --------------------------------------------------------
    def code_precision(self, name: str) -> str | None:
        """The code precision (int8, nf4) of a factor stored as codes; None for any other tensor."""
        return self.store.code_precision(name)

    def stored_meta(self, name: str) -> tuple[list[int], str]:
        """Shape and safetensors dtype of a tensor as stored (for a factor kept as codes: the codes'),
        from the header; :meth:`tensor_meta` gives those of the values every accessor returns."""
        return self.store.stored_meta(name)

    def stored_size(self, name: str) -> tuple[str, int, int]:
        """One tensor's storage: its precision (int8 or nf4 for codes, otherwise its dtype's name:
        float32, bfloat16, …, int64), the numbers it holds, and the bytes they take (scales
        included). For reports: bits per number, storage split by precision."""
        shape, dtype = self.tensor_meta(name)
        numbers = math.prod(shape)
        code = self.code_precision(name)
        if code is None:
            return NAME_OF.get(dtype, dtype.lower()), numbers, numbers * itemsize(dtype)
        stored = [self.stored_meta(n) for n in (name, name + SCALES)]
        return code, numbers, sum(math.prod(s) * itemsize(d) for s, d in stored)

    def storage_by_precision(self) -> dict[str, dict[str, int]]:
        """The stored factors (bases, coefficients, private rows) by precision: the numbers and bytes
        (scales included) of each; Gram matrices, chains, records and heads left out."""
        out: dict[str, dict[str, int]] = {}
        for name in self.manifest.get("tensors", {}):
            if role_of(name) is None:
                continue
            precision, numbers, size = self.stored_size(name)
            entry = out.setdefault(precision, {"numbers": 0, "bytes": 0})
            entry["numbers"] += numbers
            entry["bytes"] += size
        return dict(sorted(out.items()))

    def verify_all(self) -> None:
        """Read every tensor, verifying its checksum and those of its blocks (and the record tables)."""
        self.store.verify_all()
        if self.version >= 2:
            self.record_tables()

    # -- tasks as tensors (:mod:`.coefficients`) ------------------------------------------------------
    def chain(self, prefix: str) -> Chain | None:
        """The basis-rotation chain of the bases under ``prefix`` (format version 3), or None."""
        with self._lock:
            if prefix in self._chains:
                return self._chains[prefix]
        chain = _coefficients.read_chain(self, prefix)
        with self._lock:
            self._chains[prefix] = chain
        return chain

    def bases_prefix(self, module: str, task: str | None = None) -> str | None:
        """Where the bases of ``module`` (for ``task``, when the module has groups) are stored; None if k = 0."""
        return _coefficients.bases_prefix(self, module, task)

    def bases(self, module: str, task: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The bases (β, α) of ``module`` (for ``task``, when the module has groups); (None, None) if k = 0."""
        prefix = self.bases_prefix(module, task)
        if prefix is None:
            return None, None
        return self.tensor(f"{prefix}basis_B"), self.tensor(f"{prefix}basis_A")

    def grams(self, module: str, task: str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The Gram matrices kept beside those bases, for continual updates; (None, None) if k = 0."""
        prefix = self.bases_prefix(module, task)
        if prefix is None:
            return None, None
        return self.tensor(f"{prefix}gram_B"), self.tensor(f"{prefix}gram_A")

    def task_tensors(self, task: str, module: str) -> dict[str, torch.Tensor]:
        """One task's coefficients in the current bases and private factors in one module
        (:func:`~.coefficients.task_tensors`)."""
        return _coefficients.task_tensors(self, task, module)

    def task_rows(self, module: str, tasks: Sequence[str]) -> TaskRows:
        """The stored coefficients and private factors of ``tasks`` in ``module``, stacked as
        format version 2 stores them (:func:`~.coefficients.task_rows`)."""
        return _coefficients.task_rows(self, module, tasks)

    def coefficients(self, module: str, tasks: Sequence[str], side: str, prefix: str | None = None) -> torch.Tensor:
        """The coefficients ``coef_<side>`` of ``tasks`` in ``module`` in the current bases, as a
        zero-padded ``len(tasks) × k × p_max`` float64 batch (:func:`~.coefficients.coefficients`)."""
        return _coefficients.coefficients(self, module, tasks, side, prefix)

    def reconstruction(
        self, task: str, module: str, bases: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔŴ of one task in one module as column-form factors (B̂: n × p+q, Â: d × p+q), float64."""
        return _coefficients.reconstruction(self, task, module, bases)

    def heads(self, task: str) -> dict[str, torch.Tensor]:
        """A task's non-LoRA tensors (``tasks/<task>/heads/<key>``), byte for byte."""
        return {k: self.tensor(f"tasks/{task}/heads/{k}") for k in self.task(task).get("heads", [])}
