"""The files of a checkpoint opened for reading: the single file, or a shard index and its shards.

:class:`CheckpointFiles` finds the file a path names, checks a shard index against its shards,
holds every file open (so that reads see these files even if the paths are replaced later) and
maps each read-only, its safetensors header parsed once. It reads bytes; what they mean and
whether they are intact is :class:`~share_convert.checkpoint.tensors.TensorStore`'s business.
"""

from __future__ import annotations

import json
import mmap
import struct
import threading
import weakref
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..errors import CorruptCheckpointError, first_line
from .format import MANIFEST_KEY, MANIFEST_SHA_KEY
from .index import read_index
from .sharding import INDEX_SUFFIX, existing_checkpoint, shard_files

#: One mapped file: the map, where its data starts, its header.
Mapped = tuple[mmap.mmap, int, dict[str, Any]]


def _close_all(resources: list[Any]) -> None:
    for r in reversed(resources):
        r.close()
    resources.clear()


class CheckpointFiles:
    """The files of one checkpoint: ``path`` (the single file, or the index) and ``shard_paths``.

    Opening reads the metadata (``meta``, holding the manifest) and the tensor names (``keys``)
    from the headers; :meth:`hold` then opens every file for the reader's lifetime.
    """

    def __init__(self, path: str | Path, lock: threading.RLock):
        """Find and open ``path``: a checkpoint file, a shard index, the name given to ``-o`` when the
        checkpoint was written in shards (its index beside it is opened), or a folder holding
        exactly one shard index."""
        self.path = Path(path)
        if self.path.is_dir():
            indexes = sorted(self.path.glob(f"*.safetensors{INDEX_SUFFIX}"))
            if len(indexes) != 1:
                raise CorruptCheckpointError(
                    "is a folder, not a Share checkpoint file"
                    + (f" ({len(indexes)} shard indexes in it)" if indexes else ""),
                    path=self.path,
                    hint="Give the checkpoint's .safetensors file (an adapter folder is an input of 'merge' or 'plan')",
                )
            self.path = indexes[0]
        elif not self.path.exists():
            self.path = existing_checkpoint(self.path) or self.path
        if not self.path.is_file():
            raise CorruptCheckpointError("no such file", path=self.path, hint="Check the path")
        self._lock = lock
        #: the files read: one, or the shards of an index (``path`` is then the index)
        self.shard_paths: list[Path] = [self.path]
        self._shard_of: dict[str, int] | None = None
        self.meta: dict[str, Any]
        self.keys: set[str]
        if self.path.name.endswith(INDEX_SUFFIX):
            self.meta, self.keys = self._open_index()
        else:
            try:
                with safe_open(str(self.path), framework="numpy") as f:
                    self.meta = f.metadata() or {}
                    self.keys = set(f.keys())
            except Exception as e:
                raise CorruptCheckpointError(
                    f"not a readable safetensors file ({first_line(e, 160)})",
                    path=self.path,
                    hint="Re-create or re-download the checkpoint",
                ) from None
            if MANIFEST_KEY not in self.meta:
                raise CorruptCheckpointError(
                    "is a safetensors file but not a Share checkpoint (no share_convert manifest)",
                    path=self.path,
                    hint="Create one with 'share-convert merge'",
                )
        self._open: list[Any] = []  # closed by close(), or when the reader is collected
        self._closer = weakref.finalize(self, _close_all, self._open)
        self._handles: list[Any] = []
        self._layouts: list[Mapped | None] = [None] * len(self.shard_paths)

    def _open_index(self) -> tuple[dict[str, Any], set[str]]:
        """Read a shard index and check its shards: each exists, is a safetensors file of this
        checkpoint (it names the index's manifest digest) and holds exactly the tensors mapped to it."""
        meta, files, weight_map = read_index(self.path)
        if MANIFEST_KEY not in meta:
            raise CorruptCheckpointError(
                "is a shard index but not of a Share checkpoint (no share_convert manifest)",
                path=self.path,
                hint="Create one with 'share-convert merge'",
            )
        self.shard_paths = [self.path.parent / name for name in files]
        where = {name: i for i, name in enumerate(files)}
        self._shard_of = {tensor: where[name] for tensor, name in weight_map.items()}
        held: list[set[str]] = [set() for _ in files]  # each shard's tensors, by the index
        for tensor, i in self._shard_of.items():
            held[i].add(tensor)
        hint = "Re-download or re-create the checkpoint: all its shards come from one write"
        for i, (name, shard) in enumerate(zip(files, self.shard_paths)):
            if not shard.is_file():
                raise CorruptCheckpointError(f"shard {name} named by the index is missing", path=self.path, hint=hint)
            try:
                with safe_open(str(shard), framework="numpy") as f:
                    shard_meta = f.metadata() or {}
                    shard_keys = set(f.keys())
            except Exception as e:
                raise CorruptCheckpointError(
                    f"shard {name} is not a readable safetensors file ({first_line(e, 160)})", path=shard, hint=hint
                ) from None
            if shard_meta.get(MANIFEST_SHA_KEY) != meta.get(MANIFEST_SHA_KEY):
                raise CorruptCheckpointError(
                    f"shard {name} belongs to another checkpoint than its index (a mixed or interrupted copy)",
                    path=self.path,
                    hint=hint,
                )
            if shard_keys != held[i]:
                raise CorruptCheckpointError(
                    f"shard {name} does not hold the tensors the index maps to it", path=self.path, hint=hint
                )
        return meta, set(weight_map)

    def hold(self) -> None:
        """Open every file, held from here for the reader's lifetime."""
        for f in self.shard_paths:
            self._handles.append(open(f, "rb"))  # noqa: SIM115 (lives as long as the reader)
            self._open.append(self._handles[-1])

    def close(self) -> None:
        """Release the files (also done when they are garbage-collected)."""
        self._closer()

    @property
    def sharded(self) -> bool:
        """Whether this checkpoint is stored in shards with an index (``path``)."""
        return self._shard_of is not None

    @property
    def files(self) -> list[Path]:
        """Every file of the checkpoint: the single file, or the index followed by its shards."""
        return [self.path, *self.shard_paths] if self.sharded else [self.path]

    def shard(self, name: str) -> int:
        """The shard (0 for a single file) that holds tensor ``name``."""
        return self._shard_of.get(name, 0) if self._shard_of is not None else 0

    def file_of(self, name: str) -> Path:
        """The file that holds tensor ``name``."""
        return self.shard_paths[self.shard(name)]

    def stray_shards(self) -> list[Path]:
        """Files beside a sharded checkpoint named as its shards but not in its index (left by an
        interrupted write or a copy); none for a single file."""
        if not self.sharded:
            return []
        mine = {p.name for p in self.shard_paths}
        return [p for p in shard_files(self.path) if p.name not in mine]

    def header(self, name: str) -> dict[str, Any]:
        """The header entry of tensor ``name`` (dtype, shape, data offsets) in the file that holds it."""
        return self.mapped(self.shard(name))[2][name]

    def read_bytes(self, name: str, begin: int, end: int) -> bytes:
        """Bytes ``begin:end`` of the data of the file that holds tensor ``name``, unverified."""
        data, start, _ = self.mapped(self.shard(name))
        raw = data[start + begin : start + end]
        if len(raw) != end - begin:
            raise CorruptCheckpointError(
                f"tensor {name} cannot be read (the file is truncated)",
                path=self.file_of(name),
                hint="Re-create or re-download it",
            )
        return raw

    def data_start(self, name: str) -> int:
        """Where the data starts in the file that holds tensor ``name``."""
        return self.mapped(self.shard(name))[1]

    def file_descriptor(self, name: str) -> int:
        """The open file that holds tensor ``name`` (its path may since have been replaced)."""
        i = self.shard(name)
        self.mapped(i)
        return self._handles[i].fileno()

    def file_bytes(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` of the file that holds tensor ``name``."""
        data = self.mapped(self.shard(name))[0]
        return data[offset : offset + size]

    def mapped(self, shard: int = 0) -> Mapped:
        """A file (shard ``shard``; 0 for a single file) mapped read-only, where its data starts,
        and its header (parsed once)."""
        if not self._closer.alive:
            raise ValueError(f"the checkpoint reader of {self.path} is closed")
        layout = self._layouts[shard]
        if layout is not None:
            return layout
        with self._lock:
            return self._map(shard)

    def _map(self, shard: int) -> Mapped:
        if self._layouts[shard] is None:
            try:
                data = mmap.mmap(self._handles[shard].fileno(), 0, access=mmap.ACCESS_READ)
                self._open.append(data)
                (size,) = struct.unpack("<Q", data[:8])
                header = json.loads(data[8 : 8 + size])
            except (OSError, ValueError, struct.error):
                raise CorruptCheckpointError(
                    "the file changed or cannot be read",
                    path=self.shard_paths[shard],
                    hint="Re-create or re-download it",
                ) from None
            self._layouts[shard] = (data, 8 + size, header)
        return self._layouts[shard]
