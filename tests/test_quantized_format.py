"""Format version 4: factors stored as int8 or NF4 codes with per-block scales, read back dequantized.

The quantized checkpoints here are float ones rewritten at a precision per factor role
(tests/builders/quantized.py), so that these tests exercise the format and its readers alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from share_convert import ConsolidationConfig
from share_convert.checkpoint import Checkpoint, CheckpointWriter, verify_checkpoint
from share_convert.checkpoint.quantized import CODE_DTYPE, ROLES, SCALES
from share_convert.engine import merge
from share_convert.errors import CorruptCheckpointError
from share_convert.io import checkpoint_tasks, open_adapters, write_synthetic_adapters
from share_convert.math.quantize import CODE_PRECISIONS, dequantize, quantize

from .builders.quantized import MIXED, requantize

MODULE = "base_model.model.model.layers.0.self_attn.q_proj"
SPECS = {"int8": "int8", "nf4": "nf4", "mixed": MIXED}


@pytest.fixture(scope="module")
def floats(tmp_path_factory) -> Path:
    """24 synthetic adapters (2 modules, 384 × 384) merged with private rows: the private factors are
    large enough for block checksums when stored as int8."""
    folder = tmp_path_factory.mktemp("floats")
    paths = write_synthetic_adapters(folder / "a", count=24, layers=1, hidden=384, rank=8, shared_rank=4, noise=0.3)
    out = folder / "float.safetensors"
    merge(open_adapters([str(p) for p in paths]), out, ConsolidationConfig(k=4, private_rank=8), workers=1)
    return out


@pytest.fixture(scope="module")
def quantized(floats, tmp_path_factory):
    """The float checkpoint rewritten at each of :data:`SPECS` (built once per module)."""
    folder = tmp_path_factory.mktemp("quantized")
    return {key: requantize(floats, folder / f"{key}.safetensors", spec) for key, spec in SPECS.items()}


def stored_as(ckpt: Checkpoint, role: str) -> str:
    return ckpt.module(MODULE).precision[role]


def expected(values: torch.Tensor, precision: str) -> torch.Tensor:
    """What a reader must return for ``values`` (rows as stored) kept at ``precision``."""
    if precision in CODE_PRECISIONS:
        return dequantize(quantize(values, precision))
    return values.to(getattr(torch, precision))


def test_the_format_s_names_and_layout_are_the_quantize_module_s():
    """checkpoint/quantized.py states them without importing torch: they must be math/quantize.py's."""
    from share_convert.checkpoint import quantized as layout
    from share_convert.math import quantize as q

    assert tuple(CODE_DTYPE) == CODE_PRECISIONS and layout.PRECISION_NAMES == q.PRECISIONS
    assert layout.BLOCK == q.BLOCK
    for precision in CODE_PRECISIONS:
        for cols in range(0, 200):
            codes = quantize(torch.ones(1, cols), precision)
            assert [layout.code_columns(precision, cols), layout.blocks_per_row(cols)] == [
                codes.codes.shape[1],
                codes.scales.shape[1],
            ]


@pytest.mark.parametrize("key", SPECS)
def test_a_quantized_checkpoint_is_version_4_and_names_each_role_s_precision(quantized, key):
    ckpt = Checkpoint(quantized[key])
    assert ckpt.version == 4
    spec = SPECS[key]
    for module in ckpt.modules:
        assert ckpt.module(module).precision == {role: spec if isinstance(spec, str) else spec[role] for role in ROLES}


@pytest.mark.parametrize("key", SPECS)
def test_every_factor_reads_back_as_the_dequantized_float_values(floats, quantized, key):
    source, ckpt = Checkpoint(floats), Checkpoint(quantized[key])
    for name in source.manifest["tensors"]:
        role = name.rsplit("/", 1)[-1]
        if role in ROLES:
            got = ckpt.tensor(name)
            assert got.dtype == (torch.float32 if ckpt.code_precision(name) else got.dtype)
            assert torch.equal(got, expected(source.tensor(name), stored_as(ckpt, role))), name


