"""The shard index of a sharded checkpoint (docs/format.md, "Sharding"), and recognising a checkpoint.

A checkpoint stored in shards has beside them ``<name>.safetensors.index.json``: the Hugging
Face convention, ``{"metadata": …, "weight_map": tensor -> shard file}``, its metadata holding
the manifest. The index is untrusted input like the manifest: read bounded, checked for shape,
and every shard it names must be a file beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError, first_line
from .format import MANIFEST_KEY
from .manifest import MAX_MANIFEST_BYTES, check_index_files, parse_json
from .sharding import INDEX_SUFFIX


def index_text(metadata: dict[str, Any], weight_map: dict[str, str]) -> str:
    """A shard index as written: ``{"metadata": ..., "weight_map": tensor -> shard file}``, keys sorted."""
    return json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"


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


def is_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a safetensors file carrying a Share manifest, or the shard index of one."""
    if str(path).endswith(INDEX_SUFFIX):
        try:
            return MANIFEST_KEY in read_index(Path(path))[0]
        except CorruptCheckpointError:
            return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return MANIFEST_KEY in (f.metadata() or {})
    except Exception:
        return False
