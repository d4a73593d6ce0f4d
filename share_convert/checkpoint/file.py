"""The Share checkpoint: one self-describing ``.safetensors`` file, or above a size its shards with
an index in the Hugging Face convention (format in docs/format.md).

Format version 2 (written) stores per module, for all of its tasks at once:

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

Version 1 (one tensor per task, module and side; figures in JSON) stays readable: the reader
presents every version through the same accessors.

:class:`CheckpointWriter` streams tensors to disk as they are produced and publishes the file (or
the shards, then their index) atomically; :class:`Checkpoint` reads lazily, verifying each tensor
(or block of rows) it reads, from the file or shard that holds it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import mmap
import os
import shutil
import struct
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import safe_open

from ..errors import (
    CorruptCheckpointError,
    OutputExistsError,
    UnknownTaskError,
    UnsupportedFormatError,
    first_line,
)
from ..files.atomic import crash_point, file_mode, interrupts_deferred, record_published, temp_file_beside
from .manifest import MAX_MANIFEST_BYTES, check_index_files, check_manifest, parse_json, parse_manifest
from .records import (
    FLOAT,
    INT,
    RECORD_FLOAT,
    RECORD_INT,
    Chain,
    RecordTable,
    TaskRows,
    gather_rows,
    record_dict,
    record_tables,
)
from .sharding import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX_SUFFIX,
    checkpoint_target,
    index_path,
    parse_size,
    shard_files,
    shard_name,
)

if TYPE_CHECKING:  # torch is imported where tensors are touched: reading a manifest does not need it
    import torch

FORMAT_NAME = "share-convert"
#: The highest format version this reader knows. Files are written as version 2 unless a module
#: stores a basis-rotation chain (version 3; see :class:`~share_convert.checkpoint.records.Chain`).
FORMAT_VERSION = 3
#: The tensors of a chain, beside the bases they lead to: ``<prefix>rotations_B`` and so on.
CHAIN_PARTS = ("rotations_B", "rotations_A", "chain_rows")
MANIFEST_KEY = "share_convert"
MANIFEST_SHA_KEY = "share_convert_sha256"
#: safetensors dtype names and their numpy equivalents (BF16 has none: read through torch)
_NP_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_KNOWN_DTYPES = (*_NP_DTYPES, "BF16")
#: The tensors one task may have in one module (format version 1: ``tasks/<task>/<module>/<part>``).
TASK_PARTS = ("coef_B", "coef_A", "private_B", "private_A")
#: Tensors larger than this carry a SHA-256 per block of rows too, so that reading one task's rows
#: reads and verifies about this many bytes rather than the whole tensor.
BLOCK_BYTES = 1 << 16
MIN_BLOCKS = 16


def st_dtype_name(name: str) -> str:
    """The safetensors name of a dtype named as in the manifest ('float32', 'bfloat16', 'float16')."""
    return {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}[name]


def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F64": torch.float64,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    return {v: k for k, v in _torch_dtypes().items()}[dtype]


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def block_digest(blocks: Sequence[str]) -> str:
    """The checksum of a tensor stored with block checksums: the SHA-256 of its blocks' hex digests, joined."""
    return sha256("".join(blocks).encode())


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


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "BF16" else np.dtype(_NP_DTYPES[dtype]).itemsize


def existing_checkpoint(path: str | Path) -> Path | None:
    """The file that holds the checkpoint at ``path``: ``path`` when it exists, else its shard
    index when that exists (the sharded form of the same output); None when neither does."""
    path = Path(path)
    if path.exists():
        return path
    target = checkpoint_target(path)
    for found in (target, index_path(target)):
        if found.is_file():
            return found
    return None


def same_checkpoint(output: str | Path, ckpt: Checkpoint) -> bool:
    """Whether writing ``output`` replaces the checkpoint ``ckpt`` was opened from (single file or sharded)."""
    found = existing_checkpoint(checkpoint_target(output))
    return found is not None and found.resolve() == ckpt.path.resolve()


def check_output(path: Path, force: bool) -> None:
    """Refuse to overwrite an existing output (single file or sharded) unless ``force``; check its folder is writable."""
    found = existing_checkpoint(checkpoint_target(path))
    if found is not None and not force:
        raise OutputExistsError("already exists", path=found, hint="Pass --force to overwrite it")
    check_parent_writable(path)


def check_parent_writable(path: Path) -> None:
    """The folder that will hold ``path`` exists and is writable (checked before any work)."""
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputExistsError("the output folder does not exist", path=parent, hint="Create it first")
    if not os.access(parent, os.W_OK):
        raise OutputExistsError("the output folder is not writable", path=parent, hint="Choose another output")