@pytest.mark.parametrize("key", SPECS)
def test_one_task_s_rows_equal_those_rows_of_the_whole_tensor(floats, quantized, key):
    ckpt = Checkpoint(quantized[key])
    for task in ("task-000", "task-013", "task-023"):
        rec = ckpt.task_modules(task)[MODULE]
        parts = ckpt.task_tensors(task, MODULE)
        p, q, cr, pr = rec["rank"], rec["private_rank"], rec["coef_row"], rec["private_row"]
        assert torch.equal(parts["coef_B"], ckpt.tensor(f"modules/{MODULE}/coefs_B")[cr : cr + p].T)
        assert torch.equal(parts["private_B"], ckpt.tensor(f"modules/{MODULE}/private_B")[pr : pr + q].T)
        assert torch.equal(parts["private_A"], ckpt.tensor(f"modules/{MODULE}/private_A")[pr : pr + q])


def test_int8_private_rows_are_read_by_their_checksum_blocks(quantized):
    ckpt = Checkpoint(quantized["int8"])
    name = f"modules/{MODULE}/private_B"
    assert name in ckpt.manifest["blocks"]  # large enough for a checksum per block of rows
    assert ckpt.stored_meta(name)[1] == "I8" and ckpt.tensor_meta(name)[1] == "F32"
    rows = ckpt.tensor_meta(name)[0][0]
    assert torch.equal(ckpt.rows(name, rows - 5, rows), ckpt.tensor(name)[rows - 5 :])


def test_coefficients_and_task_rows_are_dequantized(floats, quantized):
    source, ckpt = Checkpoint(floats), Checkpoint(quantized["int8"])
    tasks = list(ckpt.tasks)
    stored = source.tensor(f"modules/{MODULE}/coefs_A")
    want = expected(stored, "int8").double()
    got = ckpt.coefficients(MODULE, tasks, "A")
    assert torch.equal(got.transpose(1, 2).reshape(-1, got.shape[1]), want)
    rows = ckpt.task_rows(MODULE, tasks[3:7])
    assert rows.precision == {"coefs_B": "int8", "coefs_A": "int8", "private_B": "int8", "private_A": "int8"}
    first, last = ckpt.task_modules(tasks[3])[MODULE], ckpt.task_modules(tasks[6])[MODULE]
    span = slice(first["coef_row"], last["coef_row"] + last["rank"])
    assert torch.equal(rows.coefs[f"modules/{MODULE}/"][1], expected(stored, "int8")[span])
    assert torch.equal(rows.codes[f"modules/{MODULE}/coefs_A"].dequantize(), expected(stored, "int8")[span])


