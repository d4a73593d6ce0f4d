"""Checkpoints whose manifest was made by hand, its checksum recomputed (issue 28, items 1 and 2).

A checkpoint travels (``pull``, ``hf://``, files passed around): every name and number its
manifest holds is untrusted. Each case here is refused by every command that reads it, in one
line, with nothing written anywhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from share_convert.checkpoint import Checkpoint
from share_convert.cli import app
from share_convert.errors import InvalidTaskNameError
from share_convert.names import path_under

from .manifest_tools import rename_task, rewrite_manifest, rewrite_record

runner = CliRunner()
COMMANDS = {
    "info": lambda ckpt, out: ["info", str(ckpt)],
    "tasks": lambda ckpt, out: ["tasks", str(ckpt)],
    "verify": lambda ckpt, out: ["verify", str(ckpt)],
    "extract --all": lambda ckpt, out: ["extract", str(ckpt), "--all", "-o", str(out)],
}


@pytest.fixture(scope="module")
def good(merged) -> Path:
    """A small real checkpoint (the bert-tiny adapter: one task with a classifier head)."""
    return merged("bert-tiny", k=4, private_rank=1)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refused_everywhere(tmp_path: Path, ckpt: Path, commands: tuple[str, ...] = tuple(COMMANDS)) -> list[str]:
    """Run every reading command (of ``commands``) on ``ckpt`` (which lies two folders below
    ``tmp_path``); each must exit 2 with one line and write nothing anywhere under ``tmp_path``.
    Returns the lines."""
    before = tree(tmp_path)
    lines = []
    for name in commands:
        args = COMMANDS[name]
        result = runner.invoke(app, args(ckpt, ckpt.parent / "out"))
        text = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(text) == 1 and text[0].startswith("error:"), (name, result.output)
        assert tree(tmp_path) == before, f"{name} wrote {sorted(tree(tmp_path) - before)}"
        lines.append(text[0])
    return lines


def hand_made(tmp_path: Path, good: Path, edit) -> Path:
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    path = folder / "c.safetensors"
    rewrite_manifest(good, path, edit)
    return path


@pytest.mark.parametrize(
    "name",
    ["../../escape", "{tmp}/abs", "a/b", "..", ".hidden", "", "x" * 101, "a\nb", "a\\b", " padded"],
)
def test_a_task_name_that_is_not_a_folder_name_is_refused_in_one_line(tmp_path, good, name):
    name = name.replace("{tmp}", str(tmp_path))
    task = next(iter(Checkpoint(good).tasks))
    path = hand_made(tmp_path, good, lambda m, h: rename_task(m, h, task, name))
    lines = refused_everywhere(tmp_path, path)
    assert all("names a task" in line for line in lines), lines
    assert not Path(str(tmp_path) + "/abs").exists()


@pytest.mark.parametrize("where", ["module", "head"])
def test_a_module_or_head_name_with_control_characters_is_refused(tmp_path, good, where):
    def edit(m, h):
        if where == "module":
            first = next(iter(m["modules"]))
            m["modules"] = {("bad\x1b[2Jname" if k == first else k): v for k, v in m["modules"].items()}
        else:
            task = next(iter(m["tasks"]))
            m["tasks"][task]["heads"][0] = "bad\x00key"

    lines = refused_everywhere(tmp_path, hand_made(tmp_path, good, edit))
    assert all(f"names a {where}" in line for line in lines), lines


def test_a_shard_index_naming_a_file_elsewhere_is_refused(tmp_path, good):
    index = tmp_path / "a" / "b" / "c.safetensors.index.json"
    index.parent.mkdir(parents=True)
    index.write_text('{"metadata": {"share_convert": "{}"}, "weight_map": {"x": "/etc/passwd"}}')
    assert all("not a file name" in line for line in refused_everywhere(tmp_path, index))


@pytest.mark.parametrize("name", ["..", "../x", "/abs", "a/b", "", ".", "a\\b", "a\0b"])
def test_a_writer_never_joins_a_name_that_leaves_its_folder(tmp_path, name):
    with pytest.raises(InvalidTaskNameError, match="outside"):
        path_under(tmp_path, name)


def test_a_writer_joins_a_plain_name_inside_its_folder(tmp_path):
    assert path_under(tmp_path, "task-1.safetensors") == tmp_path / "task-1.safetensors"


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda m, h: m.update(extra="@deep@"), "nested deeper"),
        (lambda m, h: m["config"].update(x="@deep70@"), "nested deeper"),
        (lambda m, h: m.update(extra="@long_int@"), "not valid JSON"),
        (lambda m, h: m["config"].update(target_error="@nan@"), "not valid JSON"),
        (lambda m, h: m["config"].update(target_error="@inf@"), "not valid JSON"),
    ],
    ids=["deep", "deep-70", "long-integer", "nan", "inf"],
)
def test_a_manifest_json_cannot_parse_safely_is_refused_in_one_line(tmp_path, good, edit, needle):
    lines = refused_everywhere(tmp_path, hand_made(tmp_path, good, edit))
    assert all(needle in line for line in lines), lines


def _module(m):
    return m["modules"][next(iter(m["modules"]))]


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m, h: _module(m).update(out_features=10**30), "out_features"),
        (lambda m, h: _module(m).update(in_features=-1), "in_features"),
        (lambda m, h: _module(m).update(k_B=1 << 40), "k_B"),
        (lambda m, h: _module(m).update(k_A="4"), "k_A"),
        (lambda m, h: _module(m).update(groups=[]), "groups"),
        (lambda m, h: m["blocks"].update(x={"rows": 0, "sha256": []}), "rows"),
        (lambda m, h: m.update(tasks=[]), "tasks"),
        (lambda m, h: m.update(format_version=True), "format version"),
        (lambda m, h: m.update(history={"op": "merge"}), "history"),
        (lambda m, h: m["history"][0].pop("op"), "history[0].op"),
    ],
    ids=[
        "huge-features",
        "negative-features",
        "huge-k",
        "k-as-text",
        "no-groups",
        "zero-rows",
        "tasks-list",
        "bool-version",
        "history-object",
        "history-without-op",
    ],
)
def test_absurd_sizes_and_wrong_types_are_refused_in_one_line(tmp_path, good, edit, field):
    lines = refused_everywhere(tmp_path, hand_made(tmp_path, good, edit))
    assert all(field in line for line in lines), lines


@pytest.mark.parametrize(
    "option, value", [("k", "abc"), ("weighting", {"x": 1}), ("groups", [1]), ("target_error", "0.05"), ("seed", True)]
)
def test_a_stored_option_of_the_wrong_type_is_refused_in_one_line(tmp_path, good, option, value):
    """The options a checkpoint stores are read back by ``add`` and ``remove``: their types are checked on open."""
    lines = refused_everywhere(tmp_path, hand_made(tmp_path, good, lambda m, h: m["config"].update({option: value})))
    assert all(f"config.{option}" in line for line in lines), lines


def test_an_update_refuses_stored_options_out_of_range_naming_the_checkpoint(tmp_path, good, real):
    ckpt = hand_made(tmp_path, good, lambda m, h: m["config"].update(target_error=-5))
    before = tree(tmp_path)
    result = runner.invoke(app, ["add", str(ckpt), str(real / "bert-tiny"), "-o", str(tmp_path / "new.safetensors")])
    text = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(text) == 1, result.output
    assert "options stored in the checkpoint" in text[0] and str(ckpt) in text[0]
    assert tree(tmp_path) == before


def test_the_manifest_size_is_bounded_before_parsing(tmp_path, good, monkeypatch):
    from share_convert.checkpoint import manifest

    path = hand_made(tmp_path, good, lambda m, h: None)
    monkeypatch.setattr(manifest, "MAX_MANIFEST_BYTES", 1000)  # a real checkpoint's manifest is longer
    assert all("at most 1000" in line for line in refused_everywhere(tmp_path, path))


def test_an_untouched_rewrite_still_reads(tmp_path, good):
    """The tools above change nothing by themselves: the same manifest rewritten reads and verifies."""
    path = hand_made(tmp_path, good, lambda m, h: None)
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 0, result.output
    shutil.rmtree(tmp_path / "a")


@pytest.mark.parametrize(
    ("column", "value"),
    [("rank", 10_000), ("private_rank", 10_000), ("coef_row", 10_000), ("coef_row", -3), ("private_row", 10_000)],
)
def test_a_record_pointing_outside_its_tensors_is_refused_in_one_line(tmp_path, good, column, value):
    """The record tables say where each task's rows lie in the stacked tensors: a rank or a first
    row beyond them (or before them) is refused before any tensor is reshaped by it."""
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    path = folder / "c.safetensors"
    rewrite_record(good, path, column, value)
    lines = refused_everywhere(tmp_path, path, ("info", "verify", "extract --all"))  # 'tasks' reads no records
    assert all("outside its module's tasks and tensors" in line for line in lines), lines


@pytest.fixture(scope="module")
def grouped(tmp_path_factory) -> Path:
    """A small checkpoint whose first module has two groups of bases."""
    from share_convert.engine import ConsolidationConfig, merge
    from share_convert.io import open_adapters, write_synthetic_adapters

    folder = tmp_path_factory.mktemp("grouped")
    for seed, prefix in ((1, "x"), (2, "y")):  # two families from two planted subspaces: one basis serves them badly
        write_synthetic_adapters(
            folder / "a", count=2, layers=1, hidden=48, rank=4, shared_rank=4, noise=0.001, seed=seed, prefix=prefix
        )
    out = folder / "g.safetensors"
    merge(
        open_adapters([str(folder / "a")]),
        out,
        ConsolidationConfig(target_error=0.02, groups="2", precision="float"),
        workers=1,
    )
    assert "groups" in next(iter(Checkpoint(out).modules.values()))
    return out


@pytest.mark.parametrize("value", [2, -2])
def test_a_record_naming_a_group_the_module_lacks_is_refused_in_one_line(tmp_path, grouped, value):
    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    path = folder / "c.safetensors"
    rewrite_record(grouped, path, "group", value)
    lines = refused_everywhere(tmp_path, path, ("info", "verify", "extract --all"))
    assert all("a group outside" in line for line in lines), lines


@pytest.fixture(scope="module")
def quantized(good, tmp_path_factory) -> Path:
    """The small real checkpoint with NF4 bases, int8 coefficients and bfloat16 private rows (format version 4)."""
    from .builders.quantized import MIXED, requantize

    return requantize(good, tmp_path_factory.mktemp("quantized") / "q.safetensors", MIXED)


def _precision(m):
    return _module(m)["precision"]


def _codes(m, h, role="basis_B"):
    """The first module's tensor of ``role`` in the header (``h``)."""
    return h[f"modules/{next(iter(m['modules']))}/{role}"]


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m, h: _module(m).update(precision=["nf4"]), "precision is not an object"),
        (lambda m, h: _precision(m).update(gram_B="int8"), "'gram_B' names no factor"),
        (lambda m, h: _precision(m).update(basis_B="int4"), "'basis_B' is 'int4', not one of"),
        (lambda m, h: _precision(m).update(basis_B=4), "'basis_B' is 4, not one of"),
        (lambda m, h: m.update(format_version=3), "is nf4 in a format version 3 file"),
    ],
    ids=["not-an-object", "unknown-role", "unknown-precision", "number", "codes-in-version-3"],
)
def test_a_malformed_precision_field_is_refused_in_one_line(tmp_path, quantized, edit, field):
    lines = refused_everywhere(tmp_path, hand_made(tmp_path, quantized, edit))
    assert all(field in line for line in lines), lines


