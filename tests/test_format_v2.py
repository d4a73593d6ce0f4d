"""Format version 2: stacked per-module tensors, record tables, block checksums; version 1 stays readable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from share_convert import ConsolidationConfig
from share_convert.checkpoint import Checkpoint, CheckpointFiles, verify_checkpoint
from share_convert.engine import add, merge
from share_convert.errors import CorruptCheckpointError
from share_convert.io import checkpoint_tasks, extract, open_adapters, write_synthetic_adapters

V1 = Path(__file__).parent / "data" / "v1"
V1_FILES = sorted(V1.glob("*.safetensors"))


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> tuple[Path, list[Path]]:
    """40 synthetic adapters (4 modules) merged with private corrections: big enough for block checksums."""
    folder = tmp_path_factory.mktemp("many")
    paths = write_synthetic_adapters(folder / "a", count=40, layers=2, hidden=256, rank=4, shared_rank=4, noise=0.3)
    out = folder / "c.safetensors"
    merge(open_adapters([str(p) for p in paths]), out, ConsolidationConfig(k=4, private_rank=2), workers=1)
    return out, paths


def _tensor_names(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_the_number_of_tensors_does_not_grow_with_the_tasks(tmp_path):
    paths = write_synthetic_adapters(tmp_path / "a", count=12, layers=2, hidden=32, rank=4, noise=0.3)
    config = ConsolidationConfig(k=4, private_rank=1)
    merge(open_adapters([str(p) for p in paths[:3]]), tmp_path / "few.safetensors", config)
    merge(open_adapters([str(p) for p in paths]), tmp_path / "all.safetensors", config)
    assert len(_tensor_names(tmp_path / "few.safetensors")) == len(_tensor_names(tmp_path / "all.safetensors"))


def test_the_manifest_holds_no_per_task_per_module_records(many):
    path, _ = many
    ckpt = Checkpoint(path)
    assert ckpt.manifest["format_version"] == 2  # no rotation chains: version 2 (FORMAT_VERSION is the highest read)
    assert all("tasks" not in entry for entry in ckpt.manifest["modules"].values())
    text = json.dumps(ckpt.manifest["modules"])
    assert all(t not in text for t in ckpt.tasks)


def test_any_safetensors_reader_opens_a_version_2_checkpoint(many):
    path, _ = many
    tensors = load_file(str(path))
    assert {"records/int", "records/float"} <= set(tensors)
    assert tensors["records/int"].shape[:2] == (40, 4)


def test_module_records_read_back_as_written(many):
    path, _ = many
    ckpt = Checkpoint(path)
    for info in ckpt.modules.values():
        assert list(info["tasks"]) == list(ckpt.tasks)
        for rec in info["tasks"].values():
            assert rec["rank"] == 4 and rec["private_rank"] == 2 and rec["original_rank"] == 4
            assert 0 < rec["error"] < 1 and rec["norm"] > 0


def test_a_task_read_from_the_stacked_tensors_equals_its_records(many):
    path, _ = many
    ckpt = Checkpoint(path)
    for module, info in ckpt.modules.items():
        for task in ("task-000", "task-039"):
            parts = ckpt.task_tensors(task, module)
            assert parts["coef_B"].shape == (info["k_B"], 4) and parts["coef_A"].shape == (info["k_A"], 4)
            assert parts["private_B"].shape == (info["out_features"], 2)
            assert parts["private_A"].shape == (2, info["in_features"])


def test_extracting_one_task_reads_a_small_part_of_the_file(many, tmp_path, monkeypatch):
    path, _ = many
    read = []
    original = CheckpointFiles.read_bytes

    def counting(self, name, begin, end):
        read.append(end - begin)
        return original(self, name, begin, end)

    monkeypatch.setattr(CheckpointFiles, "read_bytes", counting)
    extract(path, "task-017", tmp_path / "out")
    assert 0 < sum(read) < path.stat().st_size / 4


def test_a_flipped_byte_in_one_block_is_found_when_that_block_is_read(many, tmp_path):
    path, _ = many
    bad = tmp_path / "bad.safetensors"
    shutil.copy(path, bad)
    ckpt = Checkpoint(bad)
    name = "modules/base_model.model.model.layers.0.self_attn.q_proj/private_B"
    assert name in ckpt.manifest["blocks"]  # large enough for a checksum per block of rows
    data, start, header = ckpt.store.files.mapped()
    offset = start + header[name]["data_offsets"][1] - 3  # inside the last rows: the last task's
    ckpt.close()
    raw = bytearray(bad.read_bytes())
    raw[offset] ^= 0xFF
    bad.write_bytes(bytes(raw))
    ckpt = Checkpoint(bad)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    ckpt.task_tensors("task-000", module)  # its rows lie in an intact block
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        ckpt.task_tensors("task-039", module)
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        verify_checkpoint(Checkpoint(bad))


@pytest.mark.parametrize("path", V1_FILES, ids=[p.stem for p in V1_FILES])
def test_version_1_checkpoints_stay_readable(path, tmp_path):
    ckpt = Checkpoint(path)
    assert ckpt.version == 1
    verify_checkpoint(ckpt)
    for task in ckpt.tasks:
        extract(ckpt, task, tmp_path / task)
        assert (tmp_path / task / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("name", ["plain", "groups", "mixed"])
def test_add_on_a_version_1_checkpoint_writes_version_2_and_keeps_the_old_tasks(name, tmp_path):
    old = Checkpoint(V1 / f"{name}.safetensors")
    new_adapter = V1 / "adapters" / "new-000"
    add(old, open_adapters([f"extra={new_adapter}"]), tmp_path / "c.safetensors")
    ckpt = Checkpoint(tmp_path / "c.safetensors")
    assert ckpt.version == 2 and "extra" in ckpt.tasks
    verify_checkpoint(ckpt)
    for module, info in old.modules.items():
        for task, rec in info["tasks"].items():
            after = ckpt.modules[module]["tasks"][task]
            Bb, Ab = old.reconstruction(task, module)
            Ba, Aa = ckpt.reconstruction(task, module)
            change = torch.linalg.norm(Bb @ Ab.T - Ba @ Aa.T) / rec["norm"]
            assert float(change) <= after["drift"] + 1e-5  # what moved is what the drift reports


def test_merge_of_a_version_1_checkpoint_writes_version_2_with_the_same_tasks(tmp_path):
    old = Checkpoint(V1 / "mixed.safetensors")
    merge(checkpoint_tasks(old), tmp_path / "c.safetensors", ConsolidationConfig(k=8, private_rank=2))
    ckpt = Checkpoint(tmp_path / "c.safetensors")
    assert ckpt.version == 2 and list(ckpt.tasks) == list(old.tasks)
    verify_checkpoint(ckpt)


def test_the_history_of_a_version_2_checkpoint_grows_with_operations_not_tasks(many, tmp_path):
    path, paths = many
    extra = write_synthetic_adapters(tmp_path / "x", count=1, layers=2, hidden=256, rank=4, seed=5, prefix="x")
    add(path, open_adapters([str(extra[0])]), tmp_path / "c.safetensors")
    ckpt = Checkpoint(tmp_path / "c.safetensors")
    stored = ckpt.manifest["history"]
    assert [h["op"] for h in stored] == ["merge", "add"]
    assert list(stored[-1]["errors"]) == ["x-000"] and "drift" not in stored[-1]
    last = ckpt.history[-1]  # completed from the record tables
    assert set(last["errors"]) == set(ckpt.tasks)
    assert set(last["drift"]) == {p.name for p in paths}
