"""Reading quantized checkpoints (format version 4): extraction in the originals' dtype or ``--dtype``,
proven by PEFT and by the io readers; the runtime, dequantized at load; training on them.

The checkpoints are real merges rewritten at given precisions (tests/builders/quantized.py); what
the readers must give back is the checkpoint's own ΔŴ, which tests/test_quantized_format.py proves
equal to the dequantized stored values.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors import safe_open

from share_convert import ConsolidationConfig, ShareModel, api
from share_convert.checkpoint import Checkpoint
from share_convert.io import extract, open_adapters
from share_convert.runtime.layers import model_path

from .builders.adapters import random_factors, write_adapter
from .builders.cli import imports_torch, one_error_line, run
from .builders.models import bert_classifier
from .builders.quantized import MIXED, requantize

TOKENS = torch.randint(1, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bert_tiny(merged, tmp_path_factory) -> Path:
    """The real bert-tiny adapter (with its classifier head) merged, rewritten with NF4 bases, int8
    coefficients and bfloat16 private rows."""
    folder = tmp_path_factory.mktemp("bert-tiny")
    return requantize(merged("bert-tiny", k=4, private_rank=1), folder / "q.safetensors", MIXED)


def deltas(ckpt: Checkpoint, task: str) -> dict[str, torch.Tensor]:
    """The checkpoint's ΔŴ (n × d, float64) of ``task`` per module."""
    out = {}
    for module in ckpt.task_modules(task):
        B, A = ckpt.reconstruction(task, module)
        out[module] = B @ A.T
    return out


def peft_deltas(folder: Path) -> dict[str, tuple[torch.Tensor, str]]:
    """Per module, B·A (float64) of a PEFT folder written with r = lora_alpha, and the factors' dtype."""
    out = {}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if key.endswith(".lora_A.weight"):
                module = key[: -len(".lora_A.weight")]
                A, B = f.get_tensor(key), f.get_tensor(f"{module}.lora_B.weight")
                out[module] = (B.double() @ A.double(), f.get_slice(key).get_dtype())
    return out


def assert_close_deltas(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float) -> None:
    assert set(got) == set(want)
    for module, dw in want.items():
        assert float((got[module] - dw).norm() / dw.norm()) <= tol, module


def with_delta(base: torch.nn.Module, ds: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``base`` whose Linear layers hold W + ΔŴ."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for module, dw in ds.items():
            model.get_submodule(model_path(module)).weight += dw.to(torch.float32)
    return model


def test_peft_extraction_is_in_the_originals_dtype_and_gives_the_checkpoint_s_delta(bert_tiny, tmp_path):
    ckpt = Checkpoint(bert_tiny)
    task = next(iter(ckpt.tasks))
    assert ckpt.task(task)["weights_dtype"] == "F32"
    extract(ckpt, task, tmp_path / "out")
    got = peft_deltas(tmp_path / "out")
    assert {dtype for _, dtype in got.values()} == {"F32"}  # not the stored NF4/int8/bfloat16
    assert_close_deltas({m: d for m, (d, _) in got.items()}, deltas(ckpt, task), 1e-6)


def test_a_peft_extraction_loads_with_peft_as_the_base_model_plus_the_checkpoint_s_delta(bert_tiny, tmp_path):
    ckpt = Checkpoint(bert_tiny)
    task = next(iter(ckpt.tasks))
    extract(ckpt, task, tmp_path / "out")
    base = bert_classifier()
    peft = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "out")).eval()
    expected = with_delta(base, deltas(ckpt, task))
    with torch.no_grad():
        got = peft(input_ids=TOKENS, output_hidden_states=True).hidden_states[-1]
        want = expected(input_ids=TOKENS, output_hidden_states=True).hidden_states[-1]
        plain = base(input_ids=TOKENS, output_hidden_states=True).hidden_states[-1]
    assert (want - plain).abs().max() > 1e-3  # the adapter matters: the comparison proves something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("dtype", "name", "tol"), [("bfloat16", "BF16", 2e-2), ("float16", "F16", 3e-3)])
