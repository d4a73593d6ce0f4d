"""Modules computed on a few threads, in order: the worker pool of merge and add.

``--executor local`` (the default) runs modules here; ``--executor ray`` runs each module as a Ray
task (:mod:`.ray_executor`, imported only then: Ray is an optional dependency).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext

#: Memory one module may take (bytes) before modules are processed one at a time.
PARALLEL_MODULE_BYTES = 384 * 2**20


def auto_workers(largest_module_params: int) -> int:
    """One worker per core (at most 4), or one when a module's stack is large: memory holds one
    module per worker, and the project's rule is that memory stays small and flat."""
    # factors as read, canonical factors and the stacks: about four float32 copies of the module
    if largest_module_params * 4 * 4 > PARALLEL_MODULE_BYTES:
        return 1
    return min(os.cpu_count() or 1, 4)


def ordered_map(fn: Callable, items: list, workers: int | None) -> Iterator:
    """``map(fn, items)`` on a few threads, in order, with at most ``2 × workers`` results pending."""
    workers = workers or min(os.cpu_count() or 1, 4)
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="share-convert") as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))


def prefetched(fn: Callable, items: list, ahead: int = 1) -> Iterator:
    """``map(fn, items)``, computed on one background thread ``ahead`` items before each is asked
    for: the next module is read while this one is computed (memory: ``ahead`` more modules)."""
    if len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="share-convert-read") as pool:
        pending: deque = deque(pool.submit(fn, item) for item in items[:ahead])
        nxt = ahead
        while pending:
            result = pending.popleft().result()
            if nxt < len(items):
                pending.append(pool.submit(fn, items[nxt]))
                nxt += 1
            yield result


def check_executor(executor: str, ray_address: str | None) -> None:
    """Refuse an unknown executor, an address without Ray, or Ray where it is not installed (one line each)."""
    from .ray_executor import check_executor as check

    check(executor, ray_address)


def executor_session(executor: str, ray_address: str | None) -> AbstractContextManager:
    """Connected to the executor's cluster for the enclosed work (nothing to connect to for ``local``)."""
    if executor != "ray":
        return nullcontext()
    from .ray_executor import ray_session

    return ray_session(ray_address)
