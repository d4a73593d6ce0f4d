"""The console script's process: how it ends, and the allocator settings it makes (share_convert.cli.process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from share_convert.cli import process


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter (the point of these tests is how a process ends)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env={**os.environ, **env}
    )


def test_exit_now_ends_with_the_commands_status_after_running_exit_handlers():
    proc = run_python(
        """
        import atexit
        from share_convert.cli.process import exit_now
        atexit.register(lambda: print("handler ran"))
        print("output", end="")  # unflushed: exit_now flushes it
        exit_now(3)
        """
    )
    assert proc.returncode == 3
    assert proc.stdout == "outputhandler ran\n"


def test_exit_now_with_a_message_prints_it_and_ends_with_status_1():
    proc = run_python("from share_convert.cli.process import exit_now\nexit_now('stopped: reason')")
    assert (proc.returncode, proc.stderr) == (1, "stopped: reason\n")


def test_exit_now_waits_for_a_running_thread_by_taking_the_ordinary_exit():
    proc = run_python(
        """
        import threading, time
        from share_convert.cli.process import exit_now
        threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
        exit_now(0)
        """
    )
    assert (proc.returncode, proc.stdout) == (0, "thread finished\n")


def test_console_script_keeps_a_user_error_exit_status_and_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "share_convert.cli", "info", str(tmp_path / "missing.safetensors")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "missing.safetensors" in proc.stderr


def _glibc() -> bool:
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (AttributeError, ValueError):
        return False


@pytest.mark.skipif(not _glibc(), reason="glibc's malloc only")
def test_allocator_settings_are_made_on_glibc():
    probe = "from share_convert.cli.process import keep_freed_memory\nprint(keep_freed_memory())"
    assert run_python(probe).stdout.strip() == "True"


@pytest.mark.parametrize("setting", ["MALLOC_TOP_PAD_", "GLIBC_TUNABLES"])
def test_allocator_settings_the_user_made_are_kept(setting, monkeypatch):
    monkeypatch.setenv(setting, "1")
    assert process.keep_freed_memory() is False
