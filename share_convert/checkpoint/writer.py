"""Writing a Share checkpoint (format in :mod:`.format`), tensor by tensor, published atomically.

:class:`CheckpointWriter` streams tensors to a temporary data file as they are produced (memory
holds headers only), hashes each (by blocks of rows for the large ones), stacks each module's
per-task tensors, and at the end writes the file, or above a size its shards then their index, and
publishes them in one step (:func:`~share_convert.checkpoint.publish.publish_files`).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..dtypes import ST_OF, itemsize, st_name, torch_dtype
from ..files.atomic import crash_point, file_mode, temp_file_beside
from ..math.quantize import BLOCK, CODE_PRECISIONS, Quantized, check_precision, quantize
from .format import MANIFEST_KEY, MANIFEST_SHA_KEY, block_digest, block_digests, block_rows, sha256, tensor_bytes
from .index import index_text
from .publish import append_file, publish_files, synced_text_beside
from .quantized import CODE_DTYPE, CODES_VERSION, SCALES, module_precisions, role_of
from .records import RECORD_FLOAT, RECORD_INT, TaskRows, record_tables
from .sharding import DEFAULT_MAX_SHARD_SIZE, checkpoint_target, existing_checkpoint, index_path, parse_size, shard_name

if TYPE_CHECKING:
    import torch


class StoredSource(Protocol):
    """What the writer reads of a checkpoint it copies rows from as they are stored
    (:class:`~share_convert.checkpoint.reader.Checkpoint`)."""

    def stored_layout(self, name: str) -> tuple[str, list[int], int, int, dict[str, Any] | None]: ...

    def tensor_meta(self, name: str) -> tuple[list[int], str]: ...

    def code_precision(self, name: str) -> str | None: ...

    def raw(self, name: str) -> tuple[str, list[int], bytes, str]: ...

    def verify_once(self, name: str) -> None: ...

    def stored_bytes(self, name: str, begin: int, end: int) -> bytes: ...

    def file_descriptor(self, name: str) -> int: ...

    def file_bytes(self, name: str, offset: int, size: int) -> bytes: ...


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
        #: factors written as codes (format version 4): name -> code precision
        self.quantized: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor | Quantized, precision: str | None = None) -> None:
        """Add a tensor. ``precision`` None: as it is; a float precision (float32, float16,
        bfloat16): cast to it; a code precision (int8, nf4): a factor (``<prefix><role>``, role in
        :data:`~.quantized.ROLES`) quantized along its rows (:func:`~share_convert.math.quantize.quantize`),
        its codes stored under ``name`` and its scales under ``name + ".scales"``. A
        :class:`~share_convert.math.quantize.Quantized` (already quantized: the same codes) is stored as it is."""
        if isinstance(tensor, Quantized) or (precision is not None and check_precision(precision) in CODE_PRECISIONS):
            q = tensor if isinstance(tensor, Quantized) else quantize(tensor, precision)  # type: ignore[arg-type]
            if (precision is not None and q.precision != precision) or q.block != BLOCK or role_of(name) is None:
                raise ValueError(f"{name} cannot be stored as {q.precision} codes (blocks of {q.block}) at {precision}")
            self.add_raw(name, CODE_DTYPE[q.precision], list(q.codes.shape), tensor_bytes(q.codes))
            self.add_raw(name + SCALES, "F32", list(q.scales.shape), tensor_bytes(q.scales), precision=q.precision)
            return
        if precision is not None:
            tensor = tensor.to(torch_dtype(ST_OF[precision]))
        self.add_raw(name, st_name(tensor.dtype), list(tensor.shape), tensor_bytes(tensor))

    def add_raw(
        self,
        name: str,
        dtype: str,
        shape: list[int],
        raw: bytes,
        digest: str | None = None,
        precision: str | None = None,
    ) -> None:
        """Add a tensor as stored bytes; ``digest``, its checksum when already known (copies
        between checkpoints of this format), saves hashing it again. ``precision`` (int8, nf4) is
        given with the scales of a quantized factor (``<name>.scales``, after its codes ``<name>``)."""
        if precision is not None:
            self.quantized[name.removesuffix(SCALES)] = precision
        if name in self._entries:
            raise ValueError(f"duplicate tensor name {name}")
        self._data.write(raw)
        crash_point("checkpoint.tensor-added")
        self._entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [self._offset, self._offset + len(raw)]}
        self._offset += len(raw)
        rows = block_rows(shape, itemsize(dtype))
        if rows is None:
            self.hashes[name] = digest or sha256(raw)
            return
        # a large tensor: a SHA-256 per block of rows, and as its checksum the SHA-256 of those
        # (each byte is hashed once; a reader of a few rows verifies only their blocks)
        blocks = block_digests(raw, len(raw) // shape[0] * rows)
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
        """One stacked tensor of :meth:`add_module` at the precision ``rows.precision`` gives its role
        (rows already quantized as that precision, ``rows.codes``, are stored as they are)."""
        role = name.rsplit("/", 1)[-1]
        precision = rows.precision.get(role)
        value: torch.Tensor | Quantized | None = part
        known = rows.codes.get(name if key != "private" else role)
        if part is not None and known is not None and known.precision == precision and known.shape == tuple(part.shape):
            value = known
        if key in rows.base:
            self.append_rows(name, rows.source, rows.base[key], value, precision)
        else:
            self.add(name, value.contiguous() if not isinstance(value, Quantized) else value, precision)

    def append_rows(
        self,
        name: str,
        source: StoredSource,
        count: int,
        extra: torch.Tensor | Quantized | None,
        precision: str | None = None,
    ) -> None:
        """Write ``source``'s tensor ``name`` (``count`` rows, all of it) followed by the rows ``extra``
        (at ``precision``, as :meth:`add`; a factor stored as codes takes rows at its own code precision:
        its code rows and scale rows are copied, the new rows' codes and scales appended).

        The source's whole blocks are copied in the kernel where the platform can, with their
        SHA-256 digests (the block size stays the source's); only its last, partial block and the
        new rows are hashed. The source tensor is verified first unless this reader already has.
        """
        code = source.code_precision(name)
        if precision is None:
            precision = extra.precision if isinstance(extra, Quantized) else code
        if code is not None or precision in CODE_PRECISIONS:
            cols = source.tensor_meta(name)[0][1]
            if extra is not None and not isinstance(extra, Quantized):
                extra = quantize(extra, code or str(precision))
            if code != precision or (extra is not None and (extra.precision != code or extra.shape[1] != cols)):
                raise ValueError(f"rows appended to {name} ({code or 'float'}) do not match it ({precision})")
            self._append(name, source, count, extra.codes if extra is not None else None)
            self._append(name + SCALES, source, count, extra.scales if extra is not None else None)
            self.quantized[name] = code
            return
        if precision is not None and extra is not None:
            extra = extra.to(torch_dtype(ST_OF[precision]))
        self._append(name, source, count, extra)

    def _append(self, name: str, source: StoredSource, count: int, extra: torch.Tensor | None) -> None:
        """:meth:`append_rows` of one tensor as stored (``extra`` in its dtype)."""
        dtype, shape, offset, length, blocks = source.stored_layout(name)
        if shape[0] != count or (
            extra is not None and (st_name(extra.dtype) != dtype or list(extra.shape[1:]) != shape[1:])
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
        digests = list(blocks["sha256"][:whole]) + block_digests(rest, per * row)
        self._entries[name] = {
            "dtype": dtype,
            "shape": new_shape,
            "data_offsets": [self._offset, self._offset + kept + len(rest)],
        }
        self._offset += kept + len(rest)
        self.blocks[name] = {"rows": per, "sha256": digests}
        self.hashes[name] = block_digest(digests)

    def _copy_range(self, source: StoredSource, name: str, offset: int, size: int) -> None:
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
        """The manifest as stored: per-(task, module) figures moved into the ``records/*`` tables,
        each module's ``precision`` as written (where it says more than its ``dtype``)."""
        import torch

        modules = manifest["modules"]
        ints, floats = record_tables(list(manifest["tasks"]), modules, self._rows)
        precisions = module_precisions(modules, {k: e["dtype"] for k, e in self._entries.items()}, self.quantized)
        stored: dict[str, Any] = {}
        for name, info in modules.items():
            entry = {k: v for k, v in info.items() if k not in ("tasks", "precision")}
            if name in precisions:
                entry["precision"] = precisions[name]
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
            # a reader that does not know chains (codes) would read rotated rows as current (codes as
            # numbers): it must refuse
            format_version=CODES_VERSION
            if self.quantized
            else 3
            if chained
            else min(int(manifest.get("format_version", 2)), 2),
            tensors={k: self.hashes[k] for k in sorted(self.hashes)},
            blocks={k: self.blocks[k] for k in sorted(self.blocks)},
        )
        text = json.dumps(manifest, separators=(",", ":"), allow_nan=False)
        digest = sha256(text.encode())
        # not synced: each published file is synced as a whole before it replaces its target
        self._data.flush()
        self._data.close()
        crash_point("checkpoint.data-written")
        shards = shard_groups(self._entries, self.max_shard_size)
        written: list[tuple[Path, Path]] = []  # (temporary, final), the commit point last
        try:
            if len(shards) == 1:
                meta = {"format": "pt", MANIFEST_KEY: text, MANIFEST_SHA_KEY: digest}
                written.append((write_file(self.path, self._data_path, self._entries, meta, shards[0]), self.path))
            else:
                weight_map = {}
                for i, names in enumerate(shards, 1):
                    name = shard_name(self.path, i, len(shards))
                    # each shard names the manifest it belongs to: a reader refuses a shard of another write
                    meta = {"format": "pt", MANIFEST_SHA_KEY: digest}
                    written.append(
                        (write_file(self.path, self._data_path, self._entries, meta, names), self.path.with_name(name))
                    )
                    weight_map.update(dict.fromkeys(names, name))
                total = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in self._entries.values())
                metadata = {"total_size": total, MANIFEST_KEY: text, MANIFEST_SHA_KEY: digest}
                written.append((synced_text_beside(self.path, index_text(metadata, weight_map)), index_path(self.path)))
            crash_point("checkpoint.file-synced")
            publish_files(written, self.path)
        except BaseException:
            for tmp, _ in written:
                tmp.unlink(missing_ok=True)
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


def shard_groups(entries: dict[str, dict[str, Any]], max_shard_size: int) -> list[list[str]]:
    """The tensors of each shard, in the order they were written (one list: a single file)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, entry in entries.items():
        begin, end = entry["data_offsets"]
        if groups[-1] and size + (end - begin) > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += end - begin
    return groups


def write_file(
    target: Path, data_path: Path, entries: dict[str, dict[str, Any]], metadata: dict[str, str], names: list[str]
) -> Path:
    """One safetensors file (synced, under a temporary name beside ``target``) holding ``names``,
    which lie one after another in the data file ``data_path``; returns its temporary path."""
    base = entries[names[0]]["data_offsets"][0] if names else 0
    end = entries[names[-1]]["data_offsets"][1] if names else 0
    header: dict[str, Any] = {"__metadata__": metadata}
    for name in names:
        entry = entries[name]
        b, e = entry["data_offsets"]
        header[name] = dict(entry, data_offsets=[b - base, e - base])
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    fd, tmp = temp_file_beside(target)
    try:
        with os.fdopen(fd, "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            out.flush()
            crash_point("checkpoint.header-written")
            append_file(data, out, base, end - base)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, file_mode(replacing=existing_checkpoint(target)))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)
