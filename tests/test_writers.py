"""Writers of one checkpoint take turns, Ctrl-C says what is on disk, and every file follows the umask.

Concurrency and interruption are tested with real processes (a lock between processes, a real
SIGINT), paused or interrupted at named steps of a write (share_convert/atomic.py, crash_point).
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from share_convert.checkpoint import Checkpoint
from share_convert.cli import app
from share_convert.files import INTERRUPT_AT, PAUSE_AT, writing

from .builders.adapters import write_kohya


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def start(*args, env: dict[str, str] | None = None, stderr: Path | None = None) -> subprocess.Popen:
    """``share-convert ARGS`` as a real process (stderr to a file when given, to read while it runs)."""
    return subprocess.Popen(
        [sys.executable, "-m", "share_convert.cli", *map(str, args)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=stderr.open("w") if stderr else subprocess.PIPE,
        text=True,
    )


def until(condition, proc: subprocess.Popen, what: str, seconds: float = 180) -> None:
    """Wait until ``condition()`` holds, failing when ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {what} in {seconds} s"
        time.sleep(0.05)


def tasks(path: Path) -> list[str]:
    with Checkpoint(path) as ckpt:
        return list(ckpt.tasks)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def ckpt(small_adapters: list[Path], tmp_path: Path) -> Path:
    """A checkpoint of the first two small adapters, alone in its folder ``tmp_path/ckpt``."""
    out = tmp_path / "ckpt" / "share.safetensors"
    out.parent.mkdir()
    assert run("merge", *small_adapters[:2], "-o", out).exit_code == 0
    return out


# -- 1. writers of one checkpoint take turns -------------------------------------------------------


def test_two_in_place_adds_at_once_keep_both_tasks_and_the_second_says_it_waits(ckpt, small_adapters, tmp_path):
    gate = tmp_path / "gate"
    # the first has read the checkpoint and written its new one, and stops just before publishing it
    first = start("add", ckpt, small_adapters[2], "--in-place", env={PAUSE_AT: f"checkpoint.data-written:{gate}"})
    until(gate.with_name("gate.reached").exists, first, "the first add's pause")
    log = tmp_path / "second.err"
    second = start("add", ckpt, small_adapters[3], "--in-place", stderr=log)
    until(lambda: "waiting" in log.read_text() or second.poll() is not None, first, "the second add waiting or ending")
    gate.touch()
    assert first.wait(300) == 0, first.communicate()
    assert second.wait(300) == 0, log.read_text()
    assert sorted(tasks(ckpt)) == ["a0", "a1", "a2", "a3"]
    lines = log.read_text().splitlines()
    assert lines == [f"waiting for another share-convert writing {ckpt} (pid {first.pid})…"]
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["share.safetensors"]  # no lock file, no temporaries


@pytest.fixture
def sharded(small_adapters: list[Path], tmp_path: Path) -> Path:
    """The index of a checkpoint of the first two small adapters written in shards."""
    out = tmp_path / "sharded" / "share.safetensors"
    out.parent.mkdir()
    assert run("merge", *small_adapters[:2], "-o", out, "--max-shard-size", "256").exit_code == 0
    return out.with_name("share.safetensors.index.json")


WRITERS = {
    "add --in-place": lambda c, a, o: ["add", c, a[2], "--in-place"],
    "remove --in-place": lambda c, a, o: ["remove", c, "--task", "a0", "--in-place"],
    "combine --in-place": lambda c, a, o: ["combine", c, "--task", "mix", "--weights", "a0=1,a1=1", "--in-place"],
    "merge --force onto it": lambda c, a, o: ["merge", a[2], a[3], "-o", c, "--force"],
    "add -o onto it": lambda c, a, o: ["add", o, a[2], "-o", c, "--force"],
    "push": lambda c, a, o: ["push", c, "someone/repo"],
    "pull into its folder": lambda c, a, o: ["pull", "someone/repo", "-o", c.parent, "--force"],
}


@pytest.mark.parametrize("form", ["single file", "sharded"])
@pytest.mark.parametrize("writer", WRITERS)
def test_a_writer_with_no_wait_fails_at_once_while_another_writes_the_checkpoint(
    ckpt, sharded, small_adapters, writer, form
):
    target = ckpt if form == "single file" else sharded
    other = sharded if form == "single file" else ckpt
    files = {p: digest(p) for p in target.parent.iterdir()}
    with writing(target):  # another writer (this process), holding the lock on the checkpoint's name
        result = run(*WRITERS[writer](target, small_adapters, other), "--no-wait")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "another share-convert is writing it" in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert {p: digest(p) for p in target.parent.iterdir()} == files  # nothing written, no lock file left


# -- 2. Ctrl-C says what is on disk ----------------------------------------------------------------------


