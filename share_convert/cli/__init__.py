"""The ``share-convert`` command line: a thin shell over the library (share_convert.api).

This is the entry point (the console script is ``share_convert.cli:main``; ``python -m share_convert.cli``
runs :mod:`share_convert.cli.__main__`), so it imports the commands and registers them, in the order
``--help`` lists them. The pieces:

- :mod:`~share_convert.cli.shell`: the typer app, errors as one line (exit 2), consoles, progress bar;
- :mod:`~share_convert.cli.options`: the options and arguments several commands share;
- :mod:`~share_convert.cli.help`: the help every command draws (the same under every typer allowed);
- :mod:`~share_convert.cli.process`: the process around a command (allocator settings, a fast exit);
- the commands: :mod:`~share_convert.cli.building` (merge, plan), :mod:`~share_convert.cli.reading`
  (info, tasks, extract, verify), :mod:`~share_convert.cli.updating` (add, remove),
  :mod:`~share_convert.cli.combining` (combine),
  :mod:`~share_convert.cli.hub` (push, pull), :mod:`~share_convert.cli.example` (demo).

Nothing here imports torch: ``--help``, ``tasks`` and ``info`` start fast.
"""

from __future__ import annotations

import os

from .building import merge, plan
from .combining import combine
from .example import demo
from .hub import pull, push
from .process import exit_now, keep_freed_memory
from .reading import extract, info, tasks, verify
from .shell import app, handle_errors
from .updating import add, remove

#: The commands, in the order ``--help`` lists them; each turns user errors into one line (handle_errors).
COMMANDS = (merge, info, tasks, extract, plan, add, remove, combine, verify, push, pull, demo)
for _command in COMMANDS:
    app.command()(handle_errors(_command))


def main() -> None:
    """The console script ``share-convert``: the command, in a process tuned for it (:mod:`.process`)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_freed_memory()
    try:
        app()
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)


__all__ = ["COMMANDS", "app", "main"]