def test_stored_sizes_count_codes_and_scales(quantized):
    ckpt = Checkpoint(quantized["mixed"])
    name = f"modules/{MODULE}/basis_B"
    (n, k), _ = ckpt.tensor_meta(name)
    assert ckpt.stored_size(name) == ("nf4", n * k, n * (-(-k // 2)) + 4 * n * (-(-k // 64)))
    split = ckpt.storage_by_precision()
    assert set(split) == {"nf4", "int8", "bfloat16"}
    assert split["bfloat16"]["bytes"] == 2 * split["bfloat16"]["numbers"]


def test_a_float_rewrite_keeps_format_version_2_and_no_precision_field(floats, tmp_path):
    out = requantize(floats, tmp_path / "same.safetensors", {})
    ckpt = Checkpoint(out)
    assert ckpt.version == 2 and all("precision" not in e for e in ckpt.manifest["modules"].values())
    assert ckpt.module(MODULE).precision == dict.fromkeys(ROLES, "float32")


@pytest.mark.parametrize("key", SPECS)
def test_verify_accepts_a_quantized_checkpoint(quantized, key):
    assert verify_checkpoint(Checkpoint(quantized[key]))["ok"]


def _damaged(source: Path, tmp_path: Path, name: str, edit) -> Path:
    """A copy of ``source`` whose tensor ``name``'s bytes ``edit`` changed, checksums recomputed: a
    crafted file, whose problem only the checks of the values can find."""
    from share_convert.checkpoint.format import MANIFEST_KEY, MANIFEST_SHA_KEY, block_digest, block_digests, sha256

    path = tmp_path / "damaged.safetensors"
    raw = bytearray(source.read_bytes())
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    begin, end = header[name]["data_offsets"]
    data = bytearray(raw[8 + size + begin : 8 + size + end])
    edit(data)
    raw[8 + size + begin : 8 + size + end] = data
    manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    blocks = manifest["blocks"].get(name)
    if blocks:
        step = len(data) // header[name]["shape"][0] * blocks["rows"]
        blocks["sha256"] = block_digests(bytes(data), step)
        manifest["tensors"][name] = block_digest(blocks["sha256"])
    else:
        manifest["tensors"][name] = sha256(bytes(data))
    text = json.dumps(manifest, separators=(",", ":"))
    header["__metadata__"] = {**header["__metadata__"], MANIFEST_KEY: text, MANIFEST_SHA_KEY: sha256(text.encode())}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(raw[8 + size :]))
    return path


def test_a_flipped_code_byte_is_a_checksum_mismatch(quantized, tmp_path):
    bad = tmp_path / "bad.safetensors"
    shutil.copy(quantized["nf4"], bad)
    ckpt = Checkpoint(bad)
    _, start, header = ckpt.store.files.mapped()
    offset = start + header[f"modules/{MODULE}/coefs_B"]["data_offsets"][0]
    ckpt.close()
    raw = bytearray(bad.read_bytes())
    raw[offset] ^= 0x11
    bad.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch in tensor .*coefs_B"):
        verify_checkpoint(Checkpoint(bad))


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_verify_refuses_a_scale_that_is_not_finite_and_non_negative(quantized, tmp_path, value):
    name = f"modules/{MODULE}/coefs_A{SCALES}"

    def edit(data: bytearray) -> None:
        data[:4] = torch.tensor([value], dtype=torch.float32).numpy().tobytes()

    bad = _damaged(quantized["int8"], tmp_path, name, edit)
    with pytest.raises(CorruptCheckpointError, match=f"{name} holds a scale that is negative, NaN or Inf"):
        verify_checkpoint(Checkpoint(bad))


def test_verify_refuses_the_int8_code_minus_128(quantized, tmp_path):
    name = f"modules/{MODULE}/basis_A"
    bad = _damaged(quantized["int8"], tmp_path, name, lambda data: data.__setitem__(0, 0x80))
    with pytest.raises(CorruptCheckpointError, match="int8 code -128"):
        verify_checkpoint(Checkpoint(bad))


def test_codes_whose_shape_disagrees_with_the_module_are_refused_in_one_line(quantized, tmp_path):
    path = tmp_path / "crafted.safetensors"
    raw = quantized["nf4"].read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    name = f"modules/{MODULE}/basis_B"
    rows, cols = header[name]["shape"]
    header[name]["shape"] = [cols, rows]  # same bytes, transposed shape
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + raw[8 + size :])
    ckpt = Checkpoint(path)
    with pytest.raises(CorruptCheckpointError, match=f"tensor {name} holds U8 \\[{cols}, {rows}\\], not the nf4 codes"):
        ckpt.bases(MODULE)


def test_the_writer_stores_codes_and_scales_under_the_factor_s_name(tmp_path, floats):
    ckpt = Checkpoint(floats)
    name = f"modules/{MODULE}/basis_B"
    values = ckpt.tensor(name)
    q = quantize(values, "nf4")
    with CheckpointWriter(tmp_path / "w.safetensors") as writer:
        writer.add(name, values, "nf4")
        writer.add(f"modules/{MODULE}/basis_A", values, "bfloat16")
        with pytest.raises(ValueError, match="cannot be stored as int8 codes"):
            writer.add(f"modules/{MODULE}/gram_B", values, "int8")  # not a factor
        writer.abort()
    with CheckpointWriter(tmp_path / "w.safetensors") as writer:
        writer.add(name, q)
        assert writer.quantized == {name: "nf4"}
        writer.abort()


def test_appended_rows_keep_the_old_codes_and_scales_byte_for_byte(quantized, tmp_path):
    source = Checkpoint(quantized["int8"])
    name = f"modules/{MODULE}/private_B"
    (rows, cols), _ = source.tensor_meta(name)
    extra = torch.randn(7, cols)
    out = tmp_path / "appended.safetensors"
    with CheckpointWriter(out) as writer:
        writer.append_rows(name, source, rows, extra)
        with pytest.raises(ValueError, match="do not match"):
            writer.append_rows(f"modules/{MODULE}/private_A", source, rows, torch.randn(2, 5), "nf4")
        writer.finish({"format": "share-convert", "tasks": {}, "modules": {}})
    with safe_open(str(out), framework="pt") as new, safe_open(str(quantized["int8"]), framework="pt") as old:
        for tensor, fresh in ((name, quantize(extra, "int8").codes), (name + SCALES, quantize(extra, "int8").scales)):
            assert torch.equal(new.get_tensor(tensor)[:rows], old.get_tensor(tensor))
            assert torch.equal(new.get_tensor(tensor)[rows:], fresh)


def test_a_reader_that_knows_only_version_3_refuses_a_quantized_checkpoint(quantized, monkeypatch):
    from share_convert.checkpoint import reader
    from share_convert.errors import UnsupportedFormatError

    monkeypatch.setattr(reader, "FORMAT_VERSION", 3)
    with pytest.raises(UnsupportedFormatError, match="format version 4; this share-convert reads versions up to 3"):
        Checkpoint(quantized["nf4"])


def test_remove_keeps_the_other_tasks_codes_and_scales_byte_for_byte(quantized, tmp_path):
    from share_convert.engine import remove

    remove(quantized["int8"], ["task-005"], tmp_path / "removed.safetensors")
    old, new = Checkpoint(quantized["int8"]), Checkpoint(tmp_path / "removed.safetensors")
    assert new.version == 4 and "task-005" not in new.tasks
    for task in new.tasks:
        for module, rec in new.task_modules(task).items():
            was = old.task_modules(task)[module]
            for part, row, count in (("coefs", "coef_row", "rank"), ("private", "private_row", "private_rank")):
                for side in "BA":
                    name = f"modules/{module}/{part}_{side}"
                    a = old.store.quantized(name, was[row], was[row] + was[count])
                    b = new.store.quantized(name, rec[row], rec[row] + rec[count])
                    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales), (task, name)


