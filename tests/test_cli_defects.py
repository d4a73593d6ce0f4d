"""CLI defects of issue 22 (items 4, 6–11): each test shows one, on small synthetic inputs, in-process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from share_convert.report import verdict

from .builders.adapters import random_factors, write_adapter, write_kohya
from .builders.cli import one_error_line, run


def adapter(folder: Path, seed: int, **config) -> Path:
    """A small PEFT adapter (two modules, rank 4) whose random factors share nothing with another seed's."""
    mods = {"layers.0.q": random_factors(16, 12, 4, seed), "layers.0.v": random_factors(8, 12, 4, seed + 1)}
    return write_adapter(folder, mods, config=config)


# -- 4. extract --rank of a kohya or diffusers task ------------------------------------------------


def kohya_file(path: Path, seed: int) -> Path:
    """A kohya text-encoder LoRA: two modules of rank 4."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in (0, 1):
        modules[f"lora_te_text_model_encoder_layers_{layer}_mlp_fc1"] = (
            torch.randn(4, 16, generator=g),
            torch.randn(24, 4, generator=g),
        )
    return write_kohya(path, modules, alpha=4.0)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_extract_rank_of_a_text_to_image_task_truncates_and_reports_the_added_error(fmt, tmp_path):
    ckpt = tmp_path / "c.safetensors"
    assert run("merge", kohya_file(tmp_path / "k.safetensors", 0), "-o", ckpt).exit_code == 0
    out = tmp_path / "o.safetensors"
    result = run("extract", ckpt, "--task", "k", "--rank", 2, "--format", fmt, "-o", out)
    assert result.exit_code == 0, result.output
    assert "truncating k to rank 2 adds" in result.output
    with safe_open(str(out), "pt") as f:
        ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(("lora_down.weight", "lora_A.weight"))}
    assert ranks == {2}


# -- 6. plan --plot into a missing folder ----------------------------------------------------------


def test_plan_plot_into_a_missing_folder_gives_the_line_merge_gives(tmp_path):
    pytest.importorskip("matplotlib")
    a = adapter(tmp_path / "a", 0)
    plan = one_error_line(run("plan", a, "--plot", tmp_path / "nodir" / "c.png"))
    merge = one_error_line(run("merge", a, "-o", tmp_path / "nodir" / "c.safetensors"))
    assert plan == merge and "does not exist" in plan


# -- 7. configs that name different base models, with the same shapes ------------------------------


@pytest.fixture(scope="module")
def two_bases(tmp_path_factory) -> tuple[Path, str]:
    """A merge of a gpt2 adapter and a distilgpt2 adapter with the same module shapes, and its report."""
    tmp = tmp_path_factory.mktemp("bases")
    a = adapter(tmp / "a", 0, base_model_name_or_path="gpt2")
    b = adapter(tmp / "b", 2, base_model_name_or_path="distilgpt2")
    result = run("merge", a, b, "-o", tmp / "c.safetensors")
    assert result.exit_code == 0, result.output
    return tmp / "c.safetensors", result.output


def test_a_merge_of_adapters_of_different_base_models_warns_naming_them(two_bases):
    text = " ".join(two_bases[1].split())
    assert re.search(r"Warning: .*different base models: distilgpt2 \(1 task: b\); gpt2 \(1 task: a\)", text)


def test_info_json_carries_the_different_base_models_warning(two_bases):
    warnings = json.loads(run("info", two_bases[0], "--json").output)["warnings"]
    assert any("gpt2" in w and "distilgpt2" in w for w in warnings)


# -- 8. help under the typer versions allowed -------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "usage"),
    [
        ("merge", "merge [OPTIONS] ADAPTER..."),
        ("extract", "extract [OPTIONS] CHECKPOINT"),
        ("push", "push [OPTIONS] CHECKPOINT REPO"),
        ("add", "add [OPTIONS] CHECKPOINT ADAPTER..."),
    ],
)
def test_help_usage_shows_required_arguments_bare(command, usage):
    first = run(command, "--help").output.splitlines()[0]
    assert first.endswith(usage), first


@pytest.mark.parametrize("command", ["merge", "extract", "plan", "push", "pull", "add", "remove", "info"])
def test_help_shows_no_type_placeholders_or_braces(command):
    text = run(command, "--help").output
    assert not re.search(r"\{\w+\}|<(str|int|float|path|bool|list\[[^>]*)>", text), text


@pytest.mark.parametrize("command", ["merge", "extract", "push"])
def test_help_marks_every_argument_required(command):
    text = run(command, "--help").output
    section = text.split("Arguments:")[1].split("Options:")[0]
    entries = re.split(r"\n  (?=\S)", "\n" + section.strip("\n"))[1:]
    assert entries and all("[required]" in e for e in entries), section


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("extract", "--format <peft|kohya|diffusers>"),
        ("merge", "--groups <1|auto|N>"),
        ("merge", "--budget RATIO|SIZE"),
    ],
)
def test_help_shows_what_format_groups_and_budget_take(command, option):
    assert option in run(command, "--help").output


# -- 9. a checkpoint larger than its adapters -------------------------------------------------------


def test_a_checkpoint_larger_than_its_adapters_says_by_how_much_and_what_makes_the_difference(tmp_path):
    inputs = [adapter(tmp_path / f"a{i}", 10 * i) for i in range(3)]  # share nothing: kept as they are
    # in the inputs' float dtype: in fewer bits, factors that share nothing still take fewer bytes
    summary = json.loads(
        run("merge", *inputs, "-o", tmp_path / "c.safetensors", "--precision", "float", "--json").output
    )
    assert summary["totals"]["ratio"] < 1
    assert "the per-task records and Gram matrices" in summary["plan"]["verdict"]


def test_a_size_within_half_a_percent_of_the_originals_is_not_rounded_to_1_00():
    totals = {"ratio": 0.9958, "original_bytes": 9958, "mean_error": 0.0, "max_error": 0.0}
    text = verdict({"shared": 0, "mixed": 0, "private": 1}, totals, {}, {"k": 4}, "merge")
    assert "1.00×" not in text and "0.4% larger than the original adapters" in text


# -- 10. task names in the add report ---------------------------------------------------------------


def test_the_add_report_never_cuts_task_names(tmp_path):
    names = ["winkitee__imdb-checkpoint-1000", "winkitee__imdb-checkpoint-125"]
    old = [adapter(tmp_path / n, 2 * i) for i, n in enumerate(names)]
    new = adapter(tmp_path / "winkitee__imdb-checkpoint-1500", 4)
    assert run("merge", *old, "-o", tmp_path / "c.safetensors").exit_code == 0
    result = run("add", tmp_path / "c.safetensors", new, "-o", tmp_path / "d.safetensors")
    assert result.exit_code == 0, result.output
    drift = result.output.split("Last update (add)")[1]
    assert "…" not in result.output
    assert "checkpoint-1000" in drift and "checkpoint-125" in drift


# -- 11. -o with a suffix other than .safetensors ---------------------------------------------------


def test_merge_refuses_an_output_not_named_safetensors_and_writes_nothing(tmp_path):
    line = one_error_line(run("merge", adapter(tmp_path / "a", 0), "-o", tmp_path / "x.txt"))
    assert "x.txt" in line and "x.safetensors" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_merge_to_a_shard_index_name_writes_the_checkpoint_it_stands_for(tmp_path):
    result = run("merge", adapter(tmp_path / "a", 0), "-o", tmp_path / "c.safetensors.index.json")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.safetensors").is_file()
