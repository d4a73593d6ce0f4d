"""The GPU path of the decomposition (skipped without a CUDA device; run on a machine with one)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from share_convert import ConsolidationConfig
from share_convert.checkpoint import Checkpoint
from share_convert.engine import merge
from share_convert.io import extract, open_adapters, write_synthetic_adapters
from share_convert.math import principal_basis

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def merged(tmp_path, inputs: list[str], device: str, name: str, **options) -> Checkpoint:
    out = tmp_path / f"{name}.safetensors"
    merge(open_adapters(inputs), out, ConsolidationConfig(device=device, **options))
    return Checkpoint(out)


def test_the_randomized_basis_on_the_gpu_spans_what_the_cpu_finds():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(2048, 24, generator=g) @ torch.randn(24, 3000, generator=g)
    U_cpu, S_cpu, _ = principal_basis(stack, 24)
    U_gpu, S_gpu, _ = principal_basis(stack.cuda(), 24)
    assert U_gpu.is_cuda and U_gpu.shape == U_cpu.shape
    assert torch.allclose(S_gpu, S_cpu, rtol=1e-4)
    # the same subspace: the projector difference is small
    P = U_cpu.double() @ U_cpu.double().T - (U_gpu.double() @ U_gpu.double().T).cpu()
    assert float(torch.linalg.norm(P)) < 1e-3


@pytest.mark.parametrize("options", [{}, {"k": 8}, {"groups": "auto"}])
def test_a_gpu_merge_makes_the_plan_and_errors_of_a_cpu_merge(tmp_path, options):
    write_synthetic_adapters(tmp_path / "a", count=40, layers=2, hidden=256, rank=16, shared_rank=8)
    cpu = merged(tmp_path, [str(tmp_path / "a")], "cpu", "cpu", **options)
    gpu = merged(tmp_path, [str(tmp_path / "a")], "cuda", "gpu", **options)
    for module, info in cpu.modules.items():
        other = gpu.modules[module]
        assert (other["k_B"], other["k_A"]) == (info["k_B"], info["k_A"])
        for task, rec in info["tasks"].items():
            assert other["tasks"][task]["error"] == pytest.approx(rec["error"], abs=1e-4)


def test_a_gpu_merge_of_real_adapters_extracts_like_a_cpu_merge(tmp_path, real):
    inputs = [str(real / "gpt2-c_attn"), str(real / "gpt2-c_attn+c_proj")]
    cpu = merged(tmp_path, inputs, "cpu", "cpu")
    gpu = merged(tmp_path, inputs, "cuda", "gpu")
    task = next(iter(cpu.tasks))
    extract(cpu.path, task, tmp_path / "from-cpu")
    extract(gpu.path, task, tmp_path / "from-gpu")
    ref = open_adapters([str(tmp_path / "from-cpu")])[0]
    got = open_adapters([str(tmp_path / "from-gpu")])[0]
    for module in ref.module_shapes():
        a, b = ref.read_module(module), got.read_module(module)
        W1, W2 = a.B.double() @ a.A.double(), b.B.double() @ b.A.double()
        assert float(torch.linalg.norm(W1 - W2)) <= 1e-3 * float(torch.linalg.norm(W1)) + 1e-8


def test_a_gpu_merge_is_byte_identical_run_after_run(tmp_path):
    write_synthetic_adapters(tmp_path / "a", count=40, layers=1, hidden=256, rank=16, shared_rank=8)
    first = merged(tmp_path, [str(tmp_path / "a")], "cuda", "one")
    second = merged(tmp_path, [str(tmp_path / "a")], "cuda", "two")
    assert first.path.read_bytes() == second.path.read_bytes()


def test_a_fresh_process_merges_on_the_gpu_with_worker_threads(tmp_path):
    # CUDA's linear-algebra libraries load lazily and not thread-safely: the first QR must not race
    write_synthetic_adapters(tmp_path / "a", count=8, layers=8, hidden=256, rank=8, shared_rank=8)
    out = tmp_path / "c.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "share_convert.cli", "merge", str(tmp_path / "a"), "-o", str(out), "--device", "cuda"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(Checkpoint(out).modules) == 16
