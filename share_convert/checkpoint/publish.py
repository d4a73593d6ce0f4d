"""Publishing a checkpoint's files: the single file, or the shards then their index, each renamed in one step.

A reader given a checkpoint's name opens the single file when it exists, else the shard index;
publishing keeps that reader on the previous checkpoint, whole, until the commit point (the
single file or the index) is renamed, then removes what the previous checkpoint left
(docs/format.md, "Sharding"). Also here: where a checkpoint's files are, and the checks of an
output before any work.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import CorruptCheckpointError, OutputExistsError
from ..files.atomic import crash_point, file_mode, interrupts_deferred, record_published, temp_file_beside
from .index import index_text, read_index
from .sharding import INDEX_SUFFIX, checkpoint_target, existing_checkpoint, index_path, shard_files


class _Opened(Protocol):
    """A checkpoint opened for reading (:class:`~share_convert.checkpoint.reader.Checkpoint`): its path."""

    path: Path


def same_checkpoint(output: str | Path, ckpt: _Opened) -> bool:
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
    tmp = synced_text_beside(target, index_text(metadata, {t: links[f] for t, f in weight_map.items()}))
    try:
        os.replace(tmp, index)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    crash_point("checkpoint.previous-kept")


def synced_text_beside(target: Path, text: str) -> Path:
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


def append_file(source: Any, target: Any, start: int = 0, size: int | None = None) -> None:
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
