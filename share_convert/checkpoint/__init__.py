"""The Share checkpoint format: typed entries, records, the writer, the reader, sharding, verification.

A lazy facade (:mod:`share_convert.facade`): what users, tests and benchmarks import from here.
"""

from __future__ import annotations

from ..facade import lazy_names

#: name -> the module of this package that defines it
_WHERE = {
    "Checkpoint": "reader",
    "CheckpointFiles": "store",
    "CheckpointWriter": "writer",
    "GroupEntry": "entries",
    "MANIFEST_KEY": "format",
    "ModuleEntry": "entries",
    "MANIFEST_SHA_KEY": "format",
    "RecordTable": "records",
    "TaskRows": "records",
    "is_checkpoint": "index",
    "parse_size": "sharding",
    "sha256": "format",
    "tensor_bytes": "format",
    "verify_checkpoint": "verification",
}

__getattr__, __all__ = lazy_names(__name__, _WHERE)
