"""Running the CLI in-process, as the tests that check its messages do."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import typer.main
import typer.testing
from typer.testing import CliRunner, Result

from share_convert.cli import app

runner = CliRunner()


def run(*args: object) -> Result:
    """``share-convert ARGS...`` in this process (paths and numbers given as they are)."""
    return runner.invoke(app, [str(a) for a in args])


def one_error_line(result: Result) -> str:
    """The single ``error:`` line of a command that failed with exit code 2 (and nothing else printed)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


@contextmanager
def command_built_once() -> Iterator[None]:
    """Within: ``CliRunner().invoke(app, ...)`` runs one click command built from ``app`` once.

    typer builds the click command anew from the app's functions at every ``invoke`` (reading every
    option's signature and type hints: about 30 ms, more than most commands on a small checkpoint
    take). The command it builds is the same each time, and a click command can run many times;
    a test that runs hundreds of commands builds it once here.
    """
    command = typer.main.get_command(app)
    build = typer.testing._get_command
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(typer.testing, "_get_command", lambda typer_app: command if typer_app is app else build(typer_app))
        yield