def test_a_quantized_checkpoint_s_tasks_are_inputs_of_merge_as_their_dequantized_delta(quantized, tmp_path):
    source = Checkpoint(quantized["nf4"])
    merge(checkpoint_tasks(source), tmp_path / "again.safetensors", ConsolidationConfig(k=10_000))
    again = Checkpoint(tmp_path / "again.safetensors")
    assert again.version == 2 and set(again.tasks) == set(source.tasks)
    for task in ("task-000", "task-017"):
        B0, A0 = source.reconstruction(task, MODULE)
        B1, A1 = again.reconstruction(task, MODULE)
        want = B0 @ A0.T
        assert float((B1 @ A1.T - want).norm() / want.norm()) < 1e-5


def _small_adapters(root: Path, count: int, seed: int) -> list:
    from .builders.adapters import random_factors, write_adapter

    paths = [
        write_adapter(root / f"s{seed}-{i}", {"layers.0.q": random_factors(24, 20, 2, seed=seed + i)}, r=2, alpha=2)
        for i in range(count)
    ]
    return open_adapters([str(p) for p in paths])


def test_chained_rows_stored_as_codes_are_read_rotated_and_an_add_appends_after_their_bytes(tmp_path, monkeypatch):
    """A version-3 file rewritten as int8 keeps its chain: rows are dequantized, then rotated; an add
    that keeps the rows copies their codes and scales and appends the new task's."""
    from share_convert.engine import add
    from share_convert.engine import chain as chains

    monkeypatch.setattr(chains, "CHAIN_MIN_BYTES", 0)
    module, k4 = "base_model.model.layers.0.q", ConsolidationConfig(k=4)
    merge(_small_adapters(tmp_path / "old", 12, seed=0), tmp_path / "c0.safetensors", k4)
    add(tmp_path / "c0.safetensors", _small_adapters(tmp_path / "new", 1, seed=100), tmp_path / "c1.safetensors", k4)
    floats = Checkpoint(tmp_path / "c1.safetensors")
    assert floats.version == 3
    q = Checkpoint(requantize(tmp_path / "c1.safetensors", tmp_path / "q1.safetensors", "int8"))
    prefix = f"modules/{module}/"
    assert q.version == 4 and q.chain(prefix) is not None
    stored = floats.tensor(f"{prefix}coefs_B")  # rows as stored, in the coordinates they were written in
    want = q.chain(prefix).rotate(expected(stored, "int8").double(), torch.arange(len(stored)).numpy(), "B")
    rec = q.task_modules("s0-0")[module]
    got = q.task_tensors("s0-0", module)["coef_B"].T
    torch.testing.assert_close(got, want[rec["coef_row"] : rec["coef_row"] + rec["rank"]].float())
    assert verify_checkpoint(q)["ok"]
    add(q, _small_adapters(tmp_path / "more", 1, seed=200), tmp_path / "q2.safetensors", k4)
    after = Checkpoint(tmp_path / "q2.safetensors")
    assert after.version == 4 and after.code_precision(f"{prefix}coefs_B") == "int8"
    rows = q.tensor_meta(f"{prefix}coefs_B")[0][0]
    old, new = q.store.quantized(f"{prefix}coefs_B"), after.store.quantized(f"{prefix}coefs_B", 0, rows)
    assert torch.equal(old.codes, new.codes) and torch.equal(old.scales, new.scales)
    assert verify_checkpoint(after)["ok"]


