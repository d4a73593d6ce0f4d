"""Checkpoints in shards, in the Hugging Face convention: names, the size limit (docs/format.md, "Sharding").

A checkpoint written to ``share.safetensors`` whose tensors take more than the size limit is
stored as ``share-00001-of-00003.safetensors`` ... beside an index
``share.safetensors.index.json``. These helpers only name files (no numpy, no torch), so that
the CLI can check ``--max-shard-size`` before importing the engine.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

from ..config import split_size
from ..errors import InvalidOptionError

#: The Hugging Face default: a checkpoint whose tensors take more bytes than this is written in shards.
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
INDEX_SUFFIX = ".index.json"


def parse_size(value: int | str) -> int:
    """A size in bytes from an int or text such as '5GB', '500MB', '1.5GiB' or '1000000'
    (units: :data:`share_convert.config.SIZE_UNITS`), read exactly, at any length."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        number, unit = split_size(str(value))
        if not re.fullmatch(r"\d+(?:\.\d*)?", number):
            raise InvalidOptionError(
                f"max shard size {str(value)!r} is not a size",
                hint="Write bytes (5000000000) or a number with KB, MB, GB, TB or KiB, MiB, GiB, TiB, e.g. 5GB",
            )
        # whole numbers exactly, at any length (through float, a long one overflows or rounds)
        size = int(number) * unit if "." not in number else int(Decimal(number) * unit)
    if size < 1:
        raise InvalidOptionError(f"max shard size {value!r} is not positive", hint="Give at least 1 byte, e.g. 5GB")
    return size


def checkpoint_target(path: str | Path) -> Path:
    """The checkpoint a path names: the path itself, or for a shard index the single-file name it stands for
    (``share.safetensors.index.json`` stands for ``share.safetensors``)."""
    path = Path(path)
    if path.name.endswith(INDEX_SUFFIX):
        return path.with_name(path.name[: -len(INDEX_SUFFIX)])
    return path


def check_checkpoint_name(path: str | Path) -> None:
    """Refuse an output name that is not a checkpoint's: ``NAME.safetensors``, or its shard index
    ``NAME.safetensors.index.json``. Readers recognise a checkpoint by that suffix (a folder or glob
    given to ``merge``, ``hf://`` downloads, the Hub's file list), so one written as ``x.txt`` would
    be a file no command takes for a checkpoint: refused before any work rather than written. Checked
    by :mod:`share_convert.api` (the commands); the engine's own writers take any name."""
    target = checkpoint_target(path)
    if target.name.endswith(".safetensors") and len(target.name) > len(".safetensors"):
        return
    name = target.name.split(".")[0] or "share"
    raise InvalidOptionError(
        "a Share checkpoint is written as a .safetensors file (or its shard index .safetensors.index.json)",
        path=path,
        hint=f"Name the output {name}.safetensors",
    )


def index_path(path: str | Path) -> Path:
    """The shard index of a checkpoint written to ``path``: ``<name>.index.json`` beside it."""
    path = checkpoint_target(path)
    return path.with_name(path.name + INDEX_SUFFIX)


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


def stem(target: Path) -> str:
    """What shard names start with: the checkpoint's file name without ``.safetensors``."""
    return target.name[: -len(".safetensors")] if target.name.endswith(".safetensors") else target.name


def shard_name(target: str | Path, i: int, count: int) -> str:
    """The file name of shard ``i`` (from 1) of ``count``, in the Hugging Face convention:
    ``<stem>-00001-of-00003.safetensors`` for a checkpoint named ``<stem>.safetensors``."""
    return f"{stem(checkpoint_target(target))}-{i:05d}-of-{count:05d}.safetensors"


def shard_files(target: str | Path) -> list[Path]:
    """The files beside ``target`` named as its shards (of any count), sorted."""
    target = checkpoint_target(target)
    pattern = re.compile(rf"^{re.escape(stem(target))}-\d{{5,}}-of-\d{{5,}}\.safetensors$")
    folder = target.parent if str(target.parent) else Path(".")
    try:
        return sorted(p for p in folder.iterdir() if pattern.match(p.name))
    except OSError:
        return []
