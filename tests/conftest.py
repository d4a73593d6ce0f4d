"""Shared fixtures: the real adapters in ../shared/data/real-adapters and small synthetic ones."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from .builders.adapters import write_small_adapters
from .real_adapters import RealAdaptersUnavailable, real_adapters_dir

# No test may reach the real Hub: anything not pointed at a local server fails fast on a closed port.
os.environ.setdefault("HF_ENDPOINT", "http://127.0.0.1:9")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

# One torch thread in this process and in the processes the tests start, unless OMP_NUM_THREADS
# says otherwise (the thread-count tests set it per process). The tensors here are small, and on
# cores shared with other work torch's OpenMP threads spin against each other: on this 2-core
# machine at load 5-7, test_planning.py + test_extraction.py took 180-233 s with 2 threads and
# 31-44 s with 1 (CPU time 99-135 s against 20-21 s).
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# The test files that take longest, longest first. The default run spreads whole files over
# pytest-xdist workers in collection order (pyproject.toml: -n, --dist loadfile); starting with the
# longest keeps one worker from running a long file alone at the end. The order of the tests inside each file is kept, and every other file follows in pytest's order.
LONGEST_FIRST = (  # seconds per file, summed --durations of a 2-worker run (2-core machine, 2026-12-07)
    "test_benchmarks.py",  # 37
    "test_t2i.py",  # 27
    "test_training.py",  # 22
    "test_device_path.py",  # 21
    "test_integrity.py",  # 19
    "test_sharding.py",  # 18
    "test_runtime.py",  # 16
    "test_ray.py",  # 15
    "test_hub.py",  # 13
    "test_writers.py",  # 12
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of :data:`LONGEST_FIRST` first, in that order (a stable sort: nothing else moves)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def real() -> Path:
    """The folder of real adapters: $SHARE_REAL_ADAPTERS, ../shared/data/real-adapters, or fetched once
    into a cache from the adapters' source repositories (tests/real_adapters.py).

    Looked up when a test first asks for it, not when this file is imported, so that tests that do not
    use real adapters collect and run without them. When none can be had, every test that asks fails
    with the reason and what to do (the lookup is tried once per session: pytest keeps the failure).
    """
    try:
        return real_adapters_dir()
    except RealAdaptersUnavailable as e:
        reason = str(e)
    pytest.fail(reason, pytrace=False)


def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that every process of this test run sees: under pytest-xdist each worker has its own
    base temporary folder inside the run's (``popen-gw0`` …), so the run's folder is their parent."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def merged(real: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Path]]:
    """Checkpoints of the real adapters, each merged once per test run and shared by the tests.

    ``merged("gpt2-c_attn", k=6)`` merges ``real/gpt2-c_attn`` with ``ConsolidationConfig(k=6)``
    the first time it is asked for and returns the same file afterwards, in this process and in
    the other pytest-xdist workers (the first to ask merges under a file lock; the others wait for
    it and read its file). Tests must not change it (copy it into ``tmp_path`` first); at the end of
    the session every shared file a process handed out is checked to be byte for byte what was
    merged, so a test that changed one is reported.
    """
    from filelock import FileLock

    from share_convert import ConsolidationConfig
    from share_convert.engine import merge
    from share_convert.io import open_adapters

    root = shared_root(tmp_path_factory) / "merged"
    root.mkdir(exist_ok=True)
    made: dict[tuple, tuple[Path, str]] = {}

    def get(*groups: str, **config: Any) -> Path:
        key = (groups, tuple(sorted(config.items())))
        if key not in made:
            folder = root / hashlib.sha256(repr(key).encode()).hexdigest()[:16]
            out = folder / "share.safetensors"
            with FileLock(str(folder) + ".lock"):
                if not out.is_file():
                    folder.mkdir(exist_ok=True)
                    merge(open_adapters([str(real / g) for g in groups]), out, ConsolidationConfig(**config))
            made[key] = (out, hashlib.sha256(out.read_bytes()).hexdigest())
        return made[key][0]

    yield get
    changed = [str(p) for p, digest in made.values() if hashlib.sha256(p.read_bytes()).hexdigest() != digest]
    assert not changed, f"a test changed a shared checkpoint (copy it first): {changed}"


@pytest.fixture
def small_adapters(tmp_path: Path) -> list[Path]:
    """Four adapters over two modules (16×12 and 8×12), mixed ranks and alphas (builders.adapters)."""
    return write_small_adapters(tmp_path)


# SHARE_EMULATED_CUDA=1: every test runs with a CUDA device emulated on the CPU (tests/emulated_cuda.py),
# so that 'auto' and 'cuda' take the device path and any tensor left on the wrong side fails as it
# would on a GPU. The engine's own tests run this way in tests/test_device_path.py.
if os.environ.get("SHARE_EMULATED_CUDA") == "1":

    @pytest.fixture(autouse=True)
    def _emulated_cuda() -> Iterator[None]:
        from .emulated_cuda import emulated_cuda

        with emulated_cuda():
            yield
