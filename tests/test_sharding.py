"""Checkpoints above a size written in shards with an index, in the Hugging Face convention (issue 12).

Small synthetic adapters merged with a small ``max_shard_size`` stand for a checkpoint too large
for one file; every command runs on them through the CLI in this process, and each result is
compared with the same work on the single-file checkpoint of the same inputs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from share_convert import ConsolidationConfig, ShareModel
from share_convert.checkpoint import Checkpoint, is_checkpoint, parse_size
from share_convert.cli import app
from share_convert.engine import add, chain, merge
from share_convert.errors import CorruptCheckpointError, InvalidOptionError
from share_convert.files import CRASH_AT
from share_convert.io import open_adapters, write_synthetic_adapters

from .builders.adapters import random_factors, write_adapter

runner = CliRunner()
CONFIG = ["--k", "4", "--private-rank", "1"]
SHARD = "10KB"  # the test checkpoint's tensors take about 37 KB: three or four shards


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


def shard_names(path: Path) -> list[Path]:
    """The shards a checkpoint's index names, in order."""
    index = json.loads((path.parent / f"{path.name}.index.json").read_text())
    return [path.parent / name for name in sorted(set(index["weight_map"].values()))]


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


def tensors_of(path: Path) -> dict[str, bytes]:
    """Every tensor of a checkpoint (single file or sharded), as stored."""
    ckpt = Checkpoint(path)
    return {name: ckpt.raw(name)[2] for name in ckpt.manifest["tensors"]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Six adapters (two layers, q and v, 64 × 64) in ``a``, two more in ``b`` (read-only)."""
    root = tmp_path_factory.mktemp("shard-inputs")
    write_synthetic_adapters(root / "a", count=6, layers=2, hidden=64, rank=4, noise=0.3)
    write_synthetic_adapters(root / "b", count=2, layers=2, hidden=64, rank=4, noise=0.3, seed=7, prefix="new")
    return root


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "share.safetensors"
    ok("merge", inputs / "a", *CONFIG, "-o", out)
    return out


@pytest.fixture(scope="module")
def sharded(inputs, tmp_path_factory) -> Path:
    """The same merge in shards: ``share-0000i-of-0000N.safetensors`` and ``share.safetensors.index.json``."""
    out = tmp_path_factory.mktemp("sharded") / "share.safetensors"
    ok("merge", inputs / "a", *CONFIG, "-o", out, "--max-shard-size", SHARD)
    return out


def copy_of(path: Path, folder: Path) -> Path:
    """A copy of a checkpoint's folder (the tests that change files work on it)."""
    shutil.copytree(path.parent, folder)
    return folder / path.name


# -- the option -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, size",
    [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1.5KB", 1500), ("123", 123), (77, 77)],
)
def test_sizes_are_read_as_huggingface_writes_them(text, size):
    assert parse_size(text) == size


def test_a_size_of_any_length_is_read_exactly():
    assert parse_size("9" * 400 + "KB") == (10**400 - 1) * 1000


@pytest.mark.parametrize("text", ["5XB", "", "GB", "-1", "0", "1e9"])
def test_a_bad_size_is_refused_by_the_api(text):
    with pytest.raises(InvalidOptionError):
        parse_size(text)


def test_a_bad_size_is_one_line_and_nothing_is_written(inputs, tmp_path):
    line = one_error_line(run("merge", inputs / "a", "-o", tmp_path / "x.safetensors", "--max-shard-size", "5XB"))
    assert "'5XB' is not a size" in line
    assert files(tmp_path) == []


# -- below the size: one file, as always; above: shards and an index ---------------------------------------------


def test_below_the_size_the_single_file_is_what_an_unlimited_write_gives(inputs, single, tmp_path):
    ok("merge", inputs / "a", *CONFIG, "-o", tmp_path / "share.safetensors", "--max-shard-size", "1TB")
    assert files(tmp_path) == ["share.safetensors"]
    assert (tmp_path / "share.safetensors").read_bytes() == single.read_bytes()


def test_above_the_size_shards_and_an_index_are_written_in_the_huggingface_convention(sharded):
    names = files(sharded.parent)
    index = json.loads((sharded.parent / "share.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n >= 3 and shards == [f"share-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert names == sorted([*shards, "share.safetensors.index.json"])
    sizes = {}
    for shard in shards:  # any safetensors reader opens every shard, and the index maps each tensor to it
        with safe_open(str(sharded.parent / shard), framework="pt") as f:
            assert f.metadata()["format"] == "pt"
            assert sorted(f.keys()) == sorted(t for t, s in index["weight_map"].items() if s == shard)
            sizes[shard] = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())
    assert index["metadata"]["total_size"] == sum(sizes.values())
    # no shard above the size, unless it holds a single larger tensor
    assert all(size <= 10_000 or len([s for s in index["weight_map"].values() if s == shard]) == 1
               for shard, size in sizes.items())  # fmt: skip


def test_shards_hold_the_single_files_tensors_and_manifest(single, sharded):
    assert tensors_of(sharded) == tensors_of(single)
    with safe_open(str(single), framework="pt") as f:
        manifest = f.metadata()["share_convert"]
    assert Checkpoint(sharded).manifest == json.loads(manifest)
    index = json.loads((sharded.parent / "share.safetensors.index.json").read_text())
    assert index["metadata"]["share_convert"] == manifest


def test_transformers_finds_every_shard_and_tensor_through_the_index(single, sharded):
    from transformers.utils.hub import get_checkpoint_shard_files

    index = sharded.parent / "share.safetensors.index.json"
    shards, metadata = get_checkpoint_shard_files(str(sharded.parent), str(index))
    loaded = {}
    for shard in shards:  # as transformers loads a sharded checkpoint: each file it names, whole
        with safe_open(shard, framework="pt") as f:
            loaded.update({k: f.get_tensor(k) for k in f.keys()})
    assert sorted(loaded) == sorted(metadata["all_checkpoint_keys"])
    with safe_open(str(single), framework="pt") as whole:
        assert sorted(whole.keys()) == sorted(loaded)
        assert all(torch.equal(loaded[k], whole.get_tensor(k)) for k in whole.keys())


def test_the_same_input_writes_the_same_shards_byte_for_byte(inputs, sharded, tmp_path):
    ok("merge", inputs / "a", *CONFIG, "-o", tmp_path / "share.safetensors", "--max-shard-size", SHARD)
    assert files(tmp_path) == files(sharded.parent)
    for name in files(tmp_path):
        assert (tmp_path / name).read_bytes() == (sharded.parent / name).read_bytes(), name


def test_shards_copied_through_a_buffer_are_the_same_bytes(inputs, sharded, tmp_path, monkeypatch):
    monkeypatch.delattr(os, "copy_file_range", raising=False)  # as on a system without it
    ok("merge", inputs / "a", *CONFIG, "-o", tmp_path / "share.safetensors", "--max-shard-size", SHARD)
    for name in files(sharded.parent):
        assert (tmp_path / name).read_bytes() == (sharded.parent / name).read_bytes(), name


def test_a_tensor_larger_than_the_size_gets_a_shard_of_its_own(inputs, single, tmp_path):
    ok("merge", inputs / "a", *CONFIG, "-o", tmp_path / "share.safetensors", "--max-shard-size", "1")
    index = json.loads((tmp_path / "share.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(index["weight_map"])
    assert tensors_of(tmp_path / "share.safetensors") == tensors_of(single)


# -- reading -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["output", "index", "folder"])
def test_a_sharded_checkpoint_opens_from_the_output_name_its_index_or_its_folder(sharded, given):
    path = {"output": sharded, "index": sharded.parent / "share.safetensors.index.json", "folder": sharded.parent}
    ckpt = Checkpoint(path[given])
    assert ckpt.sharded and ckpt.path.name == "share.safetensors.index.json"
    ckpt.verify_all()


def test_a_folder_with_two_indexes_is_refused(sharded, tmp_path):
    folder = copy_of(sharded, tmp_path / "c").parent
    shutil.copy(folder / "share.safetensors.index.json", folder / "other.safetensors.index.json")
    with pytest.raises(CorruptCheckpointError, match="2 shard indexes"):
        Checkpoint(folder)


def test_the_index_is_a_checkpoint_and_a_shard_is_not(sharded):
    assert is_checkpoint(sharded.parent / "share.safetensors.index.json")
    assert not is_checkpoint(shard_names(sharded)[0])


# -- every command -----------------------------------------------------------------------------------------------


def test_info_tasks_and_verify_work_on_a_sharded_checkpoint(single, sharded):
    assert ok("tasks", sharded).output == ok("tasks", single).output
    verified = ok("verify", sharded).output
    assert "verified in" in verified and "shards" in verified
    info, whole = json.loads(ok("info", sharded, "--json").output), json.loads(ok("info", single, "--json").output)
    assert info["tasks"] == whole["tasks"] and info["totals"]["ratio"] == whole["totals"]["ratio"]
    on_disk = sum((sharded.parent / n).stat().st_size for n in files(sharded.parent))
    assert info["totals"]["checkpoint_file_bytes"] == on_disk


def test_extract_from_shards_gives_the_same_adapter(single, sharded, tmp_path):
    ok("extract", sharded, "--task", "task-002", "-o", tmp_path / "s")
    ok("extract", single, "--task", "task-002", "-o", tmp_path / "w")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "s" / name).read_bytes() == (tmp_path / "w" / name).read_bytes()


def test_add_and_remove_of_a_sharded_checkpoint_write_what_they_write_from_one_file(inputs, single, sharded, tmp_path):
    ok("add", sharded, inputs / "b", "-o", tmp_path / "s.safetensors")
    ok("add", single, inputs / "b", "-o", tmp_path / "w.safetensors")
    assert (tmp_path / "s.safetensors").read_bytes() == (tmp_path / "w.safetensors").read_bytes()
    ok("remove", sharded, "--task", "task-001", "-o", tmp_path / "rs.safetensors")
    ok("remove", single, "--task", "task-001", "-o", tmp_path / "rw.safetensors")
    assert (tmp_path / "rs.safetensors").read_bytes() == (tmp_path / "rw.safetensors").read_bytes()


def test_add_in_place_keeps_a_checkpoint_sharded_with_the_option(inputs, sharded, tmp_path):
    path = copy_of(sharded, tmp_path / "c")
    ok("add", path, inputs / "b", "--in-place", "--max-shard-size", SHARD)
    ckpt = Checkpoint(path)
    assert ckpt.sharded and "new-000" in ckpt.tasks
    ok("verify", path)


def test_remove_refit_writes_shards_through_its_staging(sharded, tmp_path):
    path = copy_of(sharded, tmp_path / "c")
    ok("remove", path, "--task", "task-000", "--refit", "--force", "--in-place", "--max-shard-size", SHARD)
    assert "task-000" not in Checkpoint(path).tasks and Checkpoint(path).sharded
    assert not [n for n in os.listdir(path.parent) if n.startswith(".")]  # no staging folder left
    ok("verify", path)


def test_a_sharded_checkpoint_is_an_input_of_merge_under_its_output_name(sharded, tmp_path):
    ok("merge", sharded, *CONFIG, "-o", tmp_path / "again.safetensors")
    assert list(Checkpoint(tmp_path / "again.safetensors").tasks) == list(Checkpoint(sharded).tasks)


def llama():
    """A two-layer Llama whose q_proj and v_proj (64 × 64) are the synthetic adapters' modules."""
    from .builders.models import llama

    return llama(vocab=100, positions=32)


@pytest.mark.parametrize("given", ["folder", "glob"])
def test_a_folder_or_glob_holding_a_sharded_checkpoint_gives_its_tasks_once(sharded, tmp_path, given):
    typed = sharded.parent if given == "folder" else f"{sharded.parent}/*.safetensors"
    ok("merge", typed, *CONFIG, "-o", tmp_path / "again.safetensors")
    assert list(Checkpoint(tmp_path / "again.safetensors").tasks) == list(Checkpoint(sharded).tasks)


def test_the_runtime_serves_a_sharded_checkpoint_as_the_single_file(single, sharded):
    model = llama
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ShareModel.from_checkpoint(model(), sharded)(input_ids=ids, task="task-003").logits
        b = ShareModel.from_checkpoint(model(), single)(input_ids=ids, task="task-003").logits
    assert torch.equal(a, b)


def test_a_task_trained_on_a_sharded_checkpoint_folds_into_shards(sharded, tmp_path):
    from share_convert.runtime import add_trainable_task

    model = ShareModel.from_checkpoint(llama(), sharded)
    task = add_trainable_task(model, "trained", rank=2)
    with torch.no_grad():  # as if trained: coefficients away from their start
        for i, p in enumerate(task.parameters()):
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    model.fold_into("trained", sharded, tmp_path / "folded.safetensors", max_shard_size=SHARD)
    folded = Checkpoint(tmp_path / "folded.safetensors")
    assert folded.sharded and "trained" in folded.tasks
    folded.verify_all()


@pytest.mark.parametrize("copy", ["kernel", "buffer"])
def test_an_add_from_shards_copies_the_old_blocks_as_from_one_file(tmp_path, monkeypatch, copy):
    # 40 rank-8 tasks in k = 64 bases: coefficient rows of 80 KiB, with block checksums, kept by a chain
    monkeypatch.setattr(chain, "CHAIN_MIN_BYTES", 0)
    if copy == "buffer":  # the old blocks read from the shard's map, as on a system without copy_file_range
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    paths = [
        write_adapter(tmp_path / f"o{i}", {"layers.0.q": random_factors(96, 96, 8, seed=i)}, r=8, alpha=8)
        for i in range(41)
    ]
    config = ConsolidationConfig(k=64)
    (tmp_path / "w").mkdir()
    (tmp_path / "s").mkdir()
    merge(open_adapters([str(p) for p in paths[:40]]), tmp_path / "w" / "c.safetensors", config)
    merge(open_adapters([str(p) for p in paths[:40]]), tmp_path / "s" / "c.safetensors", config, max_shard_size=40_000)
    source = Checkpoint(tmp_path / "s" / "c.safetensors")
    assert source.sharded and len(source.shard_paths) >= 3 and source.manifest["blocks"]
    new = open_adapters([str(paths[40])])
    add(tmp_path / "w" / "c.safetensors", new, tmp_path / "from-one.safetensors", config)
    add(source, new, tmp_path / "from-shards.safetensors", config)
    assert Checkpoint(tmp_path / "from-shards.safetensors").manifest["format_version"] == 3  # the rows were copied
    assert (tmp_path / "from-shards.safetensors").read_bytes() == (tmp_path / "from-one.safetensors").read_bytes()


# -- damaged shards: one clear line ------------------------------------------------------------------------------


def test_a_missing_shard_is_one_line(sharded, tmp_path):
    path = copy_of(sharded, tmp_path / "c")
    gone = shard_names(path)[1]
    gone.unlink()
    line = one_error_line(run("verify", path))
    assert f"shard {gone.name} named by the index is missing" in line
    assert "missing" in one_error_line(run("info", path))


def test_a_corrupt_shard_is_named_with_the_tensor(sharded, tmp_path):
    path = copy_of(sharded, tmp_path / "c")
    shard = shard_names(path)[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = one_error_line(run("verify", path))
    assert f"{shard.name}: checksum mismatch in tensor" in line


def test_an_extra_shard_beside_the_index_is_reported_by_verify(sharded, tmp_path):
    path = copy_of(sharded, tmp_path / "c")
    shutil.copy(shard_names(path)[0], path.parent / "share-00001-of-00009.safetensors")
    line = one_error_line(run("verify", path))
    assert "shard share-00001-of-00009.safetensors is not in the index" in line


def test_a_shard_of_another_checkpoint_is_refused(inputs, sharded, tmp_path):
    path = copy_of(sharded, tmp_path / "c")
    (tmp_path / "other").mkdir()
    other = tmp_path / "other" / "share.safetensors"
    ok("merge", inputs / "a", "--k", "3", "--private-rank", "1", "-o", other, "--max-shard-size", "5KB")
    shutil.copy(shard_names(other)[0], shard_names(path)[0])
    assert "belongs to another checkpoint" in one_error_line(run("tasks", path))


@pytest.mark.parametrize(
    "index, needle",
    [
        ("not json", "not a readable shard index"),
        ('{"metadata": {}, "weight_map": []}', "is not a shard index"),
        ('{"metadata": {"share_convert": "{}"}, "weight_map": {"x": "../etc.safetensors"}}', "not a file name"),
        ('{"metadata": {"total_size": 1}, "weight_map": {"x": "m-00001-of-00001.safetensors"}}', "not of a Share"),
    ],
)
def test_a_bad_index_is_one_line(tmp_path, index, needle):
    (tmp_path / "m.safetensors.index.json").write_text(index)
    assert needle in one_error_line(run("info", tmp_path / "m.safetensors.index.json"))


# -- writing over a checkpoint: atomic, and nothing stale for a reader ------------------------------------------


def test_shards_over_a_single_file_remove_it(inputs, single, tmp_path):
    path = copy_of(single, tmp_path / "c")
    ok("merge", inputs / "a", *CONFIG, "-o", path, "--max-shard-size", SHARD, "--force")
    assert "share.safetensors" not in files(path.parent)
    assert Checkpoint(path).sharded


def test_a_single_file_over_shards_removes_the_index_and_every_shard(inputs, sharded, tmp_path):
    path = copy_of(sharded, tmp_path / "c")
    ok("merge", inputs / "a", *CONFIG, "-o", path, "--force")
    assert files(path.parent) == ["share.safetensors"]
    assert not Checkpoint(path.parent / "share.safetensors.index.json").sharded  # the name now opens the file


def test_fewer_shards_over_more_leave_none_of_the_old_ones(inputs, sharded, tmp_path):
    path = copy_of(sharded, tmp_path / "c")
    ok("merge", inputs / "a", *CONFIG, "-o", path, "--max-shard-size", "20KB", "--force")
    index = json.loads((path.parent / "share.safetensors.index.json").read_text())
    assert files(path.parent) == sorted([*set(index["weight_map"].values()), "share.safetensors.index.json"])
    ok("verify", path)


def test_an_existing_sharded_output_needs_force(inputs, sharded, tmp_path):
    path = copy_of(sharded, tmp_path / "c")
    line = one_error_line(run("merge", inputs / "a", "-o", path))
    assert "share.safetensors.index.json: already exists" in line


@pytest.mark.parametrize(
    "step, published",
    [
        ("checkpoint.header-written", False),
        ("checkpoint.file-synced", False),  # every shard and the index written, nothing renamed yet
        ("checkpoint.shard-published", False),  # one shard in place, the index not yet
        ("checkpoint.published", True),  # the index in place, the old single file not yet removed
    ],
)
def test_sigkill_inside_a_sharded_write_leaves_the_old_checkpoint_or_the_new_one(
    inputs, single, tmp_path, step, published
):
    path = copy_of(single, tmp_path / "c")
    args = ["merge", str(inputs / "a"), *CONFIG, "-o", str(path), "--max-shard-size", SHARD, "--force"]
    killed = subprocess.run(
        [sys.executable, "-m", "share_convert.cli", *args], env={**os.environ, CRASH_AT: step}, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # the name given to -o opens a whole checkpoint: the old file until the index and the old file's removal
    if published:
        Checkpoint(path.parent / "share.safetensors.index.json").verify_all()
    assert Checkpoint(path).manifest == Checkpoint(single).manifest
    Checkpoint(path).verify_all()
    ok(*args)  # the next write removes what the killed one left
    index = json.loads((path.parent / "share.safetensors.index.json").read_text())
    assert files(path.parent) == sorted([*set(index["weight_map"].values()), "share.safetensors.index.json"])


def test_the_single_file_is_the_layout_of_one_file_before_sharding(single, sharded):
    """The single file, rebuilt from the shards as the writer laid out one file before sharding
    existed (sorted compact header padded to 8 bytes, the data in the order written), byte for byte."""
    import struct

    with safe_open(str(single), framework="pt") as f:
        metadata = f.metadata()
    header, data = {"__metadata__": metadata}, b""
    for shard in shard_names(sharded):
        raw = shard.read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        entries = json.loads(raw[8 : 8 + size])
        del entries["__metadata__"]
        for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"]):
            begin, end = entry["data_offsets"]
            header[name] = dict(entry, data_offsets=[len(data) + begin, len(data) + end])
        data += raw[8 + size :]
    blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    assert struct.pack("<Q", len(blob)) + blob + data == single.read_bytes()


# -- the Hub -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """olah serving downloads and the upload server committing pushes, over the same repositories."""
    from .hub_servers import Olah, UploadServer

    olah = Olah(tmp_path_factory.mktemp("shard-olah"))
    uploads = UploadServer(olah.mirrors)
    yield olah, uploads
    uploads.stop()
    olah.stop()


def hub_cli(args, endpoint: str, home: Path):
    from .hub_servers import hub_env, hub_settings

    with hub_settings(hub_env(endpoint, home)):
        result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def repo_files(olah, repo: str) -> list[str]:
    listed = subprocess.run(
        ["git", "-C", str(olah.mirrors / "models" / repo), "ls-tree", "-r", "--name-only", "main"],
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(listed.stdout.split())


def test_push_then_pull_of_a_sharded_checkpoint_gives_the_same_files(hub, sharded, tmp_path):
    olah, uploads = hub
    pushed = hub_cli(["push", sharded, "ivy/sharded"], uploads.url, tmp_path / "h1")
    assert pushed.exit_code == 0, pushed.output
    shards = [p.name for p in shard_names(sharded)]
    expected = sorted([*shards, "share.safetensors.index.json", "share_config.json", "README.md", ".gitattributes"])
    assert [f for f in repo_files(olah, "ivy/sharded") if f != ".gitattributes"] == [
        f for f in expected if f != ".gitattributes"
    ]
    pulled = hub_cli(["pull", "ivy/sharded", "-o", tmp_path / "p"], olah.url, tmp_path / "h2")
    assert pulled.exit_code == 0, pulled.output
    for name in [*shards, "share.safetensors.index.json"]:
        assert (tmp_path / "p" / name).read_bytes() == (sharded.parent / name).read_bytes(), name
    assert json.loads((tmp_path / "p/share_config.json").read_text())["checkpoint"] == "share.safetensors.index.json"
    ok("verify", tmp_path / "p")


def test_a_hub_address_of_a_sharded_repository_works_wherever_a_path_does(hub, inputs, single, tmp_path):
    olah, uploads = hub
    local = tmp_path / "mine.safetensors"  # pushed as share.safetensors.index.json and share-*
    ok("merge", inputs / "a", *CONFIG, "-o", local, "--max-shard-size", SHARD)
    assert hub_cli(["push", local, "ivy/renamed"], uploads.url, tmp_path / "h1").exit_code == 0
    assert "share-00001-of-" in " ".join(repo_files(olah, "ivy/renamed"))
    info = hub_cli(["info", "hf://ivy/renamed", "--json"], olah.url, tmp_path / "h2")
    assert info.exit_code == 0, info.output
    ext = hub_cli(
        ["extract", "hf://ivy/renamed", "--task", "task-002", "-o", tmp_path / "x"], olah.url, tmp_path / "h2"
    )
    assert ext.exit_code == 0, ext.output
    ok("extract", single, "--task", "task-002", "-o", tmp_path / "w")
    assert (tmp_path / "x/adapter_model.safetensors").read_bytes() == (
        tmp_path / "w/adapter_model.safetensors"
    ).read_bytes()


def test_pushing_one_form_over_the_other_leaves_one_checkpoint_in_the_repository(hub, single, sharded, tmp_path):
    olah, uploads = hub
    assert hub_cli(["push", sharded, "ivy/both"], uploads.url, tmp_path / "h1").exit_code == 0
    assert hub_cli(["pull", "ivy/both", "-o", tmp_path / "p"], olah.url, tmp_path / "h2").exit_code == 0
    assert hub_cli(["push", single, "ivy/both"], uploads.url, tmp_path / "h1").exit_code == 0
    assert [f for f in repo_files(olah, "ivy/both") if f.endswith((".safetensors", ".index.json"))] == [
        "share.safetensors"
    ]
    again = hub_cli(["pull", "ivy/both", "-o", tmp_path / "p", "--force"], olah.url, tmp_path / "h3")
    assert again.exit_code == 0, again.output
    assert files(tmp_path / "p") == ["README.md", "share.safetensors", "share_config.json"]
    assert (tmp_path / "p/share.safetensors").read_bytes() == single.read_bytes()
    assert hub_cli(["push", sharded, "ivy/both"], uploads.url, tmp_path / "h1").exit_code == 0
    assert "share.safetensors" not in repo_files(olah, "ivy/both")


@pytest.fixture(scope="module")
def one_per_tensor(inputs, tmp_path_factory) -> Path:
    """The test merge with one tensor per shard (read-only)."""
    out = tmp_path_factory.mktemp("per-tensor") / "share.safetensors"
    ok("merge", inputs / "a", *CONFIG, "-o", out, "--max-shard-size", "1")
    return out


@pytest.mark.parametrize(
    "step, published",
    [
        ("checkpoint.previous-kept", False),  # the old index now names links to the old shards
        ("checkpoint.shard-published", False),  # a new shard has replaced an old one of the same name
        ("checkpoint.published", True),  # the new index in place, the links not yet removed
    ],
)
def test_sigkill_while_shards_replace_shards_of_the_same_names_leaves_a_whole_checkpoint(
    inputs, one_per_tensor, tmp_path, step, published
):
    path = copy_of(one_per_tensor, tmp_path / "c")
    before = Checkpoint(path).manifest
    # k = 3 instead of 4: other contents, the same tensors, so the same shard names
    args = ["merge", str(inputs / "a"), "--k", "3", "--private-rank", "1", "-o", str(path)]
    args += ["--max-shard-size", "1", "--force"]
    killed = subprocess.run(
        [sys.executable, "-m", "share_convert.cli", *args], env={**os.environ, CRASH_AT: step}, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    after = Checkpoint(path)
    after.verify_all()
    assert (after.manifest == before) != published
    ok(*args)
    index = json.loads((path.parent / "share.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(shard_names(one_per_tensor))
    assert files(path.parent) == sorted([*set(index["weight_map"].values()), "share.safetensors.index.json"])
    ok("verify", path)
