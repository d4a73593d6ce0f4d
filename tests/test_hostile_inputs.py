"""A corpus of broken and hostile inputs, each run through the CLI.

Every case must give one clear line, a non-zero exit code, no output file, and leave every
other file untouched.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from share_convert.cli import app

from .builders.adapters import random_factors, write_adapter

GOOD = "gpt2-c_attn/winkitee__peft-lora-gpt2"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def copy_good(real: Path, dst: Path) -> Path:
    shutil.copytree(real / GOOD, dst)
    return dst


def st_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def write_st(path: Path, header: dict, body: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def lora(tmp: Path, name: str = "a", **kw) -> Path:
    return write_adapter(tmp / name, {"layers.0.q": random_factors(8, 6, 2, 0)}, **kw)


def case_truncated(tmp, real):
    p = copy_good(real, tmp / "t")
    data = (p / "adapter_model.safetensors").read_bytes()
    (p / "adapter_model.safetensors").write_bytes(data[: len(data) - 1000])
    return [p], "not a readable safetensors file"


def case_truncated_copy_of_a_good_adapter(tmp, real):
    # the same header as the good adapter before it (read once for both), but the file is shorter
    good = copy_good(real, tmp / "good")
    p = copy_good(real, tmp / "t")
    data = (p / "adapter_model.safetensors").read_bytes()
    (p / "adapter_model.safetensors").write_bytes(data[: len(data) - 1000])
    return [good, p], "not a readable safetensors file"


def case_config_rank_of_a_copy_disagrees(tmp, real):
    # the same header as the good adapter before it, with a config whose r disagrees with the weights
    good = copy_good(real, tmp / "good")
    p = copy_good(real, tmp / "t")
    config = json.loads((p / "adapter_config.json").read_text())
    config["r"] = config["r"] + 1
    (p / "adapter_config.json").write_text(json.dumps(config))
    return [good, p], "in the weights but r="


def case_offsets_past_end(tmp, real):
    p = copy_good(real, tmp / "t")
    header, body = st_header(p / "adapter_model.safetensors")
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10_000_000
    write_st(p / "adapter_model.safetensors", header, body)
    return [p], "not a readable safetensors file"


def _typed(tmp, dtype):
    A = torch.ones(2, 6, dtype=dtype)
    B = torch.ones(8, 2, dtype=dtype)
    return [write_adapter(tmp / "a", {"layers.0.q": (A, B)})], "dtype"


def case_integer_weights(tmp, real):
    return _typed(tmp, torch.int32)


def case_boolean_weights(tmp, real):
    return _typed(tmp, torch.bool)


def _nonfinite(tmp, value):
    A, B = random_factors(8, 6, 2, 0)
    A[0, 0] = value
    return [write_adapter(tmp / "a", {"layers.0.q": (A, B)})], "NaN or Inf"


def case_nan(tmp, real):
    return _nonfinite(tmp, float("nan"))


def case_inf(tmp, real):
    return _nonfinite(tmp, float("-inf"))


def case_zero_sized_tensor(tmp, real):
    return [
        write_adapter(tmp / "a", {"layers.0.q": (torch.zeros(0, 6), torch.zeros(8, 0))}, r=1)
    ], "not a non-empty matrix"


def case_lora_a_without_b(tmp, real):
    p = tmp / "a"
    p.mkdir()
    save_file({"base_model.model.layers.0.q.lora_A.weight": torch.ones(2, 6)}, str(p / "adapter_model.safetensors"))
    (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    return [p], "no lora_B weight"


def case_ranks_disagree(tmp, real):
    return [
        write_adapter(tmp / "a", {"layers.0.q": (torch.ones(2, 6), torch.ones(8, 3))})
    ], "lora_A has rank 2 but lora_B has rank 3"


def case_config_missing(tmp, real):
    p = copy_good(real, tmp / "t")
    (p / "adapter_config.json").unlink()
    return [p], "without adapter_config.json"


def case_config_not_json(tmp, real):
    p = copy_good(real, tmp / "t")
    (p / "adapter_config.json").write_text("{r: 8,")
    return [p], "not valid JSON"


def case_config_not_an_object(tmp, real):
    p = copy_good(real, tmp / "t")
    (p / "adapter_config.json").write_text("[1, 2]")
    return [p], "not a JSON object"


def case_ia3_config(tmp, real):
    return [lora(tmp, config={"peft_type": "IA3"})], "IA3 adapter"


def case_loha_config(tmp, real):
    return [lora(tmp, config={"peft_type": "LOHA"})], "LOHA adapter"


def case_dora_config(tmp, real):
    return [lora(tmp, config={"use_dora": True})], "DoRA"


def case_dora_magnitude_vector(tmp, real):
    p = lora(tmp)
    t = dict(torch.load if False else {})
    from safetensors.torch import load_file

    t = load_file(str(p / "adapter_model.safetensors"))
    t["base_model.model.layers.0.q.lora_magnitude_vector"] = torch.ones(8)
    save_file(t, str(p / "adapter_model.safetensors"))
    return [p], "DoRA adapters"


def case_embedding_lora(tmp, real):
    p = tmp / "a"
    p.mkdir()
    save_file(
        {
            "base_model.model.embed.lora_embedding_A": torch.ones(2, 50),
            "base_model.model.embed.lora_embedding_B": torch.ones(8, 2),
        },
        str(p / "adapter_model.safetensors"),
    )
    (p / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    return [p], "embedding LoRA"


def case_duplicate_task_names(tmp, real):
    return [lora(tmp / "x", "same"), lora(tmp / "y", "same")], "used by both"


def case_name_with_backslash(tmp, real):
    return [f"a\\b={lora(tmp)}"], "path separator"


def case_name_dotdot(tmp, real):
    return [f"..={lora(tmp)}"], "starts with '.'"


def case_name_control_chars(tmp, real):
    return [f"bad\x1bname={lora(tmp)}"], "control characters"


def case_name_too_long(tmp, real):
    return [f"{'n' * 300}={lora(tmp)}"], "characters long"


def case_empty_glob(tmp, real):
    return [str(tmp / "nothing" / "*.safetensors")], "no file matches"


def case_folder_without_adapter(tmp, real):
    (tmp / "empty").mkdir()
    (tmp / "empty" / "notes.txt").write_text("hi")
    return [tmp / "empty"], "holds no adapter"


def case_wrong_extension(tmp, real):
    (tmp / "weights.txt").write_text("hello")
    return [tmp / "weights.txt"], "not a .safetensors or .bin file"


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('EVIL_MARKER', '/tmp/share-convert-evil')}",))


def case_malicious_pickle(tmp, real):
    p = tmp / "evil"
    p.mkdir()
    with open(p / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.layers.0.q.lora_A.weight": Evil()}, f)
    shutil.copy(real / GOOD / "adapter_config.json", p / "adapter_config.json")
    return [p], "nothing in it was executed"


def case_random_bin(tmp, real):
    p = tmp / "b"
    p.mkdir()
    (p / "adapter_model.bin").write_bytes(os.urandom(4096))
    shutil.copy(real / GOOD / "adapter_config.json", p / "adapter_config.json")
    return [p], "cannot be loaded safely"


def case_symlink_loop(tmp, real):
    os.symlink(tmp / "loop2", tmp / "loop1")
    os.symlink(tmp / "loop1", tmp / "loop2")
    return [tmp / "loop1"], "loop1"


def case_gpt2_with_bert(tmp, real):
    return [real / "gpt2-c_attn", real / "bert-tiny"], "different base models"


def case_missing_path(tmp, real):
    return [tmp / "does-not-exist"], "no such file or folder"


CASES: dict[str, Callable] = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def test_the_corpus_has_at_least_25_cases():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_clear_line_and_touches_nothing(tmp_path, real, name, monkeypatch):
    marker = tmp_path.parent / f"evil-{tmp_path.name}"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    work = tmp_path / "in"
    work.mkdir()
    inputs, needle = CASES[name](work, real)
    before = snapshot(tmp_path)
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(app, ["merge", *map(str, inputs), "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert needle in lines[0], lines[0]
    assert not out.exists()
    assert snapshot(tmp_path) == before
    assert not marker.exists()


def test_a_malicious_pickle_does_not_run_in_a_real_process(tmp_path, real):
    marker = tmp_path / "pwned"
    (inputs, _) = case_malicious_pickle(tmp_path, real)
    env = {**os.environ, "EVIL_MARKER": str(marker)}
    proc = subprocess.run(
        [sys.executable, "-m", "share_convert.cli", "merge", str(inputs[0]), "-o", str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_an_unwritable_output_folder_fails_cleanly(tmp_path, real):
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = CliRunner().invoke(app, ["merge", str(real / GOOD), "-o", str(target / "out.safetensors")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert target.read_text() == "x"


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs where the machine allows mounting one; otherwise a file-size limit."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    ok = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode
        == 0
    )
    yield mnt, ok
    if ok:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_full_disk_fails_cleanly_and_leaves_nothing(tiny_disk, real):
    mnt, mounted = tiny_disk
    cmd = [
        sys.executable,
        "-m",
        "share_convert.cli",
        "merge",
        str(real / "gpt2-c_attn"),
        "-o",
        str(mnt / "out.safetensors"),
        "--k",
        "8",
    ]
    preexec = None
    if not mounted:  # simulate: the kernel refuses writes past 64 KiB (EFBIG), as a full disk would (ENOSPC)
        import resource

        def preexec():
            resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=preexec)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert ("No space left" in proc.stderr) or ("too large" in proc.stderr)
    assert list(mnt.iterdir()) == []