class CheckpointWriter:
    """Writes a version-2 safetensors checkpoint tensor by tensor, without holding the tensors in memory.

    Tensor data goes to a temporary file beside the target as it arrives; :meth:`finish` writes
    the header, appends the data and renames the result over the target in one step, so a crash
    at any moment leaves the previous file (if any) intact and no partial file at the target.
    Above ``max_shard_size`` bytes of tensors it writes shards and an index instead, the index
    renamed last (:func:`publish_files`); memory holds headers only, as for one file.

    A module's per-task tensors go in through :meth:`add_module`, which stacks them into a few
    tensors per module; :meth:`finish` turns the manifest's per-(task, module) records into the
    two ``records/*`` tables.
    """

    def __init__(self, path: str | Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE):
        self.path = checkpoint_target(path)
        #: tensors taking more bytes than this in all are written in shards (see :meth:`finish`)
        self.max_shard_size = parse_size(max_shard_size)
        fd, self._data_path = temp_file_beside(self.path, ".data.tmp")
        self._data = os.fdopen(fd, "wb")
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0
        self.hashes: dict[str, str] = {}
        self.blocks: dict[str, dict[str, Any]] = {}
        #: module -> task -> (position, coef_row, private_row)
        self._rows: dict[str, dict[str, tuple[int, int, int]]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_raw(name, st_dtype(tensor.dtype), list(tensor.shape), tensor_bytes(tensor))

    def add_raw(self, name: str, dtype: str, shape: list[int], raw: bytes, digest: str | None = None) -> None:
        """Add a tensor as stored bytes; ``digest``, its checksum when already known (copies
        between checkpoints of this format), saves hashing it again."""
        if name in self._entries:
            raise ValueError(f"duplicate tensor name {name}")
        self._data.write(raw)
        crash_point("checkpoint.tensor-added")
        self._entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [self._offset, self._offset + len(raw)]}
        self._offset += len(raw)
        rows = block_rows(shape, _itemsize(dtype))
        if rows is None:
            self.hashes[name] = digest or sha256(raw)
            return
        # a large tensor: a SHA-256 per block of rows, and as its checksum the SHA-256 of those
        # (each byte is hashed once; a reader of a few rows verifies only their blocks)
        step = len(raw) // shape[0] * rows
        view = memoryview(raw)
        blocks = [sha256(view[i : i + step]) for i in range(0, len(raw), step)]
        self.blocks[name] = {"rows": rows, "sha256": blocks}
        self.hashes[name] = block_digest(blocks)

    def add_module(self, module: str, rows: TaskRows) -> None:
        """Store one module's per-task tensors, stacked (format version 2): every set of bases'
        coefficient rows as ``<prefix>coefs_B``/``coefs_A`` (with its chain, if any: version 3),
        the private rows as ``modules/<module>/private_B``/``private_A``.

        Rows that ``rows.base`` says lead a tensor of ``rows.source`` are copied from it as they
        are (see :meth:`append_rows`); only the rows after them are written and hashed."""
        import torch

        for prefix in sorted(set(rows.coefs) | (set(rows.base) - {"private"})):
            for side, part in zip("BA", rows.coefs.get(prefix, (None, None))):
                self._stacked(f"{prefix}coefs_{side}", part, rows, prefix)
            chain = rows.chains.get(prefix)
            if chain is not None:
                self.add(f"{prefix}rotations_B", chain.rotations_B.to(torch.float64).contiguous())
                self.add(f"{prefix}rotations_A", chain.rotations_A.to(torch.float64).contiguous())
                self.add(f"{prefix}chain_rows", torch.from_numpy(np.asarray(chain.ends, dtype=np.int64).copy()))
        if rows.private is not None or "private" in rows.base:
            for side, part in zip("BA", rows.private or (None, None)):
                self._stacked(f"modules/{module}/private_{side}", part, rows, "private")
        self.set_module_rows(module, rows.tasks, rows.coef_row, rows.private_row)

    def _stacked(self, name: str, part: torch.Tensor | None, rows: TaskRows, key: str) -> None:
        if key in rows.base:
            self.append_rows(name, rows.source, rows.base[key], part)
        else:
            self.add(name, part.contiguous())

    def append_rows(self, name: str, source: Checkpoint, count: int, extra: torch.Tensor | None) -> None:
        """Write ``source``'s tensor ``name`` (``count`` rows, all of it) followed by the rows ``extra``.

        The source's whole blocks are copied in the kernel where the platform can, with their
        SHA-256 digests (the block size stays the source's); only its last, partial block and the
        new rows are hashed. The source tensor is verified first unless this reader already has.
        """
        dtype, shape, offset, length, blocks = source.stored_layout(name)
        if shape[0] != count or (
            extra is not None and (st_dtype(extra.dtype) != dtype or list(extra.shape[1:]) != shape[1:])
        ):
            raise ValueError(f"rows appended to {name} do not match it")
        tail = tensor_bytes(extra) if extra is not None else b""
        new_shape = [count + (extra.shape[0] if extra is not None else 0), *shape[1:]]
        if blocks is None:  # small (one checksum): written whole, as a new tensor
            self.add_raw(name, dtype, new_shape, source.raw(name)[2] + tail)
            return
        source.verify_once(name)
        if name in self._entries:
            raise ValueError(f"duplicate tensor name {name}")
        per, row = int(blocks["rows"]), length // shape[0]
        whole = count // per  # blocks copied as they are
        kept = whole * per * row
        rest = source.stored_bytes(name, kept, length) + tail
        self._copy_range(source, name, offset, kept)
        self._data.write(rest)
        step = per * row
        view = memoryview(rest)
        digests = list(blocks["sha256"][:whole]) + [sha256(view[i : i + step]) for i in range(0, len(rest), step)]
        self._entries[name] = {
            "dtype": dtype,
            "shape": new_shape,
            "data_offsets": [self._offset, self._offset + kept + len(rest)],
        }
        self._offset += kept + len(rest)
        self.blocks[name] = {"rows": per, "sha256": digests}
        self.hashes[name] = block_digest(digests)

    def _copy_range(self, source: Checkpoint, name: str, offset: int, size: int) -> None:
        """Append ``size`` bytes from ``offset`` of the file of ``source`` that holds tensor ``name``
        to the data (in the kernel where possible)."""
        self._data.flush()
        done = 0
        copy = getattr(os, "copy_file_range", None)
        if copy is not None:
            try:
                fd = source.file_descriptor(name)
                while done < size:
                    n = copy(fd, self._data.fileno(), size - done, offset + done, self._offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError:  # not supported here (another file system): copy through a buffer
                pass
        self._data.seek(self._offset + done)
        if done < size:
            self._data.truncate()
            self._data.write(source.file_bytes(name, offset + done, size - done))

    def set_module_rows(self, module: str, tasks: list[str], coef_row: np.ndarray, private_row: np.ndarray) -> None:
        """Where each task's rows start in a module's stacked tensors (those written by
        :meth:`add_module`, or copied as they are from another checkpoint)."""
        self._rows[module] = (list(tasks), np.asarray(coef_row), np.asarray(private_row))

    def _records(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """The manifest as stored: per-(task, module) figures moved into the ``records/*`` tables."""
        import torch

        modules = manifest["modules"]
        ints, floats = record_tables(list(manifest["tasks"]), modules, self._rows)
        stored: dict[str, Any] = {}
        for name, info in modules.items():
            entry = {k: v for k, v in info.items() if k != "tasks"}
            entry["task_count"] = len(info["tasks"])
            if "groups" in entry:
                entry["groups"] = [{k: v for k, v in g.items() if k != "tasks"} for g in entry["groups"]]
            stored[name] = entry
        self.add("records/int", torch.from_numpy(ints))
        self.add("records/float", torch.from_numpy(floats))
        return dict(manifest, modules=stored, record_columns={"int": list(RECORD_INT), "float": list(RECORD_FLOAT)})

    def finish(self, manifest: dict[str, Any]) -> None:
        """Publish the checkpoint atomically with ``manifest`` (plus tensor hashes) in its metadata.

        ``manifest["modules"][m]["tasks"]`` holds each task's record in that module, as the
        reader presents it; it is stored in the ``records/*`` tables, not in the JSON.

        When the tensors take more than ``max_shard_size`` bytes in all, they are written in
        shards with an index (the Hugging Face convention, docs/format.md, "Sharding"): tensors in
        the order they were added, a new shard started where the next tensor would take the
        current one above the size (a tensor is never split). Otherwise one file, as always.
        """
        manifest = self._records(manifest)
        chained = any(k.endswith("/chain_rows") for k in self._entries)
        manifest = dict(
            manifest,
            # a reader that does not know chains would read rotated rows as current: it must refuse
            format_version=3 if chained else min(int(manifest.get("format_version", 2)), 2),
            tensors={k: self.hashes[k] for k in sorted(self.hashes)},
            blocks={k: self.blocks[k] for k in sorted(self.blocks)},
        )
        text = json.dumps(manifest, separators=(",", ":"), allow_nan=False)
        digest = sha256(text.encode())
        # not synced: each published file is synced as a whole before it replaces its target
        self._data.flush()
        self._data.close()
        crash_point("checkpoint.data-written")
        shards = self._shards()
        written: list[tuple[Path, Path]] = []  # (temporary, final), the commit point last
        try:
            if len(shards) == 1:
                meta = {"format": "pt", MANIFEST_KEY: text, MANIFEST_SHA_KEY: digest}
                written.append((self._write_file(meta, shards[0]), self.path))
            else:
                weight_map = {}
                for i, names in enumerate(shards, 1):
                    name = shard_name(self.path, i, len(shards))
                    # each shard names the manifest it belongs to: a reader refuses a shard of another write
                    meta = {"format": "pt", MANIFEST_SHA_KEY: digest}
                    written.append((self._write_file(meta, names), self.path.with_name(name)))
                    weight_map.update(dict.fromkeys(names, name))
                total = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in self._entries.values())
                metadata = {"total_size": total, MANIFEST_KEY: text, MANIFEST_SHA_KEY: digest}
                written.append(
                    (_synced_text_beside(self.path, index_text(metadata, weight_map)), index_path(self.path))
                )
            crash_point("checkpoint.file-synced")
            publish_files(written, self.path)
        except BaseException:
            for tmp, _ in written:
                tmp.unlink(missing_ok=True)
            raise
        finally:
            self._data_path.unlink(missing_ok=True)

    def _shards(self) -> list[list[str]]:
        """The tensors of each shard, in the order they were written (one list: a single file)."""
        groups: list[list[str]] = [[]]
        size = 0
        for name, entry in self._entries.items():
            begin, end = entry["data_offsets"]
            if groups[-1] and size + (end - begin) > self.max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += end - begin
        return groups

    def _write_file(self, metadata: dict[str, str], names: list[str]) -> Path:
        """One safetensors file (synced, under a temporary name beside the target) holding ``names``,
        which lie one after another in the data file; returns its temporary path."""
        base = self._entries[names[0]]["data_offsets"][0] if names else 0
        end = self._entries[names[-1]]["data_offsets"][1] if names else 0
        header: dict[str, Any] = {"__metadata__": metadata}
        for name in names:
            entry = self._entries[name]
            b, e = entry["data_offsets"]
            header[name] = dict(entry, data_offsets=[b - base, e - base])
        blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        fd, tmp = temp_file_beside(self.path)
        try:
            with os.fdopen(fd, "wb") as out, open(self._data_path, "rb") as data:
                out.write(struct.pack("<Q", len(blob)))
                out.write(blob)
                out.flush()
                crash_point("checkpoint.header-written")
                _append_file(data, out, base, end - base)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, file_mode(replacing=existing_checkpoint(self.path)))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Path(tmp)

    def abort(self) -> None:
        if not self._data.closed:
            self._data.close()
        self._data_path.unlink(missing_ok=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def index_text(metadata: dict[str, Any], weight_map: dict[str, str]) -> str:
    """A shard index as written: ``{"metadata": ..., "weight_map": tensor -> shard file}``, keys sorted."""
    return json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"


def publish_files(written: Sequence[tuple[Path, Path]], target: Path) -> None:
    """Rename finished temporaries onto their final names, the last one (the single file, or the
    shard index) being the commit point, then remove what the previous checkpoint at ``target``
    left that is not part of the new one: its index, its single file, its other shards.

    A reader given ``target`` opens the single file when it exists, else the index; so until the
    commit it opens the previous checkpoint, whole, and so it does in the moment between the
    commit of an index and the removal of a previous single file. New shards named as the previous
    ones (the same shard count) would replace them before the index does: the previous index is
    first pointed at links to its shards (:func:`_keep_previous_shards`). The next write of
    ``target`` removes what a crash left.

    Ctrl-C is deferred until the end (:func:`~share_convert.files.atomic.interrupts_deferred`): an
    interruption lands before the first rename or after the last removal, and the commit point
    (the single file or the index) is recorded as published.
    """
    target = checkpoint_target(target)
    with interrupts_deferred():
        _publish_files(written, target)
        record_published(written[-1][1])


def _publish_files(written: Sequence[tuple[Path, Path]], target: Path) -> None:
    parent = target.parent if str(target.parent) else Path(".")
    _keep_previous_shards(target, {final.name for _, final in written[:-1]})
    for tmp, final in written[:-1]:
        os.replace(tmp, final)
        crash_point("checkpoint.shard-published")
    os.replace(*written[-1])
    crash_point("checkpoint.published")
    _fsync_dir(parent)
    kept = {final.name for _, final in written}
    for stale in [
        index_path(target),
        target,
        *shard_files(target),
        *parent.glob(f".{glob.escape(target.name)}.previous.*"),
    ]:
        if stale.name not in kept:
            stale.unlink(missing_ok=True)


def _keep_previous_shards(target: Path, new_shards: set[str]) -> None:
    """When new shards are about to replace shards of the previous checkpoint at ``target`` by name,
    keep the previous checkpoint whole until the commit: link each of its shards to
    ``.<target name>.previous.<shard>`` (hard links, else copies) and replace its index by one
    naming the links (same metadata, same manifest), in one rename."""
    index = index_path(target)
    if not new_shards or not index.is_file():
        return
    try:
        metadata, files, weight_map = read_index(index)
    except CorruptCheckpointError:  # not readable: nothing a reader could open to keep
        return
    if not set(files) & new_shards:
        return
    links = {}
    for name in files:
        source, link = index.parent / name, index.parent / f".{target.name}.previous.{name}"
        if not source.is_file():  # the previous checkpoint is not whole: nothing to keep
            return
        link.unlink(missing_ok=True)
        try:
            os.link(source, link)
        except OSError:  # a file system without hard links
            shutil.copyfile(source, link)
        links[name] = link.name
    tmp = _synced_text_beside(target, index_text(metadata, {t: links[f] for t, f in weight_map.items()}))
    try:
        os.replace(tmp, index)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    crash_point("checkpoint.previous-kept")


def _synced_text_beside(target: Path, text: str) -> Path:
    """``text`` in a new temporary file beside ``target``, synced, with the mode the umask gives (a
    shard index about to be published); the temporary is removed if writing fails."""
    fd, tmp = temp_file_beside(target)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, file_mode(replacing=existing_checkpoint(target)))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def checkpoint_files(path: str | Path) -> list[Path]:
    """The files of the checkpoint at ``path`` (its single file, or its index then its shards), as they are named."""
    found = existing_checkpoint(checkpoint_target(path))
    if found is None:
        raise CorruptCheckpointError("no such file", path=path, hint="Check the path")
    if not found.name.endswith(INDEX_SUFFIX):
        return [found]
    return [found, *(found.parent / name for name in read_index(found)[1])]


