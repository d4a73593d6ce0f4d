"""Files written atomically, following the umask, by writers that take turns.

A lazy facade (:mod:`share_convert.facade`): what users, tests and benchmarks import from here.
"""

from __future__ import annotations

from ..facade import lazy_names

#: name -> the module of this package that defines it
_WHERE = {
    "CRASH_AT": "atomic",
    "INTERRUPT_AT": "atomic",
    "PAUSE_AT": "atomic",
    "writing": "locking",
}

__getattr__, __all__ = lazy_names(__name__, _WHERE)
