"""Temporary files beside a target, published by one rename; leftovers of killed runs removed.

Every output (checkpoint, extracted adapter) is written under a hidden temporary name in the
target's folder and renamed over the target at the end, so the target is always whole. The
temporary names carry the writing process's id — ``.NAME.PID.RANDOM.tmp`` — so that the next
write of the same target can remove what a killed run left behind (its process no longer runs)
without touching another live run's files.

Files and folders written follow the umask (:func:`file_mode`, :func:`folder_mode`), as ``cp``
and ``torch.save`` do: temporaries are created private (0600, 0700) and given that mode before
they are published. A publication runs with Ctrl-C deferred (:func:`interrupts_deferred`) and is
recorded (:func:`published`), so that an interrupted command can say what is on disk.

:func:`crash_point` marks the steps of a write where the crash-safety tests kill, interrupt or
pause the process.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import itertools
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CRASH_AT = "SHARE_CONVERT_CRASH_AT"
INTERRUPT_AT = "SHARE_CONVERT_INTERRUPT_AT"
PAUSE_AT = "SHARE_CONVERT_PAUSE_AT"


def crash_point(label: str) -> None:
    """Kill, interrupt or pause this process here when a test asks for it at ``label``.

    A test-only hook: the crash-safety tests set ``SHARE_CONVERT_CRASH_AT=label`` in a child
    process to kill it (SIGKILL) at a named step of a write (after the data is written, between
    the renames, ...), so that the kill provably lands inside the write rather than wherever a
    timer happened to fire; ``SHARE_CONVERT_INTERRUPT_AT=label`` sends it SIGINT (Ctrl-C) there
    instead; ``SHARE_CONVERT_PAUSE_AT=label:GATE`` creates the file ``GATE.reached`` there and
    waits (up to a minute) until the file ``GATE`` exists, so that a test can run another process
    while this one is at that step. Unset, as they always are outside those tests, they cost three
    dictionary look-ups.
    """
    if os.environ.get(CRASH_AT) == label:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
    if os.environ.get(INTERRUPT_AT) == label:
        os.kill(os.getpid(), signal.SIGINT)
    pause = os.environ.get(PAUSE_AT, "")
    if pause.startswith(label + ":"):
        gate = Path(pause[len(label) + 1 :])
        gate.with_name(gate.name + ".reached").touch()
        deadline = time.monotonic() + 60
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)


_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux 4.7+:
    ``/proc/self/status``); elsewhere set and restored at once (another thread creating a file
    in that instant would get mode 0o666 & ~0o022)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode(replacing: Path | None = None) -> int:
    """The mode a new file gets under the umask (0o644 under 022, 0o600 under 077), as ``open`` gives it.

    A file that replaces ``replacing`` keeps that file's permission bits instead, as ``cp`` onto an
    existing file and an editor's save do: a checkpoint the user made private stays private when it
    is updated in place, whatever the umask of the process updating it.
    """
    if replacing is not None:
        try:
            found = os.stat(replacing)
        except OSError:
            pass
        else:
            if stat.S_ISREG(found.st_mode):
                return stat.S_IMODE(found.st_mode) & 0o777
    return 0o666 & ~umask()


def folder_mode() -> int:
    """The mode a new folder gets under the umask (0o755 under 022, 0o700 under 077), as ``mkdir`` gives it."""
    return 0o777 & ~umask()


def follow_umask(path: Path) -> None:
    """Give ``path`` (a temporary about to be published: a file, or a folder and everything in it)
    the modes new files and folders get under the umask; temporaries are created private."""
    files, folders = file_mode(), folder_mode()
    if path.is_dir() and not path.is_symlink():
        for root, dirs, names in os.walk(path):
            for name in names:
                os.chmod(os.path.join(root, name), files)
            for name in dirs:
                os.chmod(os.path.join(root, name), folders)
        os.chmod(path, folders)
    else:
        os.chmod(path, files)


#: The targets this process published most recently (renamed into place), with their running
#: numbers: a long-lived process that publishes many files keeps only the last few.
_published: deque[tuple[int, Path]] = deque(maxlen=64)
_publications = itertools.count()


def publication_count() -> int:
    """How many targets this process has published so far (a mark for :func:`published_since`)."""
    return _published[-1][0] + 1 if _published else 0


def published_since(mark: int) -> list[Path]:
    """The targets published since ``mark`` (a :func:`publication_count`), oldest first: after an
    interruption, what is on disk (see ``cli.shell.handle_errors``)."""
    return [path for number, path in _published if number >= mark]


def record_published(target: Path) -> None:
    """Note that ``target`` has just been published (see :func:`published_since`)."""
    _published.append((next(_publications), Path(target)))


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Run a publication (its renames and the removal of what it replaces) to its end through
    Ctrl-C: a SIGINT that arrives meanwhile raises KeyboardInterrupt when the block has finished,
    so that an interruption lands before the target changes or after it has changed, never between.

    Only in the main thread with Python's own SIGINT handler (elsewhere signals cannot be handled
    here, or the program has its own handling): the block then runs as it is.
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


def _folder(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove temporaries of ``target`` whose writing process no longer runs; return them."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[A-Za-z0-9_]+(\.data)?\.tmp$")
    removed = []
    try:
        entries = list(_folder(target).iterdir())
    except OSError:
        return removed
    for p in entries:
        m = pattern.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        try:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def temp_file_beside(target: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new temporary file in ``target``'s folder (open descriptor and path)."""
    remove_stale_temporaries(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=suffix, dir=_folder(target))
    return fd, Path(name)


def temp_dir_beside(target: Path) -> Path:
    """A new temporary folder in ``target``'s folder."""
    remove_stale_temporaries(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=_folder(target)))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2`` with ``RENAME_EXCHANGE``).

    Returns False where the system or the file system cannot, so that the caller falls back.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, musl < 1.2.5)
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (_errno.EINVAL, _errno.ENOSYS, _errno.ENOTSUP, _errno.EOPNOTSUPP):
        return False
    raise OSError(errno, os.strerror(errno), str(a), None, str(b))


def publish_file(tmp: Path, target: Path) -> None:
    """Rename a fully written file over ``target`` in one step, with the mode the umask gives (or the
    replaced file's, :func:`file_mode`)."""
    os.chmod(tmp, file_mode(replacing=target))
    crash_point("file.written")
    with interrupts_deferred():
        os.replace(tmp, target)
        record_published(target)


def publish_dir(tmp: Path, target: Path) -> None:
    """Move a fully written folder into place; an existing target is replaced only at the end.

    An existing target is swapped with the new folder in one step where the system can (Linux), so
    that at every moment the target is either the old folder, whole, or the new one. Elsewhere the
    old folder is first renamed aside: a crash between the two renames leaves it under its hidden
    temporary name. The folder and everything in it get the modes the umask gives (:func:`follow_umask`).
    """
    follow_umask(tmp)
    crash_point("dir.written")
    with interrupts_deferred():
        _publish_dir(tmp, target)
        record_published(target)


def _publish_dir(tmp: Path, target: Path) -> None:
    if target.exists() and not target.is_symlink() and target.is_dir() and _exchange(tmp, target):
        crash_point("dir.published")  # the new folder is in place; the old one, now at ``tmp``, not yet removed
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if target.exists():
        old = temp_dir_beside(target)
        old.rmdir()
        os.replace(target, old)
    os.replace(tmp, target)
    crash_point("dir.published")  # the new folder is in place; the old one not yet removed
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
