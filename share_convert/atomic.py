"""Temporary files beside a target, published by one rename; leftovers of killed runs removed.

Every output (checkpoint, extracted adapter) is written under a hidden temporary name in the
target's folder and renamed over the target at the end, so the target is always whole. The
temporary names carry the writing process's id — ``.NAME.PID.RANDOM.tmp`` — so that the next
write of the same target can remove what a killed run left behind (its process no longer runs)
without touching another live run's files.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path


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


def publish_dir(tmp: Path, target: Path) -> None:
    """Move a fully written folder into place; an existing target is replaced only at the end."""
    old = None
    if target.exists():
        old = temp_dir_beside(target)
        old.rmdir()
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