def move_checkpoint(source: Path, target: Path) -> None:
    """Move a finished checkpoint written at ``source`` (same name, same file system) to ``target``,
    published as :class:`CheckpointWriter` publishes."""
    target = checkpoint_target(target)
    if source.name != target.name:
        raise ValueError("a checkpoint moves under its own name (its shards are named after it)")
    files = checkpoint_files(source)
    moved = [(f, target.with_name(f.name)) for f in files[1:]] + [(files[0], target.with_name(files[0].name))]
    publish_files(moved, target)


def read_index(path: Path) -> tuple[dict[str, Any], list[str], dict[str, str]]:
    """A shard index's metadata, its shard file names (in order) and its weight map, checked for shape."""
    try:
        with open(path, "rb") as f:  # bounded: an index is read whole
            text = f.read(MAX_MANIFEST_BYTES * 2 + 1)
    except OSError as e:
        raise CorruptCheckpointError(
            f"not a readable shard index ({first_line(e, 160)})",
            path=path,
            hint="Re-create or re-download the checkpoint",
        ) from None
    if len(text) > MAX_MANIFEST_BYTES * 2:
        raise CorruptCheckpointError(
            f"not a readable shard index (over {MAX_MANIFEST_BYTES * 2} bytes)",
            path=path,
            hint="Re-create or re-download the checkpoint",
        )
    try:
        index = parse_json(text, path, "shard index")
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(
            f"not a readable shard index ({e.message})", path=path, hint="Re-create or re-download the checkpoint"
        ) from None
    meta = index.get("metadata") if isinstance(index, dict) else None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (
        not isinstance(meta, dict)
        or not isinstance(weight_map, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
    ):
        raise CorruptCheckpointError(
            "is not a shard index (no metadata and weight_map objects)", path=path, hint="Re-create it"
        )
    files = sorted(set(weight_map.values()))
    check_index_files(files, path)
    return meta, files, weight_map


def _append_file(source: Any, target: Any, start: int = 0, size: int | None = None) -> None:
    """Append ``size`` bytes of ``source`` from ``start`` (default: all of it) to ``target`` (open
    binary files): in the kernel where the platform can (``os.copy_file_range``), else through a buffer."""
    if size is None:
        size = os.fstat(source.fileno()).st_size - start
    copy = getattr(os, "copy_file_range", None)
    if copy is not None:
        try:
            done, offset = 0, target.tell()
            while done < size:
                n = copy(source.fileno(), target.fileno(), size - done, start + done, offset + done)
                if n == 0:
                    break
                done += n
            if done == size:
                target.seek(offset + size)
                return
            target.seek(offset)
            target.truncate()
        except OSError:  # not supported here (another file system): copy through a buffer
            target.seek(offset)
            target.truncate()
    source.seek(start)
    left = size
    while left > 0 and (chunk := source.read(min(left, 1 << 24))):
        target.write(chunk)
        left -= len(chunk)


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
    """True when ``path`` is a safetensors file carrying a Share manifest, or the shard index of one."""
    if str(path).endswith(INDEX_SUFFIX):
        try:
            return MANIFEST_KEY in read_index(Path(path))[0]
        except CorruptCheckpointError:
            return False
    try:
        with safe_open(str(path), framework="numpy") as f:
            return MANIFEST_KEY in (f.metadata() or {})
    except Exception:
        return False


class _LazyModules(Mapping):
    """A version-2 manifest's modules, each presented as in version 1 (with its ``tasks`` records)."""

    def __init__(self, ckpt: Checkpoint, stored: dict[str, dict[str, Any]]):
        self._ckpt, self._stored = ckpt, stored
        self._columns = {name: j for j, name in enumerate(stored)}
        self._views: dict[str, dict[str, Any]] = {}

    def __getitem__(self, name: str) -> dict[str, Any]:
        with self._ckpt._lock:
            view = self._views.get(name)
            if view is None:
                view = _ModuleView(self._stored[name], self._ckpt, self._columns[name])
                self._views[name] = view
            return view

    def __iter__(self) -> Iterator[str]:
        return iter(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    def __contains__(self, name: object) -> bool:
        return name in self._stored


class _ModuleView(dict):
    """One module's manifest entry; ``tasks`` (a :class:`RecordTable`) and the groups' task lists
    are read from the record tables on first use."""

    def __init__(self, stored: dict[str, Any], ckpt: Checkpoint, column: int):
        super().__init__(stored)
        self._ckpt, self._column = ckpt, column
        self._complete = False

    def _complete_entry(self) -> None:
        if self._complete:
            return
        with self._ckpt._lock:
            if not self._complete:
                tasks = self._ckpt._module_records(self._column)
                dict.__setitem__(self, "tasks", tasks)
                if dict.__contains__(self, "groups"):
                    groups = [dict(g, tasks=[]) for g in dict.__getitem__(self, "groups")]
                    for t, g in zip(tasks.tasks, tasks.int_column("group").tolist()):
                        groups[g]["tasks"].append(t)
                    dict.__setitem__(self, "groups", groups)
                self._complete = True

    def __getitem__(self, key: str) -> Any:
        if key in ("tasks", "groups"):
            self._complete_entry()
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def __contains__(self, key: object) -> bool:
        return key == "tasks" or dict.__contains__(self, key)

    def __iter__(self) -> Iterator[str]:
        self._complete_entry()
        return dict.__iter__(self)

    def keys(self):  # type: ignore[override]
        self._complete_entry()
        return dict.keys(self)

    def items(self):  # type: ignore[override]
        self._complete_entry()
        return dict.items(self)

    def values(self):  # type: ignore[override]
        self._complete_entry()
        return dict.values(self)

    def copy(self) -> dict[str, Any]:
        self._complete_entry()
        return dict(dict.items(self))


class Checkpoint:
    """A Share checkpoint opened lazily: the manifest is parsed, tensors are read on demand.

    Every tensor read is checked against the SHA-256 recorded in the manifest (or, for a few rows
    of a large tensor, against the SHA-256 of the blocks holding them), so a flipped byte is
    reported as :class:`CorruptCheckpointError` instead of silently changing a result. Versions 1
    and 2 are presented through the same accessors.
    """

    def __init__(self, path: str | Path):
        """Open ``path``: a checkpoint file, a shard index, the name given to ``-o`` when the
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
        #: the files read: one, or the shards of an index (``path`` is then the index)
        self.shard_paths: list[Path] = [self.path]
        self._shard_of: dict[str, int] | None = None
        if self.path.name.endswith(INDEX_SUFFIX):
            meta, keys = self._open_index()
        else:
            try:
                with safe_open(str(self.path), framework="numpy") as f:
                    meta = f.metadata() or {}
                    keys = set(f.keys())
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
        if not isinstance(text, str):
            raise CorruptCheckpointError("manifest is not a string", path=self.path, hint="Re-create it")
        if sha256(text.encode()) != meta.get(MANIFEST_SHA_KEY):
            raise CorruptCheckpointError(
                "manifest checksum mismatch: the file is corrupt", path=self.path, hint="Re-create or re-download it"
            )
        self.manifest: dict[str, Any] = parse_manifest(text, self.path)  # bounded in size and depth
        if self.manifest.get("format") != FORMAT_NAME:
            raise CorruptCheckpointError(
                "manifest is not a share-convert manifest", path=self.path, hint="Re-create it"
            )
        version = self.manifest.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CorruptCheckpointError(
                f"the manifest's format version is {str(version)[:20]!r}, not a version number",
                path=self.path,
                hint="Re-create or re-download it",
            )
        if version > FORMAT_VERSION:
            raise UnsupportedFormatError(
                f"format version {version!r}; this share-convert reads versions up to {FORMAT_VERSION}",
                path=self.path,
                hint="Upgrade share-convert",
            )
        check_manifest(self.manifest, self.path)  # types, ranges and names, before anything uses them
        self.version = version
        self._keys = keys
        self._cache: dict[str, Any] = {}
        self._tables: tuple[np.ndarray, np.ndarray] | None = None
        self._task_modules: dict[str, dict[str, dict[str, Any]]] = {}
        self._history: list[dict[str, Any]] | None = None
        self._chains: dict[str, Chain | None] = {}
        self._names: list[str] | None = None
        self._verified: set[str] = set()  # tensors whose every byte this reader has verified
        # a reader is shared by the worker threads of an update: caches and lazy state change under this lock
        self._lock = threading.RLock()
        # held open from here, so that raw reads see these files even if the paths are replaced later
        self._open: list[Any] = []  # closed by close(), or when the reader is collected
        self._closer = weakref.finalize(self, _close_all, self._open)
        self._handles = []
        for f in self.shard_paths:
            self._handles.append(open(f, "rb"))  # noqa: SIM115 (lives as long as the reader)
            self._open.append(self._handles[-1])
        self._layouts: list[tuple[mmap.mmap, int, dict[str, Any]] | None] = [None] * len(self.shard_paths)
        if version >= 2:
            try:
                self._check_v2_layout()
            except (KeyError, TypeError, ValueError, AttributeError):
                raise CorruptCheckpointError(
                    "manifest is malformed", path=self.path, hint="Re-create or re-download it"
                ) from None
            self._modules: Mapping[str, dict[str, Any]] = _LazyModules(self, self.manifest["modules"])
        else:
            self._modules = self.manifest["modules"]

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

    @property
    def sharded(self) -> bool:
        """Whether this checkpoint is stored in shards with an index (``path``)."""
        return self._shard_of is not None

    @property
    def files(self) -> list[Path]:
        """Every file of the checkpoint: the single file, or the index followed by its shards."""
        return [self.path, *self.shard_paths] if self.sharded else [self.path]

    def file_of(self, name: str) -> Path:
        """The file that holds tensor ``name``."""
        return self.shard_paths[self._shard(name)]

    def stray_shards(self) -> list[Path]:
        """Files beside a sharded checkpoint named as its shards but not in its index (left by an
        interrupted write or a copy); none for a single file."""
        if not self.sharded:
            return []
        mine = {p.name for p in self.shard_paths}
        return [p for p in shard_files(self.path) if p.name not in mine]

    def _shard(self, name: str) -> int:
        return self._shard_of.get(name, 0) if self._shard_of is not None else 0

    def _check_v2_layout(self) -> None:
        cols = self.manifest["record_columns"]
        if tuple(cols["int"]) != RECORD_INT or tuple(cols["float"]) != RECORD_FLOAT:
            raise ValueError("unknown record columns")
        for name in ("records/int", "records/float"):
            if name not in self._keys:
                raise CorruptCheckpointError(
                    f"tensor {name} is missing", path=self.path, hint="Re-create or re-download it"
                )
        if not isinstance(self.manifest["modules"], dict) or not isinstance(self.manifest["tasks"], dict):
            raise ValueError("modules and tasks must be objects")
        T, M = len(self.manifest["tasks"]), len(self.manifest["modules"])
        for name, dtype, columns in (("records/int", "I32", RECORD_INT), ("records/float", "F64", RECORD_FLOAT)):
            if self.tensor_meta(name) != ([T, M, len(columns)], dtype):  # from the header: nothing read yet
                raise CorruptCheckpointError(
                    f"tensor {name} does not match the manifest's {T} tasks and {M} modules",
                    path=self.path,
                    hint="Re-create or re-download it",
                )

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
    def modules(self) -> Mapping[str, dict[str, Any]]:
        """Module name -> its entry, with ``tasks``: task name -> its record in that module."""
        return self._modules

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config", {})

    @property
    def history(self) -> list[dict[str, Any]]:
        """One entry per operation. In version 2 the stored entries name the tasks each operation
        added (with their errors then); the last entry is completed here from the record tables:
        every task's current ``errors`` and, after an ``add``, the old tasks' ``errors_before`` and
        ``drift`` (so that the stored history grows with operations, not operations × tasks)."""
        history = self.manifest.get("history", [])
        if self.version < 2 or not history:
            return history
        if self._history is None:
            self._history = [*history[:-1], self._completed(history[-1])]
        return self._history

    def _completed(self, entry: dict[str, Any]) -> dict[str, Any]:
        ints, floats = self.record_tables()
        present = ints[:, :, INT["position"]] >= 0
        names = list(self.tasks)
        count = present.sum(1)
        error = np.where(present, floats[:, :, FLOAT["error"]], 0.0)
        mean, worst = error.sum(1) / np.maximum(count, 1), error.max(1, initial=0.0)
        entry = dict(entry, errors={t: {"mean": float(mean[i]), "max": float(worst[i])} for i, t in enumerate(names)})
        if entry.get("op") == "add":
            added = set(entry.get("tasks_added", []))
            touched = present & (floats[:, :, FLOAT["drift"]] >= 0)
            n = np.maximum(touched.sum(1), 1)
            drift = np.where(touched, floats[:, :, FLOAT["drift"]], 0.0)
            before = np.where(touched, floats[:, :, FLOAT["error_before"]], 0.0)
            before_max = before.max(1, initial=0.0)
            old = [i for i, t in enumerate(names) if t not in added and touched[i].any()]
            entry["drift"] = {
                names[i]: {"mean": float(drift[i].sum() / n[i]), "max": float(drift[i].max())} for i in old
            }
            entry["errors_before"] = {
                names[i]: {"mean": float(before[i].sum() / n[i]), "max": float(before_max[i])} for i in old
            }
        return entry

    def task(self, name: str) -> dict[str, Any]:
        if name not in self.tasks:
            names = sorted(self.tasks)
            shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
            raise UnknownTaskError(f"no task named {name!r}", path=self.path, hint=f"Available tasks: {shown}")
        return self.tasks[name]

    # -- version-2 records -------------------------------------------------------------------------------
    def record_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """The per-(task, module) tables (tasks × modules × columns; see RECORD_INT, RECORD_FLOAT).

        Version 1 files get the same tables, built from their JSON records."""
        with self._lock:
            return self._record_tables()

    def _record_tables(self) -> tuple[np.ndarray, np.ndarray]:
        if self._tables is None:
            if self.version >= 2:
                ints = self._array("records/int")
                floats = self._array("records/float")
                T, M = len(self.tasks), len(self.manifest["modules"])
                if ints.shape != (T, M, len(RECORD_INT)) or floats.shape != (T, M, len(RECORD_FLOAT)):
                    raise CorruptCheckpointError(
                        "the records tables do not match the manifest", path=self.path, hint="Re-create it"
                    )
                self._tables = (ints, floats)
            else:
                self._tables = record_tables(list(self.tasks), self.modules)
        return self._tables

    def task_record_rows(self, task: str) -> tuple[np.ndarray, np.ndarray]:
        """One task's rows of the record tables (modules × columns), reading only that task's rows."""
        self.task(task)
        i = list(self.tasks).index(task)
        if self.version < 2 or self._tables is not None:
            ints, floats = self.record_tables()
            return ints[i], floats[i]
        return self._rows_array("records/int", i, i + 1)[0], self._rows_array("records/float", i, i + 1)[0]

    def task_modules(self, task: str) -> dict[str, dict[str, Any]]:
        """Module name -> the task's record there, for the modules that have the task.

        In version 2 only the task's rows of the record tables are read (extraction of one task
        reads a small part of the file, whatever the number of tasks)."""
        with self._lock:
            return self._task_modules_locked(task)

    def _task_modules_locked(self, task: str) -> dict[str, dict[str, Any]]:
        cached = self._task_modules.get(task)
        if cached is not None:
            return cached
        if self.version < 2 or (isinstance(self._modules, _LazyModules) and self._modules._views):
            out = {m: info["tasks"][task] for m, info in self.modules.items() if task in info["tasks"]}
        else:
            ints, floats = self.task_record_rows(task)
            names = list(self.manifest["modules"])
            out = {
                names[j]: record_dict(ints[j].tolist(), floats[j].tolist())
                for j in np.nonzero(ints[:, INT["position"]] >= 0)[0].tolist()
            }
        if len(self._task_modules) >= 4:
            self._task_modules.pop(next(iter(self._task_modules)))
        self._task_modules[task] = out
        return out

    def _module_records(self, column: int) -> RecordTable:
        """One module's records, its tasks in their order there (vectorized: no object per task)."""
        ints, floats = self.record_tables()
        col_i, col_f = ints[:, column], floats[:, column]
        pos = col_i[:, INT["position"]]
        present = np.nonzero(pos >= 0)[0]
        order = present[np.argsort(pos[present], kind="stable")]
        names = self._task_names()
        if len(order) == len(names) and (order == np.arange(len(names))).all():  # every task, in order
            return RecordTable(names, col_i, col_f.copy())  # the tables are read-only; records are not
        return RecordTable([names[i] for i in order.tolist()], col_i[order], col_f[order])

    def _task_names(self) -> list[str]:
        """The tasks in their order (the record tables' rows), one list for every module's records."""
        if self._names is None:
            self._names = list(self.tasks)
        return self._names

    # -- tensors --------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self._keys

    def tensor_meta(self, name: str) -> tuple[list[int], str]:
        """Shape and safetensors dtype of a tensor, from the header (nothing is read)."""
        if name not in self._keys:
            raise CorruptCheckpointError(
                f"tensor {name} is missing", path=self.path, hint="Re-create or re-download it"
            )
        entry = self._mapped(self._shard(name))[2][name]
        return list(entry["shape"]), entry["dtype"]

    def tensor(self, name: str) -> torch.Tensor:
        """Read one tensor and verify its checksum (module tensors are kept for the next call)."""
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None:
            return cached
        t = self._read(name)
        if name.startswith("modules/"):
            with self._lock:
                if len(self._cache) >= 32:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[name] = t
        return t

    def _read(self, name: str) -> torch.Tensor:
        import torch

        dtype, shape, raw, _ = self.raw(name)
        torch_dtype = self._torch_dtype(name, dtype)
        if not raw:
            return torch.zeros(shape, dtype=torch_dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(shape)

    def _array(self, name: str) -> np.ndarray:
        """A (non-BF16) tensor as a numpy array, verified."""
        dtype, shape, raw, _ = self.raw(name)
        if dtype not in _NP_DTYPES:
            raise CorruptCheckpointError(
                f"tensor {name} has dtype {dtype}, which this table cannot hold", path=self.path, hint="Re-create it"
            )
        return np.frombuffer(raw, dtype=_NP_DTYPES[dtype]).reshape(shape)

    def _torch_dtype(self, name: str, dtype: str) -> torch.dtype:
        if dtype not in _KNOWN_DTYPES:
            raise CorruptCheckpointError(
                f"tensor {name} has dtype {dtype}, which no share-convert checkpoint holds",
                path=self.path,
                hint="Re-create or re-download it",
            )
        return _torch_dtypes()[dtype]

    def stacked(self, names: list[str]) -> torch.Tensor:
        """Tensors of one shape and dtype, read (verified) into one ``len(names) × shape`` tensor."""
        import torch

        parts = [self.raw(name) for name in names]
        dtype, shape = parts[0][0], parts[0][1]
        if any(p[0] != dtype or p[1] != shape for p in parts):
            raise ValueError("stacked tensors must share one shape and dtype")
        data = b"".join(p[2] for p in parts)
        torch_dtype = self._torch_dtype(names[0], dtype)
        if not data:
            return torch.zeros([len(names), *shape], dtype=torch_dtype)
        return torch.frombuffer(bytearray(data), dtype=torch_dtype).reshape([len(names), *shape])

    def _entry(self, name: str) -> tuple[dict[str, Any], str]:
        expected = self.manifest.get("tensors", {}).get(name)
        if name not in self._keys or expected is None:
            raise CorruptCheckpointError(
                f"tensor {name} is missing", path=self.path, hint="Re-create or re-download it"
            )
        return self._mapped(self._shard(name))[2][name], expected

    def _bytes(self, name: str, begin: int, end: int) -> bytes:
        data, start, _ = self._mapped(self._shard(name))
        raw = data[start + begin : start + end]
        if len(raw) != end - begin:
            raise CorruptCheckpointError(
                f"tensor {name} cannot be read (the file is truncated)",
                path=self.file_of(name),
                hint="Re-create or re-download it",
            )
        return raw

    def raw(self, name: str) -> tuple[str, list[int], bytes, str]:
        """One tensor as stored: safetensors dtype, shape, bytes and SHA-256 (verified).

        Reads the bytes straight from the file (the header was validated by safetensors on open).
        """
        entry, expected = self._entry(name)
        begin, end = entry["data_offsets"]
        raw = self._bytes(name, begin, end)
        blocks = self.manifest.get("blocks", {}).get(name) if self.version >= 2 else None
        if blocks is not None:  # verified block by block, and the blocks' digests against the checksum
            shape = list(entry["shape"])
            step = len(raw) // shape[0] * int(blocks["rows"]) if shape and shape[0] else 0
            view = memoryview(raw)
            digests = [sha256(view[i : i + step]) for i in range(0, len(raw), step)] if step else []
            actual = block_digest(digests) if digests == list(blocks["sha256"]) else None
        else:
            actual = sha256(raw)
        if actual != expected:
            raise CorruptCheckpointError(
                f"checksum mismatch in tensor {name}: the file is corrupt",
                path=self.file_of(name),
                hint="Re-create or re-download it",
            )
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
        """Where a tensor lies in the file that holds it (:meth:`file_of`): dtype, shape, byte
        offset in that file, length, and its block checksums (None without)."""
        entry, _ = self._entry(name)
        begin, end = entry["data_offsets"]
        blocks = self.manifest.get("blocks", {}).get(name) if self.version >= 2 else None
        return entry["dtype"], list(entry["shape"]), self._mapped(self._shard(name))[1] + begin, end - begin, blocks

    def stored_bytes(self, name: str, begin: int, end: int) -> bytes:
        """Bytes ``begin:end`` of a tensor's data, unverified (callers verify what they keep)."""
        entry, _ = self._entry(name)
        start = entry["data_offsets"][0]
        return self._bytes(name, start + begin, start + end)

    def file_descriptor(self, name: str) -> int:
        """The open file that holds tensor ``name`` (its path may since have been replaced)."""
        i = self._shard(name)
        self._mapped(i)
        return self._handles[i].fileno()

    def file_bytes(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` of the file that holds tensor ``name``."""
        data = self._mapped(self._shard(name))[0]
        return data[offset : offset + size]

    def _rows_raw(self, name: str, start: int, stop: int) -> tuple[str, list[int], bytes]:
        """Rows ``start:stop`` of a tensor's bytes, verified by the blocks that hold them."""
        blocks = self.manifest.get("blocks", {}).get(name)
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
        raw = self._bytes(name, begin + lo, begin + hi)
        step = per * row
        digests = blocks["sha256"]
        for b in range(first, last + 1):
            chunk = raw[(b - first) * step : (b - first + 1) * step]
            if b >= len(digests) or sha256(chunk) != digests[b]:
                raise CorruptCheckpointError(
                    f"checksum mismatch in tensor {name}: the file is corrupt",
                    path=self.file_of(name),
                    hint="Re-create or re-download it",
                )
        off = start * row - lo
        return dtype, [stop - start, *shape[1:]], raw[off : off + (stop - start) * row]

    def _rows_array(self, name: str, start: int, stop: int) -> np.ndarray:
        dtype, shape, raw = self._rows_raw(name, start, stop)
        return np.frombuffer(raw, dtype=_NP_DTYPES[dtype]).reshape(shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a (stacked) tensor, reading and verifying only the blocks that hold them."""
        import torch

        if name not in self.manifest.get("blocks", {}):  # small: read whole (verified once, then cached)
            return self.tensor(name)[start:stop]
        dtype, shape, raw = self._rows_raw(name, start, stop)
        torch_dtype = self._torch_dtype(name, dtype)
        if not raw:
            return torch.zeros(shape, dtype=torch_dtype)
        return torch.frombuffer(bytearray(raw), dtype=torch_dtype).reshape(shape)

    def _mapped(self, shard: int = 0) -> tuple[mmap.mmap, int, dict[str, Any]]:
        """A file (shard ``shard``; 0 for a single file) mapped read-only, where its data starts,
        and its header (parsed once)."""
        if not self._closer.alive:
            raise ValueError(f"the checkpoint reader of {self.path} is closed")
        layout = self._layouts[shard]
        if layout is not None:
            return layout
        with self._lock:
            return self._map(shard)

    def _map(self, shard: int) -> tuple[mmap.mmap, int, dict[str, Any]]:
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

    def copy_to(self, writer: CheckpointWriter, name: str) -> None:
        """Copy one tensor into ``writer`` byte for byte, verified, keeping its checksum."""
        writer.add_raw(name, *self.raw(name))

    def chain(self, prefix: str) -> Chain | None:
        """The basis-rotation chain of the bases under ``prefix`` (format version 3), or None."""
        import torch

        with self._lock:
            if prefix in self._chains:
                return self._chains[prefix]
        chain = None
        if self.version >= 3 and self.has(f"{prefix}chain_rows"):
            ends = self._array(f"{prefix}chain_rows").astype(np.int64)
            RB = self.tensor(f"{prefix}rotations_B").to(torch.float64)
            RA = self.tensor(f"{prefix}rotations_A").to(torch.float64)
            k_B = self.tensor_meta(f"{prefix}basis_B")[0][1]
            k_A = self.tensor_meta(f"{prefix}basis_A")[0][1]
            P = self.tensor_meta(f"{prefix}coefs_B")[0][0]
            V = len(ends)
            if (
                ends.ndim != 1
                or tuple(RB.shape) != (V, k_B, k_B)
                or tuple(RA.shape) != (V, k_A, k_A)
                or bool((np.diff(ends) <= 0).any())
                or (V and (ends[0] <= 0 or ends[-1] > P))
            ):
                raise CorruptCheckpointError(
                    f"the rotation chain of {prefix} does not match its bases and rows",
                    path=self.path,
                    hint="Re-create it",
                )
            chain = Chain(RB, RA, ends)
        with self._lock:
            self._chains[prefix] = chain
        return chain

    def bases_prefix(self, module: str, task: str | None = None) -> str | None:
        """Where the bases of ``module`` (for ``task``, when the module has groups) are stored; None if k = 0."""
        info = self.modules[module]
        if "groups" in info:
            if task is None:
                raise ValueError(f"module {module} has groups: name the task")
            return self._prefix(module, self.task_modules(task)[module])
        return f"modules/{module}/" if info["k_B"] else None

    def _prefix(self, module: str, rec: dict[str, Any]) -> str | None:
        info = self.modules[module]
        if "groups" in info:
            return f"modules/{module}/g{rec['group']}/" if info["groups"][rec["group"]]["k_B"] else None
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
        """The coefficients (``coef_B`` k_B × p, ``coef_A`` k_A × p) in the current bases and private
        factors (``private_B`` n × q, ``private_A`` q × d) of one task in one module; absent parts are
        left out. Coefficients written under older bases (a chain, format version 3) come rotated,
        as float32; the others as stored."""
        if self.version < 2:
            out = {}
            for part in TASK_PARTS:
                name = f"tasks/{task}/{module}/{part}"
                if name in self._keys:
                    out[part] = self.tensor(name)
            return out
        rec = self.task_modules(task)[module]
        out = {}
        p, q = rec["rank"], rec["private_rank"]
        prefix = self._prefix(module, rec)
        if p and prefix is not None:
            row = rec["coef_row"]
            chain = self.chain(prefix)
            for side in "BA":
                stored = self.rows(f"{prefix}coefs_{side}", row, row + p)
                if chain is not None and row < chain.ends[-1]:  # written under older bases: rotated to these
                    stored = chain.rotate(stored.double(), np.arange(row, row + p), side).float()
                out[f"coef_{side}"] = stored.T
        if q:
            row = rec["private_row"]
            out["private_B"] = self.rows(f"modules/{module}/private_B", row, row + q).T
            out["private_A"] = self.rows(f"modules/{module}/private_A", row, row + q)
        return out

    def task_rows(self, module: str, tasks: Sequence[str]) -> TaskRows:
        """The stored coefficients and private factors of ``tasks`` (all in ``module``), stacked as
        format version 2 stores them: one gather per tensor in version 2, one read per task in version 1.

        Rows of a set of bases with a chain keep their coordinates and come with the chain of the
        rows gathered (``TaskRows.chains``) when they stay in the order of their versions; otherwise
        they are rotated into the current bases (in the module's dtype)."""
        import torch

        info = self.modules[module]
        table: RecordTable = RecordTable.from_dicts(info["tasks"]).select(tasks)
        groups = table.int_column("group")
        prefixes = (
            [f"modules/{module}/g{g}/" for g in groups.tolist()]
            if "groups" in info
            else [f"modules/{module}/"] * len(tasks)
        )
        if self.version < 2:
            dtype = _torch_dtypes()[st_dtype_name(info["dtype"])]
            return TaskRows.of_parts([(t, p, self.task_tensors(t, module)) for t, p in zip(tasks, prefixes)], dtype)
        ranks, q = table.int_column("rank"), table.int_column("private_rank")
        coef_row = np.zeros(len(tasks), dtype=np.int64)
        coefs = {}
        chains: dict[str, Chain] = {}
        for prefix in sorted(set(prefixes)):
            mine = np.array([p == prefix for p in prefixes], dtype=bool)
            if not ranks[mine].any():
                continue
            index = gather_rows(table.int_column("coef_row")[mine], ranks[mine])
            pick = torch.from_numpy(index)
            coefs[prefix] = tuple(self.tensor(f"{prefix}coefs_{side}")[pick] for side in "BA")
            chain = self.chain(prefix)
            if chain is not None:  # rows keep the coordinates they were written in, when they can
                kept = chain.select(index)
                if kept is not None:
                    chains[prefix] = kept
                else:
                    cB, cA = coefs[prefix]
                    coefs[prefix] = (
                        chain.rotate(cB.double(), index, "B").to(cB.dtype),
                        chain.rotate(cA.double(), index, "A").to(cA.dtype),
                    )
            coef_row[mine] = np.cumsum(ranks[mine]) - ranks[mine]
        private = None
        if q.any():
            pick = torch.from_numpy(gather_rows(table.int_column("private_row"), q))
            private = tuple(self.tensor(f"modules/{module}/private_{side}")[pick] for side in "BA")
        return TaskRows(list(tasks), prefixes, coefs, coef_row, private, np.cumsum(q) - q, chains)  # type: ignore[arg-type]

    def coefficients(self, module: str, tasks: Sequence[str], side: str, prefix: str | None = None) -> torch.Tensor:
        """The coefficients ``coef_<side>`` of ``tasks`` in ``module`` in the current bases (rows of
        older bases rotated through the chain), zero-padded to the widest: a ``len(tasks) × k × p_max``
        float64 batch (one gather per module, or one read per rank in version 1)."""
        import torch

        table = RecordTable.from_dicts(self.modules[module]["tasks"]).select(tasks)
        prefix = prefix or f"modules/{module}/"
        k = self.tensor_meta(f"{prefix}basis_{side}")[0][1]
        ranks = table.int_column("rank")
        width = int(ranks.max()) if len(ranks) else 0
        if self.version < 2:
            X = torch.zeros(len(tasks), k, width, dtype=torch.float64)
            by_rank: dict[int, list[int]] = {}
            for j, p in enumerate(ranks.tolist()):
                if p:
                    by_rank.setdefault(p, []).append(j)
            for p, idx in by_rank.items():
                X[idx, :, :p] = self.stacked([f"tasks/{tasks[j]}/{module}/coef_{side}" for j in idx]).double()
            return X
        if not width:
            return torch.zeros(len(tasks), k, 0, dtype=torch.float64)
        stacked = self.tensor(f"{prefix}coefs_{side}").double()  # P × k
        index = gather_rows(table.int_column("coef_row"), ranks)
        chain = self.chain(prefix)
        if len(index) == stacked.shape[0] and (ranks == width).all() and (index == np.arange(len(index))).all():
            # every row, in order, all tasks of one rank (the common case): a view, no indexed copy
            rows = chain.rotate(stacked, index, side) if chain is not None else stacked
            return rows.view(len(tasks), width, k).transpose(1, 2)
        rows = stacked[torch.from_numpy(index)]
        if chain is not None:  # rows written under older bases, rotated into these
            rows = chain.rotate(rows, index, side)
        # every task's rows go to its slot of the padded batch, in one indexed copy
        X = torch.zeros(len(tasks), k, width, dtype=torch.float64)
        task_idx = torch.from_numpy(np.repeat(np.arange(len(tasks)), ranks))
        col_idx = torch.from_numpy(gather_rows(np.zeros(len(tasks), dtype=np.int64), ranks))
        X[task_idx, :, col_idx] = rows
        return X

    def reconstruction(
        self, task: str, module: str, bases: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ΔŴ of one task in one module as column-form factors (B̂: n × p+q, Â: d × p+q), float64.

        B̂ = [β E_B, P_B], Â = [α E_A, P_Aᵀ]: the shared part plus the private correction.
        """
        import torch

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
        """Read every tensor, verifying its checksum and those of its blocks."""
        for name in sorted(self.manifest.get("tensors", {})):
            self.raw(name)  # every byte, and for large tensors every block
        extra = self._keys - set(self.manifest.get("tensors", {}))
        if extra:
            raise CorruptCheckpointError(
                f"tensor {sorted(extra)[0]} is not in the manifest", path=self.path, hint="Re-create it"
            )
        if self.version >= 2:
            self.record_tables()
