"""Integrity, crash safety and determinism of what share-convert writes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from share_convert import ConsolidationConfig
from share_convert.checkpoint import Checkpoint, CheckpointWriter
from share_convert.cli import app
from share_convert.engine import merge
from share_convert.errors import CorruptCheckpointError
from share_convert.files import CRASH_AT
from share_convert.io import open_adapters, write_synthetic_adapters

runner = CliRunner()


@pytest.fixture
def ckpt(tmp_path, merged) -> Path:
    """This test's own copy of the session's checkpoint of the GPT-2 adapters (k = 6, private rank 1)."""
    out = tmp_path / "c.safetensors"
    shutil.copyfile(merged("gpt2-c_attn", k=6, private_rank=1), out)
    return out


def flip_byte(path: Path, where: int) -> None:
    data = bytearray(path.read_bytes())
    data[where] ^= 0x40
    path.write_bytes(bytes(data))


def data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


@pytest.mark.parametrize("command", ["info", "extract", "add", "verify"])
@pytest.mark.parametrize("region", ["data", "manifest"])
def test_a_flipped_byte_is_detected_with_a_clear_error(tmp_path, ckpt, real, command, region):
    size = ckpt.stat().st_size
    if region == "data":
        flip_byte(ckpt, (data_start(ckpt) + size) // 2)
    else:
        text = ckpt.read_bytes()[: data_start(ckpt)]
        flip_byte(ckpt, text.index(b"history") + 2)
    args = {
        "info": ["info", str(ckpt)],
        "extract": ["extract", str(ckpt), "--all", "-o", str(tmp_path / "x")],
        "add": [
            "add",
            str(ckpt),
            str(real / "gpt2-c_attn+c_proj/parikshit-06__legal"),
            "-o",
            str(tmp_path / "y.safetensors"),
        ],
        "verify": ["verify", str(ckpt)],
    }[command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and ("corrupt" in lines[0] or "checksum" in lines[0] or "not a readable" in lines[0]), lines
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.safetensors").exists()


def test_verify_accepts_a_good_checkpoint(ckpt):
    result = runner.invoke(app, ["verify", str(ckpt), "--json"])
    assert result.exit_code == 0 and json.loads(result.output)["ok"]


def rewrite(ckpt: Path, out: Path, change) -> None:
    """Re-save a checkpoint with one tensor changed but valid checksums (a logically broken file)."""
    c = Checkpoint(ckpt)
    manifest = {k: v for k, v in c.manifest.items() if k not in ("tensors", "blocks", "record_columns")}
    manifest["modules"] = {m: c.modules[m].copy() for m in c.modules}
    w = CheckpointWriter(out)
    for name in c.manifest["tensors"]:
        if not name.startswith("records/"):  # the writer makes the record tables from the manifest
            w.add(name, change(name, c.tensor(name)))
    for m, info in c.modules.items():
        records = info["tasks"]
        w.set_module_rows(m, records.tasks, records.int_column("coef_row"), records.int_column("private_row"))
    w.finish(manifest)


def test_verify_finds_a_basis_that_is_not_orthonormal(tmp_path, ckpt):
    rewrite(ckpt, tmp_path / "bad.safetensors", lambda n, t: t * 1.5 if n.endswith("basis_B") else t)
    result = runner.invoke(app, ["verify", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 2 and "not orthonormal" in result.output


def test_verify_finds_non_finite_values(tmp_path, ckpt):
    def poison(name, t):
        if name.endswith("coefs_B"):
            t = t.clone()
            t[0, 0] = float("nan")
        return t

    rewrite(ckpt, tmp_path / "bad.safetensors", poison)
    result = runner.invoke(app, ["verify", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 2 and "NaN or Inf" in result.output


def test_verify_finds_stored_errors_that_do_not_match_the_tensors(tmp_path, ckpt):
    rewrite(ckpt, tmp_path / "bad.safetensors", lambda n, t: t * 3 if n.endswith("coefs_B") else t)
    result = runner.invoke(app, ["verify", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 2 and "inconsistent with stored error" in result.output


def test_same_inputs_give_byte_identical_checkpoints_whatever_the_thread_count(tmp_path):
    """A merge on one thread (the CLI in this process, torch set to one thread) and a merge in a fresh
    process started with OMP_NUM_THREADS=2, as a user would set it, write the same bytes.

    The inputs take the randomized SVD path (640 columns) and are large enough that two threads split
    the sums differently: with the library's one-thread guard (math/linalg.deterministic) removed,
    the two files differ. Two runs suffice: anything else that varies from run to run (a clock, an
    unseeded random draw) makes them differ too.
    """
    import torch

    write_synthetic_adapters(
        tmp_path / "a", count=40, layers=1, hidden=256, rank=16, shared_rank=8
    )  # randomized SVD path
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = runner.invoke(app, ["merge", str(tmp_path / "a"), "-o", str(one)])
    finally:
        torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "share_convert.cli", "merge", str(tmp_path / "a"), "-o", str(two)],
        env=env,
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert one.read_bytes() == two.read_bytes()


def test_extraction_is_byte_identical_run_after_run(tmp_path, ckpt):
    runs = []
    for out in (tmp_path / "1", tmp_path / "2"):
        result = runner.invoke(app, ["extract", str(ckpt), "--all", "-o", str(out)])
        assert result.exit_code == 0, result.output
        runs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert runs[0] and any(name.suffix == ".safetensors" for name in runs[0])  # something was extracted
    assert runs[0] == runs[1]


# The steps of a write where a crash must leave the previous output whole and no partial one
# (share_convert.files.atomic.crash_point). The checkpoint writer's steps: a tensor written to the data
# file, all data written, the header written, the new file synced (just before the rename), and
# renamed into place (the data file not yet removed). A folder's: written, and swapped into place.
CHECKPOINT_STEPS = [
    "checkpoint.tensor-added",
    "checkpoint.data-written",
    "checkpoint.header-written",
    "checkpoint.file-synced",
    "checkpoint.published",
]
CRASH_CASES = [
    *[("merge", step) for step in CHECKPOINT_STEPS],
    # add writes through the same writer: mid-data, the last moment before the rename, and just after
    *[("add", step) for step in ("checkpoint.tensor-added", "checkpoint.file-synced", "checkpoint.published")],
    ("extract", "dir.written"),
    ("extract", "dir.published"),
]
PUBLISHED = ("checkpoint.published", "dir.published")  # steps after which the new output is in place


@pytest.fixture(scope="module")
def kill_inputs(tmp_path_factory):
    """Small adapters and a checkpoint of them: the kill is placed by a crash point, not by a timer."""
    root = tmp_path_factory.mktemp("kill")
    write_synthetic_adapters(root / "a", count=4, layers=2, hidden=32, rank=4, shared_rank=4)
    write_synthetic_adapters(root / "b", count=2, layers=2, hidden=32, rank=4, shared_rank=4, seed=7, prefix="new")
    merge(open_adapters([str(root / "a")]), root / "base.safetensors")
    return root


@pytest.mark.parametrize("command, step", CRASH_CASES)
def test_sigkill_inside_a_write_leaves_the_previous_output_or_the_whole_new_one(tmp_path, kill_inputs, command, step):
    target = tmp_path / ("out" if command == "extract" else "out.safetensors")
    if command == "extract":
        target.mkdir()
        (target / "adapter_model.safetensors").write_bytes(b"previous")
    else:
        target.write_bytes(b"previous version")
    args = {
        "merge": ["merge", str(kill_inputs / "a"), "-o", str(target), "--force"],
        "add": ["add", str(kill_inputs / "base.safetensors"), str(kill_inputs / "b"), "-o", str(target), "--force"],
        "extract": [
            "extract",
            str(kill_inputs / "base.safetensors"),
            "--task",
            "task-000",
            "-o",
            str(target),
            "--force",
        ],
    }[command]
    # a real process, killed by SIGKILL at the named step: nothing of it runs after that point
    killed = subprocess.run(
        [sys.executable, "-m", "share_convert.cli", *args],
        env={**os.environ, CRASH_AT: step},
        capture_output=True,
    )
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    if command == "extract":
        files = sorted(p.name for p in target.iterdir())
        if step in PUBLISHED:
            assert files == ["adapter_config.json", "adapter_model.safetensors"]
        else:  # the old folder, untouched
            assert files == ["adapter_model.safetensors"]
            assert (target / "adapter_model.safetensors").read_bytes() == b"previous"
    elif step in PUBLISHED:
        Checkpoint(target).verify_all()  # the new file is whole
    else:
        assert target.read_bytes() == b"previous version"
    # the next complete write removes what the killed one left beside the target
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")]


def test_reading_a_corrupt_checkpoint_as_an_input_is_refused(tmp_path, ckpt):
    flip_byte(ckpt, data_start(ckpt) + 10)
    with pytest.raises(CorruptCheckpointError):
        Checkpoint(ckpt).verify_all()


def test_a_checkpoint_replaced_after_opening_is_still_read_as_it_was(tmp_path, ckpt):
    opened = Checkpoint(ckpt)
    name = sorted(opened.manifest["tensors"])[0]
    ckpt.rename(tmp_path / "moved.safetensors")
    ckpt.write_bytes(b"not a checkpoint any more")
    data = opened.raw(name)[2]  # the bytes of the file it opened, not of what replaced it
    assert hashlib.sha256(data).hexdigest() == opened.manifest["tensors"][name]


def test_leftovers_of_a_dead_writer_are_removed_and_a_live_writers_kept(tmp_path, real):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = int(finished.stdout), os.getppid()
    out = tmp_path / "c.safetensors"
    stale = tmp_path / f".c.safetensors.{dead}.abcd1234.data.tmp"
    running = tmp_path / f".c.safetensors.{live}.efgh5678.tmp"
    other = tmp_path / ".c.safetensors.backup"
    for p in (stale, running, other):
        p.write_bytes(b"x")
    merge(open_adapters([str(real / "bert-tiny")]), out, ConsolidationConfig(k=2))
    assert not stale.exists() and running.exists() and other.exists()


def test_a_tensor_of_a_dtype_share_convert_never_writes_is_refused(tmp_path, ckpt):
    import torch
    from safetensors.torch import save_file

    from share_convert.checkpoint import MANIFEST_KEY, MANIFEST_SHA_KEY

    manifest = dict(Checkpoint(ckpt).manifest, format_version=1)  # version 1: no record tables to provide
    odd = torch.zeros(4, dtype=torch.float8_e4m3fn)
    name = "modules/x/basis_B"
    manifest["tensors"] = {name: hashlib.sha256(odd.view(torch.uint8).numpy().tobytes()).hexdigest()}
    text = json.dumps(manifest)
    path = tmp_path / "odd.safetensors"
    save_file(
        {name: odd},
        str(path),
        metadata={MANIFEST_KEY: text, MANIFEST_SHA_KEY: hashlib.sha256(text.encode()).hexdigest()},
    )
    with pytest.raises(CorruptCheckpointError, match="float8|F8_E4M3"):
        Checkpoint(path).tensor(name)


def test_a_checkpoint_reader_releases_its_file_when_closed(ckpt):
    with Checkpoint(ckpt) as opened:
        name = sorted(opened.manifest["tensors"])[0]
        opened.tensor(name)
    with pytest.raises(ValueError, match="closed"):
        opened.raw(name)