def _rename_scales(m, h):
    name = next(k for k in h if k.endswith("/basis_B.scales"))
    h[name[:-1] + "z"] = h.pop(name)
    m["tensors"][name[:-1] + "z"] = m["tensors"].pop(name)


def _transpose(m, h):
    _codes(m, h)["shape"] = _codes(m, h)["shape"][::-1]


@pytest.mark.parametrize(
    "edit, needle",
    [
        (_transpose, "not the nf4 codes of a"),
        (lambda m, h: _codes(m, h).update(dtype="I8"), "holds I8"),
        (lambda m, h: _precision(m).update(basis_B="int8"), "not the int8 codes of a"),
        (lambda m, h: _precision(m).update(coefs_B="nf4"), "not the nf4 codes of a"),
        (lambda m, h: _codes(m, h, "coefs_B.scales").update(dtype="I32"), "has scales I32"),
        (_rename_scales, "has no scales"),
    ],
    ids=["transposed", "wrong-dtype", "int8-read-as-nf4", "nf4-read-as-int8", "scales-dtype", "no-scales"],
)
def test_codes_or_scales_that_disagree_with_the_manifest_are_refused_in_one_line(tmp_path, quantized, edit, needle):
    """The codes' and scales' shapes and dtypes follow from the module's shape and precision: a header
    that says otherwise is refused before a byte of them is read (so never read out of bounds)."""
    lines = refused_everywhere(tmp_path, hand_made(tmp_path, quantized, edit), ("info", "verify", "extract --all"))
    assert all(needle in line for line in lines), lines


def test_an_untouched_quantized_rewrite_still_reads(tmp_path, quantized):
    path = hand_made(tmp_path, quantized, lambda m, h: None)
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 0, result.output


def test_verify_refuses_a_float_factor_stored_in_another_dtype_than_its_module_says(tmp_path, quantized):
    """The bfloat16 private rows said to be float16: same bytes, other numbers; the other commands
    read what is stored, and verify says the two disagree."""
    path = hand_made(tmp_path, quantized, lambda m, h: _precision(m).update(private_B="float16"))
    result = runner.invoke(app, ["verify", str(path)])
    text = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(text) == 1 and "stores private_B as float16" in text[0], result.output
