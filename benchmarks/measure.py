"""Whole-process measurements: wall time and peak resident memory of one command.

The command is started by a minimal launcher process (``python -S``, a few MB), which times it
and reaps it with ``wait4``. Starting it straight from the benchmark would be wrong for memory:
on Linux a child's ``ru_maxrss`` keeps the resident size it had before ``exec``, that is, the
benchmark process's own (torch imported, adapters generated), which would become a floor under
every figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

#: Runs argv[2:], writes {"wall_s", "maxrss_kb", "cpu_s", "system_s", "minor_faults", "status"} as JSON
#: to the file argv[1].
LAUNCHER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    json.dump({"wall_s": wall, "maxrss_kb": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime,
               "system_s": usage.ru_stime, "minor_faults": usage.ru_minflt,
               "status": os.waitstatus_to_exitcode(status)}, f)
"""


@dataclass
class Run:
    command: list[str]
    wall_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str
    #: user + system CPU seconds of the command (all its threads): less sensitive than wall time to
    #: other work sharing the machine
    cpu_s: float = 0.0
    #: of which in the kernel (page faults, reads), and the page faults that found the page in memory
    system_s: float = 0.0
    minor_faults: int = 0

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("stdout")
        d["stderr"] = self.stderr[-500:]
        return d


def measure(command: list[str], env: dict | None = None) -> Run:
    """Run ``command`` (no shell) and return its wall time and peak RSS (from wait4's rusage)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        proc = subprocess.run(
            [sys.executable, "-S", "-c", LAUNCHER, report.name, *command],
            capture_output=True,
            env={**os.environ, **(env or {})},
        )
        result = json.loads(open(report.name).read() or "null") if proc.returncode == 0 else None
    if result is None:  # the launcher itself failed (e.g. the program was not found)
        return Run(command, 0.0, 0.0, proc.returncode or 127, "", proc.stderr.decode(errors="replace"))
    return Run(
        command,
        result["wall_s"],
        result["maxrss_kb"] / 1024,
        result["status"],
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
        result.get("cpu_s", 0.0),
        result.get("system_s", 0.0),
        result.get("minor_faults", 0),
    )
