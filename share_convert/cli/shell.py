"""The shell every command shares: the typer app, its error handling, output consoles and progress bar.

Every command is wrapped in :func:`handle_errors`, which turns a :class:`~share_convert.errors.ShareError`
(or an OS error such as a full disk) into one line on stderr and exit code 2; nothing else is caught.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import ShareError
from .help import HelpCommand


class _Typer(typer.Typer):
    """Every command draws its help with :class:`~share_convert.cli.help.HelpCommand` (the same under
    every typer the project allows)."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", HelpCommand)
        return super().command(*args, **kwargs)


app = _Typer(
    name="share-convert",
    help=(
        "Consolidate many LoRA adapters into one Share checkpoint (shared bases per module plus tiny "
        "per-task coefficients), and take any task back out as a PEFT adapter.\n\n"
        "Example: share-convert merge adapters/*.safetensors -o share.safetensors"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help, drawn by cli.help.HelpCommand: flags bare, [required] marked, choices listed as <a|b|c>
    rich_markup_mode=None,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable) -> Callable:
    """Turn user errors into one line and exit code 2; let bugs surface."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..files.atomic import publication_count, published_since

        before = publication_count()
        try:
            return fn(*args, **kwargs)
        except ShareError as e:
            fail(e.one_line())
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            fail(f"{where}{e.strerror or e}")
        except KeyboardInterrupt:
            fail(interrupted(published_since(before)), 130)

    return wrapper


def interrupted(written: list[Path]) -> str:
    """What Ctrl-C left on disk: nothing, or the outputs published before it (whole: a publication
    is never cut, see share_convert/files/atomic.py). Temporaries published into, then removed, are not counted."""
    done = list(dict.fromkeys(str(p) for p in written if os.path.lexists(p)))
    if not done:
        return "interrupted before anything was written"
    where = "it is" if len(done) == 1 else "they are"
    return f"interrupted after writing {', '.join(done)}: {where} in place, complete"


def say_waiting(line: str) -> None:
    """The one line a writer shows when another process holds its output's lock, before waiting."""
    err.print(line, highlight=False, markup=False, soft_wrap=True)


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[str, int, int], None] | None]:
    """A rich progress bar on a terminal; silence in pipes."""
    if not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None, item="")

        def update(item: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, item=item[-60:])

        yield update


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)


def show(summary: dict[str, Any], as_json: bool) -> None:
    """A checkpoint's report: JSON on stdout with ``--json``, tables otherwise."""
    from ..report.render import render

    if as_json:
        emit_json(summary)
    else:
        render(summary, out)


__all__ = ["app", "emit_json", "err", "fail", "handle_errors", "out", "progress_bar", "say_waiting", "show", "warn"]