def test_a_grouped_module_stores_each_group_s_factors_as_codes(tmp_path):
    for seed, prefix in ((1, "x"), (2, "y")):  # two families from two planted subspaces: two groups of bases
        write_synthetic_adapters(
            tmp_path / "a", count=2, layers=1, hidden=48, rank=4, shared_rank=4, noise=0.001, seed=seed, prefix=prefix
        )
    config = ConsolidationConfig(target_error=0.02, groups="2", precision="float")
    merge(open_adapters([str(tmp_path / "a")]), tmp_path / "g.safetensors", config, workers=1)
    source = Checkpoint(tmp_path / "g.safetensors")
    module = next(m for m, info in source.modules.items() if "groups" in info)
    q = Checkpoint(requantize(tmp_path / "g.safetensors", tmp_path / "q.safetensors", "nf4"))
    for g in range(len(source.modules[module]["groups"])):
        name = f"modules/{module}/g{g}/basis_B"
        assert q.code_precision(name) == "nf4"
        assert torch.equal(q.tensor(name), expected(source.tensor(name), "nf4"))
    assert verify_checkpoint(q)["ok"]


def test_codes_and_scales_read_back_from_shards(floats, tmp_path):
    out = requantize(floats, tmp_path / "sharded.safetensors", MIXED, max_shard_size=40_000)
    ckpt = Checkpoint(out)
    assert ckpt.sharded and len({ckpt.file_of(n) for n in ckpt.manifest["tensors"]}) > 2
    source = Checkpoint(floats)
    name = f"modules/{MODULE}/private_A"
    assert torch.equal(ckpt.tensor(name), expected(source.tensor(name), "bfloat16"))
    name = f"modules/{MODULE}/coefs_B"
    assert torch.equal(ckpt.tensor(name), expected(source.tensor(name), "int8"))
    assert verify_checkpoint(ckpt)["ok"]


