"""Whole-process measurements: wall time and peak resident memory of one command."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import asdict, dataclass


@dataclass
class Run:
    command: list[str]
    wall_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("stdout")
        d["stderr"] = self.stderr[-500:]
        return d


def measure(command: list[str], env: dict | None = None) -> Run:
    """Run ``command`` (no shell) and return its wall time and peak RSS (from wait4's rusage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = b"", b""
    # read the pipes while the process runs, then reap it with wait4 to get its own rusage
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Run(
        command,
        wall,
        usage.ru_maxrss / 1024,
        proc.returncode,
        out.decode(errors="replace"),
        err.decode(errors="replace"),
    )
