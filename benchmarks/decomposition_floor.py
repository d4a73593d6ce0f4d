"""The floor of a merge (issue 26): read every module's inputs once and decompose each side exactly once.

For every module, the LoRA factors of all adapters are read as the engine reads them (one stacked
read per module and side, ``io.stack.read_module_stack``, converted to float32), and each side's
stack (B: out × Σr, A: in × Σr) gets one exact decomposition: the eigendecomposition of its
smaller Gram matrix in float32 (the cheapest exact route on the CPU: the engine's
``linalg.GramDecomposition``). No canonicalization, planning, encoding or writing: any merge that
finds a module's principal directions exactly must at least do this much. One thread, as the
engine's numerics (``linalg.deterministic``); modules on as many worker threads as ``merge``
would use (``parallel.auto_workers``).

    python benchmarks/decomposition_floor.py DIR_OF_ADAPTERS
    python benchmarks/decomposition_floor.py DIR_OF_ADAPTERS --k 48

With ``--k K`` the floor of a fixed-k merge instead: one randomized fit of K vectors per module side
(the engine's ``linalg.principal_basis`` with its default oversampling and power iteration), the
least work a merge at ``--k K`` does besides reading.

With ``--tuned-process`` (what ``bench_bases.py`` passes) the process is treated as the console
script treats its own (``cli.process``): malloc keeps freed memory for reuse, and the process ends
without the interpreter's teardown, so that the floor contains nothing that a merge avoids.
(Without it the script changes no process-wide setting and can run inside another process, as the
tests run it.)
"""

from __future__ import annotations

import json
import sys
import time

import torch

from share_convert.cli.process import exit_now, keep_freed_memory
from share_convert.engine.members import check_compatible
from share_convert.engine.parallel import auto_workers, ordered_map
from share_convert.io.sources import open_inputs
from share_convert.io.stack import OpenFiles, read_module_stack
from share_convert.math.linalg import deterministic, principal_basis

#: the process treated as the console script's (see the module's docstring)
TUNED = "--tuned-process" in sys.argv


def main() -> None:
    t0 = time.perf_counter()
    if TUNED:
        keep_freed_memory()
    k = int(sys.argv[sys.argv.index("--k") + 1]) if "--k" in sys.argv else None
    sources = open_inputs([sys.argv[1]])
    modules = check_compatible(sources)
    shapes = [s.module_shapes() for s in sources]
    largest = max(sum(shapes[i][m][2] for i in idx) * (n + d) for m, (n, d, idx) in modules.items())
    workers = auto_workers(largest)
    clock = {"read": 0.0, "decompose": 0.0}

    def one(item) -> float:
        name, (_n, _d, idx) = item
        t = time.perf_counter()
        stack = read_module_stack([sources[i] for i in idx], name, files)
        if isinstance(stack, list):  # not one stacked read: one source at a time
            B = torch.cat([f.B.float() for f in stack], 1)
            A = torch.cat([f.A.float().T for f in stack], 1)
        else:
            B, A = stack.B.permute(1, 0, 2).flatten(1), stack.A.permute(2, 0, 1).flatten(1)
        t1 = time.perf_counter()
        top = 0.0
        for seed, side in enumerate((B, A)):
            if k is not None:
                top += float(principal_basis(side, k, seed=seed)[1][0] ** 2)
                continue
            gram = side.T @ side if side.shape[1] <= side.shape[0] else side @ side.T
            evals, _vecs = torch.linalg.eigh(gram)
            top += float(evals[-1])
        clock["read"] += t1 - t
        clock["decompose"] += time.perf_counter() - t1
        return top

    with OpenFiles() as files, deterministic():
        checksum = sum(ordered_map(one, list(modules.items()), workers))
    print(json.dumps({"modules": len(modules), "workers": workers, "wall_s": time.perf_counter() - t0,
                      "summed_s": clock, "checksum": checksum}))  # fmt: skip


if __name__ == "__main__":
    main()
    if TUNED:
        exit_now(0)
