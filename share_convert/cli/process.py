"""What the ``share-convert`` process does for itself before and after a command.

These are process-wide settings, so they belong to the console script, never to the library
(whose callers own their process). Both are measured gains, not correctness: a command that
skips them behaves the same, byte for byte.

- :func:`keep_freed_memory`: glibc's malloc returns large freed blocks to the kernel at once, so
  a merge, which frees and reallocates a module's stacks (tens of MB) hundreds of times, pays a
  page fault and a zeroed page for every 4 KiB of every reallocation. Keeping freed memory for
  reuse took the noisy 7B set's ``--k 48`` merge from 440,000–770,000 page faults (1.6–2.1 s of
  system time) to about 120,000 (1.0 s), and the 1B-shaped set's default merge from 2.8 million
  (6.2 s) to 0.27 million (2.1 s), for 0.15 GB more peak memory there (RESULTS.md, section 26).
- :func:`exit_now`: once a command has finished and its output is flushed, tearing the interpreter
  down (collecting torch's object graph module by module) takes about 0.45 s on the project's
  machine and does nothing a finished command needs; the process ends without it.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import threading
from typing import NoReturn

#: mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

#: Blocks up to this size come from malloc's heaps (reused when freed) instead of a fresh mmap each
#: time; free memory up to this much is kept at the top of each heap instead of returned at once.
KEEP_BLOCKS_UP_TO = 64 * 2**20
KEEP_FREE_AT_TOP = 64 * 2**20

#: Settings a user made for glibc's malloc: when any is present, the process keeps them.
_USER_MALLOC_SETTINGS = ("GLIBC_TUNABLES", "MALLOC_TOP_PAD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module's docstring); whether it did.

    Does nothing where the C library is not glibc, or where the user configured malloc through
    its environment variables (theirs win).
    """
    if any(name in os.environ for name in _USER_MALLOC_SETTINGS):
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        libc = ctypes.CDLL(None)  # the C library the interpreter runs on
        # mmap threshold first: setting any of the three turns off glibc's own adjustment of it
        settings = ((_M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO), (_M_TOP_PAD, KEEP_FREE_AT_TOP),
                    (_M_TRIM_THRESHOLD, 2 * KEEP_FREE_AT_TOP))  # fmt: skip
        return all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError, ValueError):
        return False


def exit_now(code: object) -> NoReturn:
    """End the process with ``code`` (as ``SystemExit`` would take it) without tearing the interpreter down.

    The exit handlers registered with :mod:`atexit` still run (a Ray session's shutdown, logging's
    flush, open files' finalizers) and both standard streams are flushed first. Where another
    non-daemon thread still runs, or a stream cannot be flushed, the ordinary exit is taken instead,
    so nothing that the interpreter's teardown would finish is cut short.
    """
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        raise SystemExit(code)
    if code is None or isinstance(code, int):
        status = code or 0
    else:  # SystemExit's rule: anything else is printed to stderr, and the status is 1
        print(code, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        raise SystemExit(status) from None
    os._exit(status)