def test_dtype_chooses_the_written_factors_dtype(bert_tiny, tmp_path, dtype, name, tol):
    ckpt = Checkpoint(bert_tiny)
    task = next(iter(ckpt.tasks))
    result = run("extract", bert_tiny, "--task", task, "--dtype", dtype, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    got = peft_deltas(tmp_path / "out")
    assert {d for _, d in got.values()} == {name}
    assert_close_deltas({m: d for m, (d, _) in got.items()}, deltas(ckpt, task), tol)
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), framework="pt") as f:
        heads = [k for k in f.keys() if "lora_" not in k]
        assert heads and all(f.get_tensor(k).dtype == ckpt.heads(task)[k].dtype for k in heads)  # heads as stored


def test_an_unknown_dtype_is_refused_in_one_line_before_anything_is_written(bert_tiny, tmp_path):
    task = next(iter(Checkpoint(bert_tiny).tasks))
    result = run("extract", bert_tiny, "--task", task, "--dtype", "int8", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "--dtype 'int8' is not one of float32, float16, bfloat16" in one_error_line(result)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["tasks", "info"])
def test_light_commands_on_a_quantized_checkpoint_start_without_importing_torch(bert_tiny, command):
    assert not imports_torch(command, bert_tiny)


def test_extract_all_takes_the_dtype_too(bert_tiny, tmp_path):
    (report,) = api.extract(bert_tiny, tmp_path / "all", all_tasks=True, dtype="bfloat16")
    assert {d for _, d in peft_deltas(report.path).values()} == {"BF16"}


# -- kohya and diffusers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """Two kohya LoRAs of a tiny SD 1.5-like pipeline merged at full rank, then stored as NF4: (float, nf4)."""
    pytest.importorskip("diffusers")
    from .builders.pipelines import kohya_sd, sd15_pipe

    folder = tmp_path_factory.mktemp("sd")
    pipe = sd15_pipe()
    files = [kohya_sd(pipe, folder / f"{t}.safetensors", seed=s, conv=False) and folder / f"{t}.safetensors"
             for t, s in (("a", 1), ("b", 2))]  # fmt: skip
    api.merge([str(f) for f in files], folder / "float.safetensors", ConsolidationConfig(k=10_000, dtype="float32"))
    return folder / "float.safetensors", requantize(folder / "float.safetensors", folder / "nf4.safetensors", "nf4")


def read_back(path: Path) -> dict[str, tuple[torch.Tensor, set[str]]]:
    """ΔW per module of an adapter file, read by share-convert's own input readers, and its factors' dtypes."""
    (source,) = open_adapters([str(path)])
    with safe_open(str(path), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("weight")}
    out = {}
    for module in source.module_shapes():
        factors = source.read_module(module)
        out[module] = (factors.B.double() @ factors.A.double(), dtypes)
    return out


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize(("dtype", "name", "tol"), [(None, "F32", 1e-6), ("bfloat16", "BF16", 2e-2)])
def test_kohya_and_diffusers_extractions_give_the_checkpoint_s_delta(sd_checkpoint, tmp_path, fmt, dtype, name, tol):
    _, nf4 = sd_checkpoint
    ckpt = Checkpoint(nf4)
    out = extract(ckpt, "a", tmp_path / "a.safetensors", format=fmt, dtype=dtype).path
    got = read_back(out)
    assert {n for _, dtypes in got.values() for n in dtypes} == {name}
    assert_close_deltas({m: d for m, (d, _) in got.items()}, deltas(ckpt, "a"), tol)


def test_nf4_storage_changes_the_extracted_delta_by_about_its_rounding(sd_checkpoint, tmp_path):
    """The quantized checkpoint's extraction is not the float one's: NF4's error is what it adds."""
    floats, nf4 = sd_checkpoint
    a = read_back(extract(floats, "a", tmp_path / "f.safetensors").path)
    b = read_back(extract(nf4, "a", tmp_path / "q.safetensors").path)
    change = sum(float((b[m][0] - a[m][0]).norm() ** 2) for m in a) ** 0.5
    norm = sum(float(a[m][0].norm() ** 2) for m in a) ** 0.5
    assert 0.005 < change / norm < 0.5


