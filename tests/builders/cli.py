"""Running the CLI in-process, as the tests that check its messages do (and as a process where that is the point)."""

from __future__ import annotations

import subprocess
import sys
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


def imports_torch(*args: object) -> bool:
    """Whether ``share-convert ARGS...``, run as a fresh process, imports torch (it must succeed).

    The console script ends its process itself (``cli.process.exit_now``): what the probe prints, it
    prints from an exit handler, which still runs.
    """
    probe = (
        "import atexit, runpy, sys\n"
        "atexit.register(lambda: print('torch' in sys.modules))\n"
        f"sys.argv = ['share-convert', *{[str(a) for a in args]!r}]\n"
        "runpy.run_module('share_convert.cli', run_name='__main__')\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()[-1] == "True"


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
