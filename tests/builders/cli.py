"""Running the CLI in-process, as the tests that check its messages do."""

from __future__ import annotations

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
