"""A checkpoint named where one is expected: a file, a folder holding one, a shard index, or an
``hf://`` address, opened as a :class:`~share_convert.checkpoint.reader.Checkpoint`; an adapter
given there instead is named as such. Light (no torch), so that ``info`` and ``tasks`` start fast.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.reader import Checkpoint
from ..checkpoint.sharding import existing_checkpoint
from ..errors import CorruptCheckpointError
from . import hub
from .peft import CONFIG_NAME, WEIGHT_NAMES


def open_checkpoint(path: str | Path, *, progress: bool = False) -> Checkpoint:
    """Open a checkpoint from a path or an ``hf://owner/name`` address (downloaded through the cache).

    A folder holding ``share.safetensors`` or its shards' index ``share.safetensors.index.json``
    (as ``pull`` writes them), or exactly one shard index, stands for that checkpoint; a path whose
    file does not exist stands for its shard index when that does (``-o share.safetensors`` written
    in shards). An adapter folder or weights file is named as such, with the commands that take adapters.
    """
    if hub.is_hub_address(str(path)):
        return Checkpoint(hub.checkpoint_path(str(path), progress=progress))
    p = Path(path)
    if p.is_dir():
        found = existing_checkpoint(p / hub.CHECKPOINT_NAME)
        if found is not None and found.is_file():
            return Checkpoint(found)
        if len(list(p.glob("*.safetensors.index.json"))) == 1:
            return Checkpoint(p)
        raise not_a_checkpoint(p)
    if p.is_file() and p.suffix == ".bin":
        raise not_a_checkpoint(p)
    return Checkpoint(p)


def not_a_checkpoint(path: Path) -> CorruptCheckpointError:
    """The error for an adapter (or a folder) given where a checkpoint is expected."""
    hint = (
        "Consolidate adapters with 'share-convert merge ADAPTERS -o share.safetensors', or see what they "
        "share first with 'share-convert plan ADAPTERS'"
    )
    if path.is_dir() and ((path / CONFIG_NAME).is_file() or any((path / n).is_file() for n in WEIGHT_NAMES)):
        return CorruptCheckpointError("is a PEFT adapter folder, not a Share checkpoint", path=path, hint=hint)
    if path.is_dir():
        return CorruptCheckpointError(
            "is a folder, not a Share checkpoint (a .safetensors file written by 'share-convert merge')",
            path=path,
            hint="Pass the checkpoint file itself; for a folder of adapters: " + hint[0].lower() + hint[1:],
        )
    return CorruptCheckpointError("is adapter weights, not a Share checkpoint", path=path, hint=hint)
