"""The rules for names, in one place: for names given on input and for names read from a checkpoint.

A checkpoint travels (``pull``, ``hf://`` addresses, files passed around), so every name its
manifest or shard index holds is untrusted input, held to the same rules as a name typed on the
command line:

- a task name names a folder (``extract --all`` writes one per task): no path separator, no
  leading ``.``, printable, at most :data:`MAX_TASK_NAME` characters (:func:`task_name_problem`);
- a module name or a head's key names a tensor (never a file): a printable, non-empty string of
  at most :data:`MAX_KEY` characters (:func:`key_problem`);
- a shard named by an index is a file beside the index (:func:`file_name_problem`).

Writers never build a path from a stored name with ``/``: :func:`path_under` joins it under the
target folder and refuses anything that would land outside it, whatever the name.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidTaskNameError

MAX_TASK_NAME = 100
#: Module names and head keys: far above any real model's (a few hundred characters at most).
MAX_KEY = 1000


def _shown(name: str, limit: int = 40) -> str:
    """A name as quoted in a message: its start, control characters replaced."""
    return "".join(ch if ch.isprintable() else "?" for ch in name[:limit]) + ("…" if len(name) > limit else "")


def task_name_problem(name: object) -> str | None:
    """What is wrong with ``name`` as a task name (``"contains a path separator"``...), or None."""
    problem = _text_problem(name, MAX_TASK_NAME)
    if problem is not None:
        return problem
    assert isinstance(name, str)
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if name.startswith("."):
        return "starts with '.'"
    if name != name.strip():
        return "starts or ends with whitespace"
    return None


def validate_task_name(name: str, *, origin: str | None = None) -> str:
    """Return ``name`` if it can name a task (and a folder); raise :class:`InvalidTaskNameError` otherwise."""
    problem = task_name_problem(name)
    if problem:
        raise InvalidTaskNameError(
            f"task name {_shown(str(name))!r} {problem}",
            path=origin,
            hint="Name the task explicitly: NAME=PATH, with letters, digits, '-', '_' or '.'",
        )
    return name


def key_problem(name: object) -> str | None:
    """What is wrong with ``name`` as a module name or a head's tensor key, or None."""
    return _text_problem(name, MAX_KEY)


def _text_problem(name: object, limit: int) -> str | None:
    """What is wrong with ``name`` as any stored name (text, not empty, at most ``limit`` characters,
    printable), or None: the rules every name shares."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not text"
    if not name:
        return "is empty"
    if len(name) > limit:
        return f"is {len(name)} characters long (at most {limit})"
    if not name.isprintable():  # every character printable (one C loop: adapters have hundreds of keys)
        return "contains control characters"
    return None


def file_name_problem(name: object) -> str | None:
    """What is wrong with ``name`` as the name of a file beside another (a shard beside its index), or None."""
    if not isinstance(name, str) or not name:
        return "is not a file name"
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name or Path(name).name != name:
        return "is not a file name beside it"
    if any(not ch.isprintable() for ch in name) or len(name) > 255:
        return "is not a file name beside it"
    return None


def shown(name: object) -> str:
    """``name`` quoted for a one-line message (start only, control characters replaced)."""
    return repr(_shown(name)) if isinstance(name, str) else type(name).__name__


def path_under(root: str | Path, name: str, *, origin: str | Path | None = None) -> Path:
    """``root / name`` for a ``name`` read from a file, refused unless it is one entry directly in
    ``root``: no separator, no ``..``, not absolute. Every writer that names an output after a
    stored name goes through here, so that no name can place a file outside its target."""
    root = Path(root)
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
    ):
        raise InvalidTaskNameError(
            f"the name {shown(name)} would be written outside {root}",
            path=origin,
            hint="Re-create the checkpoint with plain task names (letters, digits, '-', '_', '.')",
        )
    joined = root / name
    if os.path.normpath(joined.parent) != os.path.normpath(root):
        raise InvalidTaskNameError(
            f"the name {shown(name)} would be written outside {root}", path=origin, hint="Re-create the checkpoint"
        )
    return joined
