"""The ``--device cuda`` path, run on a CUDA device emulated on the CPU (tests/emulated_cuda.py).

On the device, a module's whole computation (reading's conversion, canonicalization, the bases,
the planner's search and the encoding) runs where its members are; only what is written comes
back. The emulator computes every operation on the CPU, so the device path must write exactly what
the CPU path writes, and it fails any operation that mixes devices, as CUDA does. tests/test_gpu.py
runs the same path on a real GPU where there is one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from share_convert import ConsolidationConfig
from share_convert.engine import add, merge, pipeline
from share_convert.io import open_adapters, write_synthetic_adapters

from .emulated_cuda import emulated_cuda

HIDDEN, RANK, COUNT = 1024, 8, 8


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight adapters (2 layers × q, v; hidden 1024, r = 8) with a planted shared subspace plus noise."""
    root = tmp_path_factory.mktemp("device")
    write_synthetic_adapters(root / "a", count=COUNT, layers=2, hidden=HIDDEN, rank=RANK, shared_rank=8, noise=0.2)
    write_synthetic_adapters(root / "new", count=2, layers=3, hidden=HIDDEN, rank=RANK, shared_rank=8, seed=7)
    return root


def tensors(path: Path) -> dict[str, bytes]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}


def merged(adapters: Path, out: Path, device: str, **options) -> Path:
    merge(open_adapters([str(adapters / "a")]), out, ConsolidationConfig(device=device, **options))
    return out


def test_the_emulator_fails_where_cuda_would():
    with emulated_cuda():
        x = torch.ones(4, 4, device="cuda")
        assert x.is_cuda and torch.ones(1).device.type == "cpu"
        with pytest.raises(RuntimeError, match="same device"):
            x @ torch.ones(4, 4)
        with pytest.raises(TypeError, match="cuda"):
            x.numpy()
        assert float((x * 2).sum()) == 32.0 and (x + torch.tensor(1.0)).is_cuda  # CPU scalars mix, as on CUDA


@pytest.mark.parametrize(
    "options",
    [{}, {"target_error": 0.01}, {"k": 4, "private_rank": 2}, {"budget": "4x"}, {"groups": "auto"}, {"energy": 0.9}],
    ids=["default", "mixed", "fixed", "budget", "groups", "energy"],
)
def test_a_merge_on_the_device_writes_what_the_cpu_merge_writes(adapters, tmp_path, options):
    cpu = merged(adapters, tmp_path / "cpu.safetensors", "cpu", **options)
    with emulated_cuda():
        gpu = merged(adapters, tmp_path / "gpu.safetensors", "cuda", **options)
    assert tensors(gpu) == tensors(cpu)


def test_a_merge_on_the_device_does_its_n_sized_work_there(adapters, tmp_path):
    with emulated_cuda() as emulator:
        merged(adapters, tmp_path / "gpu.safetensors", "cuda", target_error=0.01)
    # nothing as large as one task's factor (n × r) is computed on the CPU: reading's conversion,
    # canonicalization, stacks, bases, planning and encoding all ran on the device (the writer's own
    # work on what it writes, like hashing, is the writer's: it quantizes factors stored as codes)
    assert [op for op in emulator.cpu_work(min_numel=HIDDEN * RANK) if "writer.py" not in op.where] == []
    assert len(emulator.device_work(min_numel=HIDDEN * RANK)) > 50


def test_add_on_the_device_writes_what_it_writes_on_the_cpu(adapters, tmp_path):
    base = merged(adapters, tmp_path / "base.safetensors", "cpu")
    # two new tasks with a third layer: one module is new to the checkpoint
    new = [f"new-{p.name}={p}" for p in sorted((adapters / "new").iterdir())]
    add(base, open_adapters(new), tmp_path / "cpu.safetensors")
    with emulated_cuda():  # the checkpoint's device is 'auto': the emulated GPU
        add(base, open_adapters(new), tmp_path / "gpu.safetensors")
    assert tensors(tmp_path / "gpu.safetensors") == tensors(tmp_path / "cpu.safetensors")


def test_one_worker_reads_the_next_module_while_it_computes_this_one(adapters, tmp_path, monkeypatch):
    events: list[tuple[str, str, float]] = []
    lock = threading.Lock()
    started: dict[str, threading.Event] = {}
    real_read, real_consolidate = pipeline.read_module_stack, pipeline.consolidate_module
    modules = list(open_adapters([str(adapters / "a")])[0].module_shapes())
    for m in modules:
        started[m] = threading.Event()

    def log(kind: str, module: str) -> None:
        with lock:
            events.append((kind, module, time.perf_counter()))

    def read(sources, module, *args, **kwargs):
        log("read", module)
        started[module].set()
        return real_read(sources, module, *args, **kwargs)

    def consolidate(name, *args, **kwargs):
        nxt = modules.index(name) + 1
        if nxt < len(modules):  # the next module's read is under way before this one is done
            assert started[modules[nxt]].wait(10), f"{modules[nxt]} was not read ahead"
        out = real_consolidate(name, *args, **kwargs)
        log("done", name)
        return out

    monkeypatch.setattr(pipeline, "read_module_stack", read)
    monkeypatch.setattr(pipeline, "consolidate_module", consolidate)
    merge(
        open_adapters([str(adapters / "a")]), tmp_path / "c.safetensors", ConsolidationConfig(device="cpu"), workers=1
    )
    at = {(kind, module): t for kind, module, t in events}
    for i in range(len(modules) - 2):  # never more than one module ahead: memory holds two at most
        assert at[("read", modules[i + 2])] >= at[("done", modules[i])]


def test_the_cli_merges_and_extracts_with_device_cuda(adapters, tmp_path):
    from typer.testing import CliRunner

    from share_convert.cli import app

    cpu = merged(adapters, tmp_path / "cpu.safetensors", "cpu")
    out = tmp_path / "gpu.safetensors"
    runner = CliRunner()
    with emulated_cuda():
        result = runner.invoke(app, ["merge", str(adapters / "a"), "-o", str(out), "--device", "cuda", "--json"])
        assert result.exit_code == 0, result.output
        extracted = runner.invoke(app, ["extract", str(out), "--task", "task-003", "-o", str(tmp_path / "x")])
        assert extracted.exit_code == 0, extracted.output
    assert tensors(out) == tensors(cpu)
    assert (tmp_path / "x" / "adapter_model.safetensors").is_file()