# -- runtime ---------------------------------------------------------------------------------------------


def test_the_runtime_gives_peft_s_outputs_on_the_extracted_task(bert_tiny, tmp_path):
    ckpt = Checkpoint(bert_tiny)
    task = next(iter(ckpt.tasks))
    extract(ckpt, task, tmp_path / "out")
    peft = PeftModel.from_pretrained(bert_classifier(), str(tmp_path / "out")).eval()
    model = ShareModel.from_checkpoint(bert_classifier(), bert_tiny)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=TOKENS, task=task).logits, peft(input_ids=TOKENS).logits)


def test_memory_report_says_what_was_dequantized(bert_tiny, merged):
    report = ShareModel.from_checkpoint(bert_classifier(), bert_tiny, keep_quantized=False).memory_report()
    assert set(report.dequantized_from) == {"nf4", "int8"}  # the bfloat16 private rows are not codes
    assert all(size > 0 for size in report.dequantized_from.values())
    shown = report.as_dict()
    assert shown["dequantized_from"] == report.dequantized_from and "dequantized" in shown["note"]
    float_ckpt = merged("bert-tiny", k=4, private_rank=1)
    plain = ShareModel.from_checkpoint(bert_classifier(), float_ckpt, keep_quantized=False).memory_report()
    assert plain.dequantized_from == {} and "dequantized_from" not in plain.as_dict()


# -- training --------------------------------------------------------------------------------------------

MODULES = ("bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value")
VOCAB = 64


def small_bert() -> torch.nn.Module:
    return bert_classifier(vocab=VOCAB, layers=1, intermediate=256, dropout=0.0)


@pytest.fixture(scope="module")
def trainable(tmp_path_factory) -> Path:
    """Three random adapters of a one-layer BERT merged with shared bases, stored as NF4."""
    folder = tmp_path_factory.mktemp("train")
    for i in range(3):
        mods = {m: random_factors(128, 128, 4, 10 * i + j) for j, m in enumerate(MODULES)}
        write_adapter(folder / f"t{i}", {m: (A * 0.05, B * 0.05) for m, (A, B) in mods.items()}, alpha=4)
    api.merge([str(folder / f"t{i}") for i in range(3)], folder / "float.safetensors", ConsolidationConfig(k=6))
    return requantize(folder / "float.safetensors", folder / "nf4.safetensors", "nf4")


def test_a_task_trains_saves_and_folds_into_a_quantized_checkpoint(trainable, tmp_path):
    model = ShareModel.from_checkpoint(small_bert(), trainable)
    model.add_task("new", rank=4, new_directions=2)
    x = torch.randint(1, VOCAB, (64, 8), generator=torch.Generator().manual_seed(0))
    y = (x.sum(1) % 2).long()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(input_ids=x, task="new").logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    assert losses[-1] < losses[0]
    saved = model.save_task("new", tmp_path / "new")
    peft = PeftModel.from_pretrained(small_bert(), str(saved)).eval()
    with torch.no_grad():
        trained = model(input_ids=x, task="new").logits
        torch.testing.assert_close(peft(input_ids=x).logits, trained, rtol=1e-5, atol=1e-5)
    model.fold_into("new", trainable, tmp_path / "folded.safetensors")
    folded = Checkpoint(tmp_path / "folded.safetensors")
    assert set(folded.tasks) == {"t0", "t1", "t2", "new"}
    served = ShareModel.from_checkpoint(small_bert(), folded)
    with torch.no_grad():
        # the folded task's rows are stored as NF4 like the module's others: equal up to their rounding
        torch.testing.assert_close(served(input_ids=x, task="new").logits, trained, rtol=0, atol=1e-2)