def test_rows_read_as_codes_keep_them_when_joined_with_new_float_rows(quantized):
    """An update stacks old tasks' rows (read from a quantized checkpoint: their codes come along)
    with new tasks' float rows: the old codes are kept as read, the new rows quantized like them."""
    from share_convert.checkpoint.records import TaskRows

    ckpt = Checkpoint(quantized["int8"])
    old = ckpt.task_rows(MODULE, ["task-001", "task-002"])
    prefix = f"modules/{MODULE}/"
    k_B, k_A = (ckpt.tensor_meta(f"{prefix}basis_{s}")[0][1] for s in "BA")
    g = torch.Generator().manual_seed(3)
    parts = {"coef_B": torch.randn(k_B, 3, generator=g), "coef_A": torch.randn(k_A, 3, generator=g)}
    new = TaskRows.of_parts([("new", prefix, parts)], torch.float32)
    rows = TaskRows.concat([old, new], torch.float32)
    assert rows.precision == old.precision
    for side in "BA":
        joined, before = rows.codes[f"{prefix}coefs_{side}"], old.codes[f"{prefix}coefs_{side}"]
        count = before.shape[0]
        assert torch.equal(joined.codes[:count], before.codes) and torch.equal(joined.scales[:count], before.scales)
        fresh = quantize(parts[f"coef_{side}"].T, "int8")
        assert torch.equal(joined.codes[count:], fresh.codes) and torch.equal(joined.scales[count:], fresh.scales)
    assert torch.equal(rows.codes["private_B"].codes, old.codes["private_B"].codes)  # the new task has none


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> tuple[Path, Path]:
    """Four small adapters in k = 3 bases (rows of odd length: NF4 rows end with a padding nibble): (float, nf4)."""
    from .builders.adapters import write_small_adapters

    folder = tmp_path_factory.mktemp("odd")
    paths = write_small_adapters(folder)
    merge(open_adapters([str(p) for p in paths]), folder / "f.safetensors", ConsolidationConfig(k=3, private_rank=1))
    return folder / "f.safetensors", requantize(folder / "f.safetensors", folder / "q.safetensors", "nf4")


def test_nf4_rows_of_odd_length_read_back_and_end_with_a_zero_nibble(odd):
    floats, nf4 = Checkpoint(odd[0]), Checkpoint(odd[1])
    module = "base_model.model.layers.0.q"
    name = f"modules/{module}/coefs_B"
    (rows, cols), _ = nf4.tensor_meta(name)
    assert cols == 3 and nf4.stored_meta(name)[0] == [rows, 2]
    assert not (nf4.store.quantized(name).codes[:, -1] >> 4).any()
    assert torch.equal(nf4.tensor(name), expected(floats.tensor(name), "nf4"))
    assert verify_checkpoint(nf4)["ok"]


def test_verify_refuses_a_non_zero_padding_nibble(odd, tmp_path):
    name = "modules/base_model.model.layers.0.q/coefs_B"

    def edit(data: bytearray) -> None:
        data[1] |= 0xF0  # the high nibble of row 0's last byte: the padding of a 3-number row

    bad = _damaged(odd[1], tmp_path, name, edit)
    Checkpoint(bad).tensor(name)  # readers ignore the padding
    with pytest.raises(CorruptCheckpointError, match="non-zero padding nibble"):
        verify_checkpoint(Checkpoint(bad))
