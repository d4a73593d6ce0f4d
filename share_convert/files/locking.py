"""Writers of one checkpoint take turns: an advisory lock beside the target.

Two ``add --in-place`` on one checkpoint at once would each read the old checkpoint and publish
their own new one: the second rename would silently drop the first one's task. So every command
that replaces a checkpoint (``add``, ``remove``, ``merge -o`` onto it) holds :func:`writing` on
its target from before it reads the old checkpoint until the new one is published, and ``push``
holds it shared while it reads (it never uploads a checkpoint that is being replaced).

The lock is ``flock`` on a hidden file beside the target, ``.NAME.lock`` (for a sharded checkpoint
the name of its single-file form, which its index and shards are named after). The holder writes
its process id in it, for the message of the one that waits. The file is created under the umask
and removed by the last holder, under the lock: whoever locks a file that is no longer the one at
that name (removed meanwhile) drops it and locks the new one. Where no lock file can be created
(a read-only or missing folder) the command goes on unlocked: nothing can be written there, and
the writer's own checks say so.

The library never prints: ``on_wait`` receives one sentence to show, once, before blocking.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..checkpoint.sharding import checkpoint_target
from ..errors import TargetBusyError

try:
    import fcntl
except ImportError:  # Windows: no flock; writers run unlocked as before
    fcntl = None  # type: ignore[assignment]

#: Receives one line to show when the lock is held by another process, before waiting for it.
OnWait = Callable[[str], None]


def lock_path(target: str | Path) -> Path:
    """The lock file of the checkpoint at ``target`` (a path, or its shard index): ``.NAME.lock`` beside it."""
    target = checkpoint_target(target)
    return target.with_name(f".{target.name}.lock")


def _holder(fd: int) -> str:
    """``' (pid N)'`` from what the holder wrote in the lock file, or nothing."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def _open(path: Path) -> int | None:
    """The lock file, opened (created under the umask when needed); None where it cannot be."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    except (FileNotFoundError, NotADirectoryError):  # no such folder: the writer's own checks say so
        return None
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    try:  # a lock file of another user, not writable by this one: locking needs only reading
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


@contextmanager
def writing(
    target: str | Path, *, wait: bool = True, on_wait: OnWait | None = None, shared: bool = False
) -> Iterator[None]:
    """Hold the lock of the checkpoint at ``target`` for the block: exclusive for a writer, ``shared``
    for a reader that must not see it replaced (``push``).

    When another process holds it, ``on_wait`` (if given) receives one line saying so, then this
    waits for it; with ``wait=False`` it raises :class:`~share_convert.errors.TargetBusyError` at
    once instead.
    """
    path = lock_path(target)
    if fcntl is None:
        yield
        return
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    told = False
    while True:
        fd = _open(path)
        if fd is None:
            yield
            return
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)  # written by writers only: without it, a reader (push) holds it
            doing = "writing" if pid else "using"
            if not wait:
                os.close(fd)
                raise TargetBusyError(
                    f"another share-convert is {doing} it{pid}",
                    path=checkpoint_target(target),
                    hint="Try again when it has finished, or leave out --no-wait to wait for it",
                ) from None
            if not told and on_wait is not None:
                on_wait(f"waiting for another share-convert {doing} {checkpoint_target(target)}{pid}…")
            told = True
            try:
                fcntl.flock(fd, mode)
            except BaseException:  # Ctrl-C while waiting
                os.close(fd)
                raise
        if _same_file(fd, path):
            break
        os.close(fd)  # the file was removed by the last holder meanwhile: lock the one there now
    try:
        if not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError:  # a read-only lock file: no pid for the message, the lock holds all the same
        pass
    try:
        yield
    finally:
        _release(fd, path)


def _release(fd: int, path: Path) -> None:
    """Remove the lock file, then unlock (a process waiting on the removed file then locks the next one).

    Only an exclusive holder may remove it: a shared holder first tries to become exclusive
    without waiting, and leaves the file where another process holds it too.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _same_file(fd, path):
            path.unlink(missing_ok=True)
    except OSError:
        pass
    finally:
        os.close(fd)
