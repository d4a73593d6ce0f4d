"""The planner chooses structure and storage precision together (issue 24): targets met as measured
from what extraction gives back, bytes saved, fixed precisions, budgets on the worst task, updates
of quantized checkpoints, and what the reports say."""

from __future__ import annotations

import json

import pytest
import torch

from share_convert import ConsolidationConfig
from share_convert.checkpoint import Checkpoint
from share_convert.engine import add, merge
from share_convert.engine.tasks import config_of
from share_convert.errors import InvalidOptionError
from share_convert.io import open_adapters
from share_convert.report.summary import summarize

from .builders.cli import run

GPT2_FIRST_THREE = (
    "gpt2-c_attn/ShutterStack__peft_model",
    "gpt2-c_attn/gsj-rifat__tmp",
    "gpt2-c_attn/winkitee__imdb-checkpoint-1000",
)


def measured_errors(ckpt: Checkpoint, sources) -> dict[str, dict[str, float]]:
    """Module -> task -> ‖ΔW − ΔŴ‖ / ‖ΔW‖ in float64, ΔŴ as the reader gives it back (dequantized)."""
    out: dict[str, dict[str, float]] = {}
    for module, info in ckpt.modules.items():
        for task in info["tasks"]:
            f = next(s for s in sources if s.task == task).read_module(module)
            W = f.B.double() @ f.A.double()
            B, A = ckpt.reconstruction(task, module)
            out.setdefault(module, {})[task] = float(torch.linalg.norm(W - B @ A.T) / torch.linalg.norm(W))
    return out


@pytest.mark.parametrize("metric", ["mean", "max"])
def test_auto_meets_the_target_as_measured_from_the_values_read_back(real, merged, metric):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    ckpt = Checkpoint(merged("gpt2-c_attn", target_metric=metric))
    assert ckpt.storage_by_precision().keys() - {"float32"}, "nothing was stored in fewer bits"
    for module, errors in measured_errors(ckpt, sources).items():
        records = ckpt.modules[module]["tasks"]
        for task, error in errors.items():
            assert error == pytest.approx(records[task]["error"], rel=1e-5, abs=1e-7)
        value = max(errors.values()) if metric == "max" else sum(errors.values()) / len(errors)
        assert value <= 0.05 + 1e-6


def test_auto_stores_fewer_bytes_than_float_at_the_same_target(merged):
    auto = summarize(Checkpoint(merged("gpt2-c_attn", "gpt2-c_attn+c_proj")))["totals"]
    flt = summarize(Checkpoint(merged("gpt2-c_attn", "gpt2-c_attn+c_proj", precision="float")))["totals"]
    assert auto["checkpoint_bytes"] < flt["checkpoint_bytes"]
    assert auto["ratio"] > flt["ratio"]
    assert auto["bits_per_number"] < flt["bits_per_number"] == 32
    assert auto["mean_error"] <= 0.05 + 1e-6


@pytest.mark.parametrize("precision", ["int8", "float16"])
def test_a_fixed_precision_stores_every_factor_so(merged, precision):
    ckpt = Checkpoint(merged(*GPT2_FIRST_THREE, k=4, private_rank=2, precision=precision))
    assert set(ckpt.storage_by_precision()) == {precision}
    for module in ckpt.modules:
        assert set(ckpt.module(module).precision.values()) == {precision}


def test_float_stores_no_precision_and_the_format_of_before(merged):
    ckpt = Checkpoint(merged("gpt2-c_attn", precision="float"))
    assert "precision" not in ckpt.config
    assert ckpt.manifest["format_version"] < 4
    assert set(ckpt.storage_by_precision()) == {"float32"}
    assert all("precision" not in info for info in ckpt.modules.values())


def test_a_checkpoint_without_a_stored_precision_is_updated_in_float(tmp_path, real, merged):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    old = merged(*GPT2_FIRST_THREE, precision="float")
    assert config_of(Checkpoint(old)).precision == "float"
    add(old, sources[3:], tmp_path / "c2.safetensors")
    after = Checkpoint(tmp_path / "c2.safetensors")
    assert set(after.storage_by_precision()) == {"float32"}
    assert "precision" not in after.config


