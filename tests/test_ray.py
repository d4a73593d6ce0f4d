"""``--executor ray``: merge and add with each module computed as a task on a Ray cluster (issue 26).

The cluster is a local one this file starts once (two CPUs; Ray's start-up costs seconds) and stops
at the end; without Ray installed these tests are skipped, except the one about that case. Every
output is compared, byte for byte, with the same command run with ``--executor local``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from share_convert import api
from share_convert.engine import ray_executor
from share_convert.engine.pipeline import merge
from share_convert.errors import ExecutorError
from share_convert.io.sources import open_inputs

from .builders.adapters import random_factors, write_adapter, write_small_adapters
from .builders.cli import one_error_line, run
from .hub_servers import CuttingProxy, Olah, hub_env, hub_settings, make_repo

CONFIG = ["--k", "3", "--private-rank", "1"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local Ray cluster for this file: the commands below connect to it rather than start their own."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_small_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def new_adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two adapters to add: one module the checkpoint has, and one it does not have."""
    root = tmp_path_factory.mktemp("new")
    return [
        write_adapter(
            root / f"n{i}",
            {"layers.0.q": random_factors(16, 12, 3, 100 + i), "layers.1.q": random_factors(16, 12, 3, 200 + i)},
        )
        for i in range(2)
    ]


def files_of(output: Path) -> dict[str, bytes]:
    """Every file a command wrote beside ``output`` (the checkpoint, or its index and shards), by name."""
    return {p.name: p.read_bytes() for p in sorted(output.parent.iterdir())}


def ok(*args: object) -> None:
    result = run(*args)
    assert result.exit_code == 0, result.output


def on_each_executor(tmp_path: Path, command: str, *args: object) -> dict[str, dict[str, bytes]]:
    """``command *args -o OUT --executor E`` for E local and ray, each into its own folder: E -> the files written."""
    outputs = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor / "share.safetensors"
        out.parent.mkdir()
        ok(command, *args, "-o", out, "--executor", executor)
        outputs[executor] = files_of(out)
    return outputs


@pytest.mark.parametrize("shards", ["5GB", "2KB"], ids=["single-file", "sharded"])
def test_merge_on_ray_writes_the_same_bytes_as_local(cluster, adapters, tmp_path, shards):
    outputs = on_each_executor(tmp_path, "merge", *adapters, *CONFIG, "--max-shard-size", shards)
    assert len(outputs["ray"]) == 1 if shards == "5GB" else len(outputs["ray"]) > 2  # or an index and shards
    assert outputs["ray"] == outputs["local"]


def test_add_on_ray_writes_the_same_bytes_as_local(cluster, adapters, new_adapters, tmp_path):
    base = tmp_path / "base.safetensors"
    ok("merge", *adapters, "-o", base, *CONFIG)
    outputs = on_each_executor(tmp_path, "add", base, *new_adapters)
    assert outputs["ray"] == outputs["local"]


def test_add_in_place_on_ray_replaces_the_checkpoint_the_workers_read(cluster, adapters, new_adapters, tmp_path):
    """The workers open the checkpoint by its path while the driver writes its replacement there."""
    base = tmp_path / "base.safetensors"
    ok("merge", *adapters, "-o", base, *CONFIG)
    ok("add", base, *new_adapters, "-o", tmp_path / "local.safetensors")
    ok("add", base, *new_adapters, "--in-place", "--executor", "ray")
    assert base.read_bytes() == (tmp_path / "local.safetensors").read_bytes()


def test_checkpoint_tasks_as_inputs_are_read_on_the_workers(cluster, adapters, new_adapters, tmp_path):
    """A task of a checkpoint travels as the checkpoint's path, opened again in the worker."""
    base = tmp_path / "base.safetensors"
    ok("merge", *adapters, "-o", base, *CONFIG)
    outputs = on_each_executor(tmp_path, "merge", base, *new_adapters)
    assert outputs["ray"] == outputs["local"]


def test_bin_adapters_travel_whole_and_are_read_on_the_workers(cluster, tmp_path):
    """A ``.bin`` file cannot be read by byte ranges: its source is sent (without the tensors loaded here)."""
    bins = [
        write_adapter(tmp_path / f"b{i}", {"layers.0.q": random_factors(16, 12, 3, i)}, fmt="bin") for i in range(3)
    ]
    outputs = on_each_executor(tmp_path, "merge", *bins)
    assert outputs["ray"] == outputs["local"]


