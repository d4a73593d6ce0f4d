"""What a checkpoint records about where its tasks came from: a local input by its own name only,
an ``hf://`` address verbatim (the Hub side is in test_hub.py), and which recorded values look
like local paths (what ``push`` warns about)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from share_convert.checkpoint import Checkpoint
from share_convert.cli import app
from share_convert.io import local_path_values, looks_local, recorded_source

PAIR = ("gsj-rifat__tmp", "ShutterStack__peft_model")


def run(*args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def place(real: Path, folder: Path) -> Path:
    """Two real gpt2 adapters copied into ``folder``, one as a PEFT folder, one as a bare file with its config."""
    folder.mkdir(parents=True)
    shutil.copytree(real / "gpt2-c_attn" / PAIR[0], folder / PAIR[0])
    src = real / "gpt2-c_attn" / PAIR[1]
    shutil.copy(src / "adapter_model.safetensors", folder / f"{PAIR[1]}.safetensors")
    shutil.copy(src / "adapter_config.json", folder / f"{PAIR[1]}.json")
    return folder


def test_a_checkpoint_records_local_inputs_by_their_own_name_only(real, tmp_path):
    adapters = place(real, tmp_path / "home" / "alice" / "clients" / "acme" / "adapters")
    out = tmp_path / "share.safetensors"
    run("merge", adapters / PAIR[0], adapters / f"{PAIR[1]}.safetensors", "-o", out)
    tasks = Checkpoint(out).tasks
    assert {t: r["source"] for t, r in tasks.items()} == {PAIR[0]: PAIR[0], PAIR[1]: f"{PAIR[1]}.safetensors"}
    assert b"alice" not in out.read_bytes() and str(tmp_path).encode() not in out.read_bytes()


def test_the_same_adapters_merged_from_two_folders_give_byte_identical_checkpoints(real, tmp_path):
    a, b = place(real, tmp_path / "a" / "adapters"), place(real, tmp_path / "elsewhere" / "b")
    run("merge", a / PAIR[0], a / f"{PAIR[1]}.safetensors", "-o", tmp_path / "a.safetensors")
    run("merge", b / PAIR[0], b / f"{PAIR[1]}.safetensors", "-o", tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_tasks_taken_from_a_checkpoint_and_added_ones_record_names_only(real, tmp_path):
    adapters = place(real, tmp_path / "home" / "alice" / "adapters")
    first = tmp_path / "home" / "alice" / "first.safetensors"
    run("merge", adapters / PAIR[0], "-o", first)
    merged, added = tmp_path / "merged.safetensors", tmp_path / "added.safetensors"
    run("merge", first, adapters / f"{PAIR[1]}.safetensors", "-o", merged)
    run("add", first, adapters / f"{PAIR[1]}.safetensors", "-o", added)
    assert Checkpoint(merged).task(PAIR[0])["from_checkpoint"] == "first.safetensors"
    assert Checkpoint(added).task(PAIR[1])["source"] == f"{PAIR[1]}.safetensors"
    for out in (merged, added):
        assert b"alice" not in out.read_bytes()
        assert {
            t["task"] for t in json.loads(CliRunner().invoke(app, ["info", str(out), "--json"]).stdout)["tasks"]
        } == set(PAIR)


@pytest.mark.parametrize(
    "typed, recorded",
    [
        ("adapters/sst2", "sst2"),
        ("/home/alice/adapters/sst2/", "sst2"),
        ("x.safetensors", "x.safetensors"),
        ("C:\\Users\\alice\\sst2", "sst2"),
        ("hf://owner/name@v1/sub", "hf://owner/name@v1/sub"),
    ],
)
def test_what_is_recorded_for_what_was_typed(typed, recorded):
    assert recorded_source(typed) == recorded


@pytest.mark.parametrize(
    "value",
    ["/home/alice/llama", "~/models/llama", "./llama", "../llama", "C:\\models\\llama", "D:/llama", "\\\\srv\\m"],
)
def test_values_that_look_like_local_paths(value):
    assert looks_local(value)


@pytest.mark.parametrize("value", ["gpt2", "meta-llama/Llama-2-7b-hf", "hf://o/n", "LORA", "sst2"])
def test_values_that_do_not(value):
    assert not looks_local(value)


def test_a_model_name_that_is_a_folder_here_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama").mkdir()
    assert looks_local("llama", model_key=True) and not looks_local("llama")


def test_every_local_looking_value_of_the_task_records_is_listed_once_with_its_task_and_field():
    manifest = {
        "tasks": {
            "sst2": {"source": "sst2", "adapter_config": {"base_model_name_or_path": "/home/alice/llama"}},
            "art": {
                "source": "/old/version/art.safetensors",  # as versions before this one recorded it
                "t2i": {"metadata": {"ss_sd_model_name": "~/sd/v1-5.ckpt", "ss_dataset_dirs": '{"/data/x": {"n": 1}}'}},
            },
        },
        "modules": {"/not/scanned": {}},
    }
    found = [(v.task, v.field, v.value) for v in local_path_values(manifest)]
    assert found == [
        ("sst2", "adapter_config.base_model_name_or_path", "/home/alice/llama"),
        ("art", "source", "/old/version/art.safetensors"),
        ("art", "t2i.metadata.ss_sd_model_name", "~/sd/v1-5.ckpt"),
        ("art", "t2i.metadata.ss_dataset_dirs", "/data/x"),
    ]