def test_add_to_a_quantized_checkpoint_keeps_old_rows_and_measures_new_tasks_exactly(tmp_path, real, merged):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    c = merged(*GPT2_FIRST_THREE, k=4, private_rank=2, precision="int8")
    add(c, sources[3:4], tmp_path / "c2.safetensors")
    before, after = Checkpoint(c), Checkpoint(tmp_path / "c2.safetensors")
    assert set(after.storage_by_precision()) == {"int8"}
    new = sources[3].task
    for module, errors in measured_errors(after, sources).items():
        for t in (s.task for s in sources[:3]):
            old_parts, new_parts = before.task_tensors(t, module), after.task_tensors(t, module)
            for part in ("private_B", "private_A"):
                assert torch.equal(new_parts[part], old_parts[part])
        assert errors[new] == pytest.approx(after.modules[module]["tasks"][new]["error"], rel=1e-5, abs=1e-7)


def test_remove_from_a_quantized_checkpoint_keeps_the_other_tasks(tmp_path, merged):
    c = merged(*GPT2_FIRST_THREE, k=4, private_rank=2, precision="int8")
    before = Checkpoint(c)
    assert run("remove", c, "--task", list(before.tasks)[0], "-o", tmp_path / "r.safetensors").exit_code == 0
    after = Checkpoint(tmp_path / "r.safetensors")
    for module in after.modules:
        for t in after.tasks:
            B0, A0 = before.reconstruction(t, module)
            B1, A1 = after.reconstruction(t, module)
            assert torch.equal(B0 @ A0.T, B1 @ A1.T)


def test_budget_on_the_worst_task_lowers_the_worst_error(tmp_path, real):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    worst = {}
    for metric in ("mean", "max"):
        out = tmp_path / f"{metric}.safetensors"
        merge(sources, out, ConsolidationConfig(budget="8x", target_metric=metric))
        totals = summarize(Checkpoint(out))["totals"]
        assert totals["ratio"] >= 8 * 0.95  # the budget counts bytes (records and heads count too)
        worst[metric] = max(t["mean_error"] for t in summarize(Checkpoint(out))["tasks"])
    assert worst["max"] < worst["mean"]


def test_info_json_says_bits_per_number_and_storage_by_precision(merged):
    result = run("info", merged("gpt2-c_attn"), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    totals = report["totals"]
    by_precision = totals["storage_by_precision"]
    assert by_precision and all(set(e) == {"numbers", "bytes", "bits_per_number"} for e in by_precision.values())
    lora = sum(totals["storage"][r]["bytes"] for r in ("bases", "coefficients", "private"))
    assert sum(e["bytes"] for e in by_precision.values()) == lora
    assert totals["bits_per_number"] == pytest.approx(
        8 * lora / sum(e["numbers"] for e in by_precision.values()), rel=1e-12
    )
    for module in report["modules"].values():
        assert 0 < module["bits_per_number"] <= 32
        assert module["precision"]


def test_plan_curves_include_precision(real):
    result = run("plan", real / "gpt2-c_attn", "--modules", r"\.0\.", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    curves = report["precision_curves"]
    at = {name: {p["target_error"]: p for p in points} for name, points in curves.items()}
    assert at["int8"][0.05]["ratio"] > at["float"][0.05]["ratio"]
    assert report["default_plan"]["ratio_bytes"] >= at["float"][0.05]["ratio"]


def test_an_unknown_precision_is_refused(tmp_path, real):
    with pytest.raises(InvalidOptionError, match="--precision"):
        ConsolidationConfig(precision="int3").validate()
    result = run("merge", real / "gpt2-c_attn", "-o", tmp_path / "o.safetensors", "--precision", "int3")
    assert result.exit_code == 2 and "'int3' is not one of" in result.output  # as every option with choices
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("options", [{"k": 4, "private_rank": 2, "precision": "nf4"}, {"precision": "auto"}])
def test_the_writer_stores_the_codes_of_the_rows_whose_errors_were_measured(
    tmp_path, real, merged, monkeypatch, options
):
    """The encoder quantizes each task's rows once to measure errors on the values read back, and the
    writer stacks those codes (engine/results.quantize_for_writing); quantizing the stacked rows again,
    as the writer did before, must give the same file byte for byte."""
    import share_convert.engine.results as results

    reused = merged("gpt2-c_attn", "gpt2-c_attn+c_proj", **options)
    assert Checkpoint(reused).storage_by_precision().keys() & {"int8", "nf4"}, "no codes were stored"
    monkeypatch.setattr(results, "_known_codes", lambda *args: None)
    again = tmp_path / "again.safetensors"
    merge(open_adapters([str(real / "gpt2-c_attn"), str(real / "gpt2-c_attn+c_proj")]), again,
          ConsolidationConfig(**options))  # fmt: skip
    assert again.read_bytes() == reused.read_bytes()