def test_progress_runs_over_the_modules_in_order(cluster, adapters, tmp_path):
    seen: list[tuple[str, int, int]] = []
    api.merge(
        [str(p) for p in adapters], tmp_path / "s.safetensors", executor="ray", progress=lambda *a: seen.append(a)
    )
    modules = [m for m, _, _ in seen[:-1]]
    assert [step for _, step, _ in seen] == list(range(len(seen)))
    assert modules == sorted(modules) and len(modules) == 2 and seen[-1] == ("", 2, 2)


def test_hub_inputs_are_read_by_range_on_workers_that_lack_the_download(cluster, adapters, tmp_path):
    """The workers stand for nodes without the driver's Hub cache: once the driver has opened the
    ``hf://`` inputs (their headers), the files it downloaded are deleted, and the workers read each
    module's bytes from the Hub (a proxy that answers ranges as the Hub does), by ranged requests only."""
    server = Olah(tmp_path / "olah")
    hub = CuttingProxy(server.url, ranges=True)
    try:
        for i, path in enumerate(adapters[:2]):
            files = {f: path / f for f in ("adapter_config.json", "adapter_model.safetensors")}
            make_repo(server.mirrors, f"alice/a{i}", files)
        home = tmp_path / "home"
        inputs = ["hf://alice/a0", "hf://alice/a1"]
        with hub_settings(hub_env(hub.url, home)):
            merge(open_inputs(inputs), tmp_path / "local.safetensors")
            sources = open_inputs(inputs)
            for blobs in (home / "hub").glob("models--alice--*/blobs"):
                shutil.rmtree(blobs)
            hub.gets.clear()
            merge(sources, tmp_path / "ray.safetensors", executor="ray")
    finally:
        hub.stop()
        server.stop()
    assert (tmp_path / "ray.safetensors").read_bytes() == (tmp_path / "local.safetensors").read_bytes()
    weights = [rng for path, rng in hub.gets if "adapter_model.safetensors" in path]
    assert weights and all(rng is not None for rng in weights)  # two ranges per module and task, no file


def killing_sources(paths: list[Path], marker: Path, *, every_time: bool = False) -> list:
    """The adapters at ``paths``, read through a wrapper that kills the worker process reading a
    module: once (the first reader, which creates ``marker``), or every time. The wrapper is a class
    made here, so that Ray sends it by value to the workers; it cannot say where a module lies in
    its file (``locate``), so that the worker is sent the wrapper itself and reads through it."""

    class Killing:
        def __init__(self, source):
            self.source = source

        def __getattr__(self, name):
            if name == "source":
                raise AttributeError(name)
            return getattr(self.source, name)

        def locate(self, module):
            return None

        def read_module(self, module):
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                first = True
            except FileExistsError:
                first = False
            if first or every_time:
                os.kill(os.getpid(), signal.SIGKILL)
            return self.source.read_module(module)

    return [Killing(s) for s in open_inputs([str(p) for p in paths])]


def test_a_lost_worker_has_its_module_retried_and_the_output_is_unchanged(cluster, adapters, tmp_path):
    marker = tmp_path / "killed"
    marker.touch()  # the local run: nobody dies
    merge(killing_sources(adapters, marker), tmp_path / "local.safetensors")
    marker.unlink()
    merge(killing_sources(adapters, marker), tmp_path / "ray.safetensors", executor="ray")
    assert marker.exists()  # a worker died reading a module
    assert (tmp_path / "ray.safetensors").read_bytes() == (tmp_path / "local.safetensors").read_bytes()


def test_a_module_whose_workers_keep_dying_fails_and_writes_nothing(cluster, adapters, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_executor, "MAX_RETRIES", 0)  # one death is the last
    out = tmp_path / "out" / "share.safetensors"
    out.parent.mkdir()
    with pytest.raises(ExecutorError, match="Ray worker was lost"):
        merge(killing_sources(adapters, tmp_path / "killed", every_time=True), out, executor="ray")
    assert list(out.parent.iterdir()) == []


def test_ray_address_needs_the_ray_executor(adapters, tmp_path):
    line = one_error_line(run("merge", *adapters, "-o", tmp_path / "s.safetensors", "--ray-address", "auto"))
    assert "--ray-address needs --executor ray" in line
    assert not (tmp_path / "s.safetensors").exists()


def test_an_address_where_no_cluster_answers_is_one_line(adapters, tmp_path):
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "s.safetensors"
    result = run("merge", *adapters, "-o", out, "--executor", "ray", "--ray-address", f"127.0.0.1:{port}")
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in one_error_line(result)
    assert not out.exists()


def test_without_ray_installed_the_ray_executor_says_how_to_install_it(adapters, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    line = one_error_line(run("merge", *adapters, "-o", tmp_path / "s.safetensors", "--executor", "ray"))
    assert "pip install 'share-convert[ray]'" in line
    assert not (tmp_path / "s.safetensors").exists()
