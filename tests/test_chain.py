"""Basis-rotation chains (format version 3): an add keeps the old tasks' coefficient rows as they
are stored and records the rotation from the old bases to the new ones; readers rotate on read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from share_convert import ConsolidationConfig
from share_convert.checkpoint import Checkpoint, tensor_bytes, verify_checkpoint
from share_convert.engine import add, merge, quadratic_form, remove
from share_convert.engine import chain as chains
from share_convert.errors import CorruptCheckpointError
from share_convert.io import CheckpointTask, open_adapters

from .builders.adapters import random_factors, write_adapter

MODULE = "base_model.model.layers.0.q"  # as the checkpoint names the adapters' "layers.0.q"
K4 = ConsolidationConfig(k=4)


def delta(ckpt: Checkpoint, task: str, module: str = MODULE) -> torch.Tensor:
    B, A = ckpt.reconstruction(task, module)
    return B @ A.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def adapters(root: Path, count: int, seed: int, n: int = 24, d: int = 20, r: int = 2) -> list:
    paths = [
        write_adapter(root / f"s{seed}-{i}", {"layers.0.q": random_factors(n, d, r, seed=seed + i)}, r=r, alpha=r)
        for i in range(count)
    ]
    return open_adapters([str(p) for p in paths])


@pytest.fixture
def chained(tmp_path, monkeypatch) -> tuple[list[Path], list]:
    """16 rank-2 tasks in k = 4 bases (lossy: every add drifts), then three adds, one task each;
    small tensors are chained too (CHAIN_MIN_BYTES = 0). Returns the four checkpoints and the new sources."""
    monkeypatch.setattr(chains, "CHAIN_MIN_BYTES", 0)
    old, new = adapters(tmp_path / "old", 16, seed=0), adapters(tmp_path / "new", 3, seed=100)
    paths = [tmp_path / "c0.safetensors"]
    merge(old, paths[0], K4)
    for i, src in enumerate(new, start=1):
        paths.append(tmp_path / f"c{i}.safetensors")
        add(paths[i - 1], [src], paths[i], K4)
    return paths, new


def test_an_add_copies_the_old_rows_and_records_its_rotation(chained):
    (c0, c1, *_), _ = chained
    before, after = Checkpoint(c0), Checkpoint(c1)
    assert before.manifest["format_version"] == 2 and after.manifest["format_version"] == 3
    prefix = f"modules/{MODULE}/"
    for side in "BA":
        old = tensor_bytes(before.tensor(f"{prefix}coefs_{side}"))
        assert tensor_bytes(after.tensor(f"{prefix}coefs_{side}"))[: len(old)] == old
        assert tuple(after.tensor(f"{prefix}rotations_{side}").shape) == (1, 4, 4)
    assert after.tensor(f"{prefix}chain_rows").tolist() == [32]  # 16 tasks × rank 2, in the first bases


def test_extraction_after_several_adds_equals_rotating_the_coefficients_at_each_add(chained):
    paths, new = chained
    ckpts = [Checkpoint(p) for p in paths]
    for first, task in [(0, "s0-0"), (0, "s0-15"), (1, new[0].task), (2, new[1].task)]:
        parts = ckpts[first].task_tensors(task, MODULE)
        EB, EA = parts["coef_B"].double(), parts["coef_A"].double()
        for prev, cur in zip(ckpts[first:], ckpts[first + 1 :]):  # E ← (β_newᵀ β_old) E at each add (spec §5)
            (b0, a0), (b1, a1) = prev.bases(MODULE), cur.bases(MODULE)
            EB, EA = (b1.double().T @ b0.double()) @ EB, (a1.double().T @ a0.double()) @ EA
        beta, alpha = ckpts[-1].bases(MODULE)
        eager = (beta.double() @ EB) @ (alpha.double() @ EA).T
        assert rel(delta(ckpts[-1], task), eager) < 1e-6, task  # rotated rows are read as float32


def test_a_chained_add_gives_the_updates_and_figures_of_writing_the_rows_again(chained, monkeypatch, tmp_path):
    (c0, c1, *_), new = chained
    monkeypatch.setattr(chains, "CHAIN_MIN_BYTES", 1 << 40)  # every row written again (rotated, rebalanced)
    add(c0, [new[0]], tmp_path / "rewritten.safetensors", K4)
    chain, rewritten = Checkpoint(c1), Checkpoint(tmp_path / "rewritten.safetensors")
    assert rewritten.manifest["format_version"] == 2
    for task in chain.tasks:
        assert rel(delta(chain, task), delta(rewritten, task)) < 1e-6, task
        a, b = chain.modules[MODULE]["tasks"][task], rewritten.modules[MODULE]["tasks"][task]
        # the bound uses the drift's part outside the old bases, a difference of squares: rounding
        # the rewritten coefficients moves it a little more than the drift itself
        assert a["error"] == pytest.approx(b["error"], abs=1e-8)
        assert a.get("drift", -1) == pytest.approx(b.get("drift", -1), abs=1e-9)


def test_the_recorded_drift_is_the_change_of_each_old_update(chained):
    (_, c1, c2, _), _ = chained
    before, after = Checkpoint(c1), Checkpoint(c2)
    drifts = []
    for task in before.tasks:
        rec = after.modules[MODULE]["tasks"][task]
        W = delta(before, task)
        measured = float(torch.linalg.norm(W - delta(after, task))) / rec["norm"]
        assert rec["drift"] == pytest.approx(measured, rel=1e-6, abs=1e-9), task
        drifts.append(measured)
    assert max(drifts) > 1e-2  # the bases dropped directions: the figures say something


def test_the_same_add_writes_the_same_bytes(chained, tmp_path):
    (c0, c1, *_), new = chained
    add(c0, [new[0]], tmp_path / "again.safetensors", K4)
    assert (tmp_path / "again.safetensors").read_bytes() == c1.read_bytes()


def test_verify_passes_on_a_chained_checkpoint(chained):
    (*_, c3), _ = chained
    assert verify_checkpoint(Checkpoint(c3))["ok"]


def test_a_flipped_byte_in_a_rotation_is_found(chained, tmp_path):
    (*_, c3), _ = chained
    ckpt = Checkpoint(c3)
    _, _, offset, _, _ = ckpt.stored_layout(f"modules/{MODULE}/rotations_B")
    data = bytearray(c3.read_bytes())
    data[offset + 3] ^= 0x10
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="rotations_B"):
        Checkpoint(bad).verify_all()
    with pytest.raises(CorruptCheckpointError, match="rotations_B"):
        delta(Checkpoint(bad), "s0-0")  # its rows are in the first bases: reading it needs the rotation


def test_remove_keeps_the_chain_and_every_remaining_update(chained, tmp_path):
    (*_, c3), _ = chained
    remove(c3, ["s0-3"], tmp_path / "removed.safetensors")
    before, after = Checkpoint(c3), Checkpoint(tmp_path / "removed.safetensors")
    assert after.manifest["format_version"] == 3 and "s0-3" not in after.tasks
    for task in after.tasks:
        assert torch.equal(delta(after, task), delta(before, task)), task


def test_a_merge_of_a_chained_checkpoint_writes_one_without_chains(chained, tmp_path):
    (*_, c3), _ = chained
    ckpt = Checkpoint(c3)
    merge([CheckpointTask(ckpt, t) for t in ckpt.tasks], tmp_path / "m.safetensors", ConsolidationConfig(k=100))
    merged = Checkpoint(tmp_path / "m.safetensors")
    assert merged.manifest["format_version"] == 2
    assert not any(name.endswith("chain_rows") for name in merged.manifest["tensors"])
    for task in ckpt.tasks:
        assert rel(delta(merged, task), delta(ckpt, task)) < 1e-5, task


@pytest.mark.parametrize("how", ["k changes", "a task is replaced"])
def test_the_rows_are_written_again_without_a_chain_when_they_cannot_stay(chained, tmp_path, how):
    (_, c1, *_), new = chained
    out = tmp_path / "out.safetensors"
    if how == "k changes":
        add(c1, [new[1]], out, ConsolidationConfig(k=5))
    else:
        add(c1, open_adapters([f"s0-2={new[1].origin}"]), out, K4, replace=True)
    before, after = Checkpoint(c1), Checkpoint(out)
    assert after.manifest["format_version"] == 2
    for task in after.tasks:
        if task in before.tasks and task != "s0-2":
            rec = after.modules[MODULE]["tasks"][task]
            measured = float(torch.linalg.norm(delta(before, task) - delta(after, task))) / rec["norm"]
            assert rec["drift"] == pytest.approx(measured, rel=1e-5, abs=1e-7), task


def test_appending_to_a_tensor_with_block_checksums_keeps_its_blocks(tmp_path):
    # 40 rank-8 tasks in k = 64 bases: 320 rows of 64 float32 = 80 KiB, so the rows carry block checksums
    config = ConsolidationConfig(k=64)
    old, new = (
        adapters(tmp_path / "o", 40, seed=0, n=96, d=96, r=8),
        adapters(tmp_path / "n", 1, seed=99, n=96, d=96, r=8),
    )
    merge(old, tmp_path / "c.safetensors", config)
    add(tmp_path / "c.safetensors", new, tmp_path / "c2.safetensors", config)
    before, after = Checkpoint(tmp_path / "c.safetensors"), Checkpoint(tmp_path / "c2.safetensors")
    name = f"modules/{MODULE}/coefs_B"
    old_blocks, new_blocks = before.manifest["blocks"][name], after.manifest["blocks"][name]
    whole = before.tensor_meta(name)[0][0] // old_blocks["rows"]
    assert whole >= 16 and new_blocks["rows"] == old_blocks["rows"]
    assert new_blocks["sha256"][:whole] == old_blocks["sha256"][:whole]
    after.verify_all()
    for task in ["s0-0", new[0].task]:
        assert after.task_tensors(task, MODULE)["coef_B"].shape == (64, 8)


@pytest.mark.parametrize("k_B, k_A, r", [(4, 4, 2), (40, 30, 2)])  # through the cores, and through r × r blocks
def test_quadratic_forms_of_the_shared_parts_match_their_definition(k_B, k_A, r):
    g = torch.Generator().manual_seed(0)
    XB, XA = (
        torch.randn(5, k_B, r, generator=g, dtype=torch.float64),
        torch.randn(5, k_A, r, generator=g, dtype=torch.float64),
    )
    G, H = (
        torch.randn(k_B, k_B, generator=g, dtype=torch.float64),
        torch.randn(k_A, k_A, generator=g, dtype=torch.float64),
    )
    G, H = G + G.T, H + H.T
    got = quadratic_form(XB, XA, [(1.0, None, None), (-2.0, G, H)])
    want = [
        torch.trace(XB[t].T @ XB[t] @ XA[t].T @ XA[t]) - 2 * torch.trace(XB[t].T @ G @ XB[t] @ XA[t].T @ H @ XA[t])
        for t in range(5)
    ]
    assert torch.allclose(got, torch.stack(want))
