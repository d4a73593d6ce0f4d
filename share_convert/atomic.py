"""Temporary files beside a target, published by one rename; leftovers of killed runs removed.

Every output (checkpoint, extracted adapter) is written under a hidden temporary name in the
target's folder and renamed over the target at the end, so the target is always whole. The
temporary names carry the writing process's id — ``.NAME.PID.RANDOM.tmp`` — so that the next
write of the same target can remove what a killed run left behind (its process no longer runs)
without touching another live run's files.

:func:`crash_point` marks the steps of a write where the crash-safety tests kill the process.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path

CRASH_AT = "SHARE_CONVERT_CRASH_AT"


def crash_point(label: str) -> None:
    """Kill this process with SIGKILL here when the environment variable ``SHARE_CONVERT_CRASH_AT`` is ``label``.

    A test-only hook: the crash-safety tests set the variable in a child process to kill it at a
    named step of a write (after the data is written, between the renames, ...), so that the kill
    provably lands inside the write rather than wherever a timer happened to fire. Unset, as it
    always is outside those tests, it costs one dictionary look-up.
    """
    if os.environ.get(CRASH_AT) == label:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


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


def publish_dir(tmp: Path, target: Path) -> None:
    """Move a fully written folder into place; an existing target is replaced only at the end.

    An existing target is swapped with the new folder in one step where the system can (Linux), so
    that at every moment the target is either the old folder, whole, or the new one. Elsewhere the
    old folder is first renamed aside: a crash between the two renames leaves it under its hidden
    temporary name.
    """
    crash_point("dir.written")
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