def test_ctrl_c_before_publishing_says_nothing_was_written_and_nothing_was(ckpt, small_adapters):
    before = digest(ckpt)
    proc = start("add", ckpt, small_adapters[2], "--in-place", env={INTERRUPT_AT: "checkpoint.file-synced"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert err.splitlines() == ["error: interrupted before anything was written"]
    assert digest(ckpt) == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["share.safetensors"]


@pytest.mark.parametrize(
    "form, step", [("single file", "checkpoint.published"), ("sharded", "checkpoint.shard-published")]
)
def test_ctrl_c_once_publishing_has_begun_says_the_new_checkpoint_is_in_place(
    ckpt, sharded, small_adapters, form, step
):
    target = ckpt if form == "single file" else sharded
    shards = ["--max-shard-size", "256"] if form == "sharded" else []
    proc = start("add", target, small_adapters[2], "--in-place", *shards, env={INTERRUPT_AT: step})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = err.splitlines()
    assert len(lines) == 1 and f"interrupted after writing {target}" in lines[0]
    assert "in place" in lines[0]
    assert sorted(tasks(target)) == ["a0", "a1", "a2"]  # the whole new checkpoint, publication not cut
    assert run("verify", target).exit_code == 0
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporaries, no lock


# -- 3. every file written follows the umask --------------------------------------------------------


def kohya_adapters(folder: Path) -> list[Path]:
    """Two tiny kohya text-to-image LoRAs (a UNet and a text-encoder module each)."""
    g = torch.Generator().manual_seed(0)
    meta = {"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"}
    paths = []
    for i in range(2):
        modules = {}
        for m in (
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        ):
            modules[m] = (torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g))
        paths.append(write_kohya(folder / f"k{i}.safetensors", modules, alpha=2.0, metadata=meta))
    return paths


def save_trained_task(ckpt: Path, out: Path) -> None:
    """A coefficient-only task added to a model of the small adapters' shapes, saved as a PEFT folder."""
    from torch import nn

    from share_convert import ShareModel

    layer = nn.Module()
    layer.q, layer.v = nn.Linear(12, 16), nn.Linear(12, 8)
    base = nn.Module()
    base.layers = nn.ModuleList([layer])
    model = ShareModel.from_checkpoint(base, ckpt)
    task = model.add_task("new")
    with torch.no_grad():  # a non-zero E_B stands for training: an untrained task is refused
        for m in task.layers.values():
            m.coef_B.fill_(0.01)
    model.save_task("new", out)


def write_everything(small: list[Path], ckpt: Path, out: Path) -> None:
    """Every writer, each into ``out``."""
    kohya = kohya_adapters(small[0].parent)
    t2i = out / "t2i.safetensors"
    commands = [
        ["merge", *small[:2], "-o", out / "merged.safetensors"],
        ["merge", *small[:2], "-o", out / "sharded.safetensors", "--max-shard-size", "256"],
        ["add", ckpt, small[2], "-o", out / "added.safetensors"],
        ["remove", ckpt, "--task", "a0", "--refit", "--force", "-o", out / "refit.safetensors"],
        ["combine", ckpt, "--task", "mix", "--weights", "a0=0.5,a1=0.5", "-o", out / "combined.safetensors"],
        ["extract", ckpt, "--task", "a0", "-o", out / "peft"],
        ["extract", ckpt, "--all", "-o", out / "all"],
        ["merge", *kohya, "-o", t2i],
        ["extract", t2i, "--task", "k0", "--format", "kohya", "-o", out / "k0.safetensors"],
        ["extract", t2i, "--task", "k0", "--format", "kohya", "-o", out / "kohya-folder"],
        ["extract", t2i, "--task", "k1", "--format", "diffusers", "-o", out / "diffusers"],
    ]
    for args in commands:
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)
    save_trained_task(ckpt, out / "trained")
    assert run("add", out / "added.safetensors", small[3], "--in-place").exit_code == 0  # replaces a file


@pytest.mark.parametrize("umask", [0o077, 0o002])
def test_every_file_written_follows_the_umask(ckpt, small_adapters, tmp_path, umask):
    out = tmp_path / "out"
    out.mkdir()
    old = os.umask(umask)
    try:
        write_everything(small_adapters, ckpt, out)
    finally:
        os.umask(old)
    wrong = {}
    for path in out.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode != (0o777 if path.is_dir() else 0o666) & ~umask:
            wrong[str(path.relative_to(out))] = oct(mode)
    assert not wrong
    assert len(list(out.glob("sharded-*-of-*.safetensors"))) > 1  # shards and their index were checked


@pytest.mark.parametrize("form", ["single file", "sharded"])
def test_a_checkpoint_updated_in_place_keeps_its_own_mode(ckpt, sharded, small_adapters, form):
    """A checkpoint the user made private stays private when another umask updates it, as ``cp`` keeps it."""
    target = ckpt if form == "single file" else sharded  # the single file, or the shards' index
    size = "5GB" if form == "single file" else "256"
    target.chmod(0o600)
    old = os.umask(0o022)
    try:
        assert run("add", target, small_adapters[3], "--in-place", "--max-shard-size", size).exit_code == 0
    finally:
        os.umask(old)
    written = [target, *target.parent.glob("share-*-of-*.safetensors")]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: "0o600" for p in written}
