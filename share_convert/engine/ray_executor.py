"""Modules computed as Ray tasks (``--executor ray``): merge and add spread over a cluster.

Each module is one Ray task. The driver sends a task only its module's inputs, small: for an
adapter, where that module's factors lie in its file (:class:`~share_convert.io.stack.ModuleRead`,
read there from a shared filesystem), for a task of a checkpoint the checkpoint's path (opened
again in the worker, once per worker process). The task returns its module's result; the driver
writes the results in module order through the same writer as a local run, so the output is the
same, byte for byte, and it is published only at the end: a worker lost mid-run has its module
retried by Ray (:data:`MAX_RETRIES` times) and leaves nothing half-written.

Ray is an optional dependency (``pip install 'share-convert[ray]'``), imported only here and only
when this executor runs.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..errors import ExecutorError, InvalidOptionError, ShareError, first_line
from ..io.stack import ModuleLocation, ModuleRead
from ..math.linalg import deterministic, load_linalg
from .members import ModuleFilter, TaskSource, original_rank

#: the executors merge and add run their modules on
EXECUTORS = ("local", "ray")
#: how many times Ray runs a module again whose worker was lost (a crash, a node gone)
MAX_RETRIES = 3
#: modules in flight per CPU of the cluster: enough to keep every worker busy while the driver writes
IN_FLIGHT_PER_CPU = 2
#: the driver's environment a module's task runs with: the Hub its ``hf://`` inputs came from (a
#: worker that lacks the driver's download reads their bytes from there); never a token
FORWARDED = ("HF_ENDPOINT",)
#: seconds to wait for a cluster address to accept a connection
CONNECT_TIMEOUT = 5.0
INSTALL_HINT = "Install the extra: pip install 'share-convert[ray]'"


def check_executor(executor: str, ray_address: str | None) -> None:
    """Refuse an unknown executor, a Ray address without the Ray executor, and the Ray executor
    where Ray is not installed: one line each, before any input is read."""
    if executor not in EXECUTORS:
        raise InvalidOptionError(f"unknown executor {executor!r}", hint=f"Use one of: {', '.join(EXECUTORS)}")
    if ray_address is not None and executor != "ray":
        raise InvalidOptionError("--ray-address needs --executor ray", hint="Add --executor ray, or drop the address")
    if executor == "ray":
        import_ray()


def import_ray() -> Any:
    """The ``ray`` module, or :class:`InvalidOptionError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InvalidOptionError("--executor ray needs Ray, which is not installed", hint=INSTALL_HINT) from None
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Connected to a Ray cluster for the enclosed work: the one this process is already connected
    to, else ``address``, else Ray's own resolution (``RAY_ADDRESS``, else a cluster ``ray start``
    started on this machine, else a local cluster started for the run and stopped after it)."""
    ray = import_ray()
    check_reachable(address)  # Ray itself waits minutes for an address where nothing answers
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    except (ConnectionError, ValueError, RuntimeError) as e:
        where = address or os.environ.get("RAY_ADDRESS") or "a local cluster"
        raise ExecutorError(
            f"cannot connect to the Ray cluster at {where} ({first_line(e)})",
            hint="Start one with 'ray start --head' and pass its address with --ray-address; a cluster that "
            "authenticates by token (Ray 2.60) also needs RAY_AUTH_MODE=token and its token here",
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def check_reachable(address: str | None, timeout: float = CONNECT_TIMEOUT) -> None:
    """Refuse, in one line, a cluster address ``host:port`` (or ``ray://host:port``) where nothing
    accepts a connection within ``timeout`` seconds; other addresses ('auto', none) are Ray's to resolve."""
    if not address or ":" not in address:
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not port.isdigit():
        raise InvalidOptionError(f"--ray-address {address!r} is not HOST:PORT", hint="For example 10.0.0.1:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ExecutorError(
            f"no Ray cluster answers at {address} ({first_line(e)})",
            hint="Start one with 'ray start --head' there, or check the address and port",
        ) from None


def module_reads(sources: Sequence[TaskSource], module: str) -> list[ModuleRead]:
    """What a worker needs to read ``module`` of every source: where its factors lie in the file
    (an adapter), or the source itself (a checkpoint's task, a ``.bin`` file)."""
    reads = []
    for s in sources:
        inner = s.inner if isinstance(s, ModuleFilter) else s
        locate = getattr(inner, "locate", None)
        place: ModuleLocation | None = locate(module) if locate is not None else None
        reads.append(
            ModuleRead(s.task, place, None if place is not None else inner, s.prior(module), original_rank(s, module))
        )
    return reads


def ray_map(fn: Callable[..., Any], calls: Iterable[tuple], *, names: Sequence[str], gpus: float = 0) -> Iterator[Any]:
    """``fn(*call)`` for every call, each as a Ray task, in order (``names`` says which module each
    is, for messages); at most :data:`IN_FLIGHT_PER_CPU` tasks per CPU of the cluster are pending.

    ``fn`` must be importable by the workers (a module-level function of share_convert). It runs
    there on one thread (:func:`~share_convert.math.linalg.deterministic`) in the driver's working
    directory where the worker has it, so relative paths read the same files. A lost worker's task
    runs again (:data:`MAX_RETRIES`); an error of share-convert's in a task is raised here as it was.
    """
    ray = import_ray()
    remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=MAX_RETRIES)(run_in_worker)
    cwd = os.getcwd()
    environ = {k: os.environ[k] for k in FORWARDED if k in os.environ}
    limit = max(1, int(IN_FLIGHT_PER_CPU * ray.cluster_resources().get("CPU", 1)))
    pending: deque = deque()
    it = iter(calls)
    try:
        for name in names:
            while len(pending) < limit:
                call = next(it, None)
                if call is None:
                    break
                pending.append(remote.remote(fn, cwd, environ, *call))
            yield fetch(ray, pending.popleft(), name)
    finally:
        for ref in pending:  # an error or an interruption: what is still running is not needed
            ray.cancel(ref, force=True)


def fetch(ray: Any, ref: Any, name: str) -> Any:
    """The result of one module's task; its error as share-convert raises errors."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ShareError):
            raise e.cause from None
        raise
    except (
        ray.exceptions.WorkerCrashedError,
        ray.exceptions.NodeDiedError,
        ray.exceptions.ObjectLostError,
        ray.exceptions.OutOfMemoryError,
    ) as e:
        raise ExecutorError(
            f"module {name}: its Ray worker was lost {MAX_RETRIES + 1} times ({first_line(e)}); nothing was written",
            hint="Check the cluster ('ray status') and run the command again",
        ) from None


def run_in_worker(fn: Callable[..., Any], cwd: str, environ: dict[str, str], *args: Any) -> Any:
    """``fn(*args)`` in a Ray worker: on one thread, in the driver's working directory where this
    node has it (the inputs' relative paths), with the driver's Hub endpoint (``environ``: what
    :data:`FORWARDED` names), the device's libraries loaded first."""
    import torch

    before = os.getcwd(), {k: os.environ.get(k) for k in environ}
    here = os.path.isdir(cwd)
    if here:
        os.chdir(cwd)
    os.environ.update(environ)
    try:
        with deterministic():
            load_linalg(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
            return fn(*args)
    finally:
        if here:
            os.chdir(before[0])
        for k, v in before[1].items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
