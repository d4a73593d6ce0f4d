"""Hand-made checkpoints: a real checkpoint with its manifest changed and its checksum recomputed,
as anyone can do (the checksum guards against corruption, not against an author)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from share_convert.checkpoint import MANIFEST_KEY, MANIFEST_SHA_KEY, sha256

#: Placeholders a test may leave in a manifest, replaced by raw JSON text after ``json.dumps``
#: (values ``json`` would not write itself: deep nesting, over-long integers, 1e999).
RAW: dict[str, str] = {
    "@deep@": "[" * 5000 + "]" * 5000,
    "@deep70@": "[" * 70 + "]" * 70,
    "@long_int@": "9" * 5000,
    "@inf@": "1e999",
    "@nan@": "NaN",
}


def read_st(path: Path) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's header (parsed) and the bytes after it."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def rewrite_manifest(
    src: Path, dst: Path, edit: Callable[[dict[str, Any], dict[str, Any]], None], *, raw: dict[str, str] = RAW
) -> None:
    """Write ``src`` to ``dst`` with ``edit(manifest, header)`` applied (both may change in place:
    the manifest, and the tensors' entries of the safetensors header), the manifest checksum
    recomputed as the writer computes it; ``raw``'s placeholders, quoted, become raw JSON text."""
    header, body = read_st(src)
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    edit(manifest, header)
    text = json.dumps(manifest, separators=(",", ":"))
    for key, value in raw.items():
        text = text.replace(json.dumps(key), value)
    header["__metadata__"][MANIFEST_KEY] = text
    header["__metadata__"][MANIFEST_SHA_KEY] = sha256(text.encode())
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def rename_task(manifest: dict[str, Any], header: dict[str, Any], old: str, new: str) -> None:
    """Rename task ``old`` everywhere it is named: the manifest's tasks, history and checksums, and
    its tensors in the header (a consistent file, as a hostile author would make it)."""
    manifest["tasks"] = {(new if k == old else k): v for k, v in manifest["tasks"].items()}
    for entry in manifest.get("history", []):
        entry["tasks_added"] = [new if t == old else t for t in entry.get("tasks_added", [])]
        entry["errors"] = {(new if k == old else k): v for k, v in entry.get("errors", {}).items()}
    before, after = f"tasks/{old}/", f"tasks/{new}/"

    def renamed(name: str) -> str:
        return after + name[len(before) :] if name.startswith(before) else name

    manifest["tensors"] = {renamed(k): v for k, v in manifest["tensors"].items()}
    for key in [k for k in header if k.startswith(before)]:
        header[renamed(key)] = header.pop(key)


def rewrite_record(src: Path, dst: Path, column: str, value: int) -> None:
    """Write ``src`` (a format-2 checkpoint) to ``dst`` with one integer of its ``records/int``
    table, ``column`` of the first task in the first module, set to ``value``; the table's checksum
    and the manifest's recomputed (a consistent file, as a hostile author would make it)."""
    import numpy as np

    from share_convert.checkpoint.records import INT

    header, body = read_st(src)
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    begin, end = header["records/int"]["data_offsets"]
    table = np.frombuffer(body[begin:end], dtype=np.int32).reshape(header["records/int"]["shape"]).copy()
    table[0, 0, INT[column]] = value
    data = table.tobytes()
    manifest["tensors"]["records/int"] = sha256(data)
    text = json.dumps(manifest, separators=(",", ":"))
    header["__metadata__"][MANIFEST_KEY] = text
    header["__metadata__"][MANIFEST_SHA_KEY] = sha256(text.encode())
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    dst.write_bytes(struct.pack("<Q", len(blob)) + blob + body[:begin] + data + body[end:])
