"""The command line as a user meets it: reports, JSON, and one clear line for bad input."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from share_convert.cli import app

from .builders.adapters import random_factors, write_adapter
from .builders.cli import imports_torch

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_failure(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:")
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_merge_prints_the_report_and_info_json_gives_the_same_figures(tmp_path, real):
    out = tmp_path / "g.safetensors"
    result = run("merge", *sorted((real / "gpt2-c_attn").iterdir()), "-o", out, "--json")
    assert result.exit_code == 0, result.output
    merged = json.loads(result.output)
    info = json.loads(run("info", out, "--json").output)
    assert merged == info
    assert len(info["tasks"]) == 5
    for t in info["tasks"]:
        assert 0 <= t["mean_error"] <= t["max_error"] < 1
    tot = info["totals"]
    assert tot["checkpoint_bytes"] == sum(p["bytes"] for p in tot["storage"].values())
    assert math.isclose(tot["ratio"], tot["original_bytes"] / tot["checkpoint_bytes"])


def test_merge_report_is_a_table_on_a_terminal_and_plain_text_in_pipes(tmp_path, real):
    result = run("merge", real / "gpt2-c_attn", "-o", tmp_path / "g.safetensors")
    assert result.exit_code == 0
    assert "mean ΔW error" in result.output and "Compression:" in result.output


def test_console_script_runs_as_a_process(tmp_path, real):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "share_convert.cli",
            "merge",
            str(real / "gpt2-c_attn"),
            "-o",
            str(tmp_path / "g.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar in a pipe


@pytest.mark.parametrize("command", [["--help"], ["tasks"], ["info"]])
def test_light_commands_start_without_importing_torch(command, merged):
    """--help, tasks and info read no tensor maths: a fresh process running them never imports torch."""
    args = command if command == ["--help"] else [*command, merged("gpt2-c_attn")]
    assert not imports_torch(*args)


def test_tasks_lists_task_names(real, merged):
    result = run("tasks", merged("gpt2-c_attn"))
    assert result.output.split() == sorted(p.name for p in (real / "gpt2-c_attn").iterdir())


def test_gpt2_with_bert_adapters_fails_cleanly(tmp_path, real):
    out = tmp_path / "x.safetensors"
    result = run("merge", real / "gpt2-c_attn", real / "bert-tiny", "-o", out)
    assert_clean_failure(result, "different base models", "bert-tiny")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_shapes_that_disagree_for_one_module_name_fail_cleanly(tmp_path):
    a = write_adapter(tmp_path / "a", {"layers.0.q": random_factors(8, 6, 2, 0)})
    b = write_adapter(tmp_path / "b", {"layers.0.q": random_factors(10, 6, 2, 1)})
    out = tmp_path / "x.safetensors"
    assert_clean_failure(run("merge", a, b, "-o", out), "layers.0.q", "10×6", "8×6")
    assert not out.exists()


def test_file_with_no_lora_tensors_fails_cleanly(tmp_path):
    save_file({"classifier.weight": torch.zeros(2, 3)}, str(tmp_path / "x.safetensors"))
    assert_clean_failure(
        run("merge", tmp_path / "x.safetensors", "--alpha", "8", "-o", tmp_path / "o.safetensors"),
        "no LoRA tensors",
        "x.safetensors",
    )
    assert not (tmp_path / "o.safetensors").exists()


def test_truncated_file_fails_cleanly(tmp_path, real):
    src = real / "gpt2-c_attn/winkitee__peft-lora-gpt2"
    shutil.copytree(src, tmp_path / "t")
    data = (tmp_path / "t/adapter_model.safetensors").read_bytes()
    (tmp_path / "t/adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert_clean_failure(
        run("merge", tmp_path / "t", "-o", tmp_path / "o.safetensors"), "not a readable safetensors file"
    )
    assert not (tmp_path / "o.safetensors").exists()


def test_unreadable_file_fails_cleanly(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"this is not a tensor file")
    assert_clean_failure(
        run("merge", tmp_path / "x.safetensors", "--alpha", "8", "-o", tmp_path / "o.safetensors"), "x.safetensors"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_fail_cleanly(tmp_path, bad):
    good = write_adapter(tmp_path / "good", {"layers.0.q": random_factors(8, 6, 2, 0)})
    A, B = random_factors(8, 6, 2, 1)
    B[3, 1] = bad
    broken = write_adapter(tmp_path / "broken", {"layers.0.q": (A, B)})
    out = tmp_path / "o.safetensors"
    assert_clean_failure(run("merge", good, broken, "-o", out), "NaN or Inf", "broken")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "good"]


def test_duplicate_task_names_fail_cleanly(tmp_path):
    a = write_adapter(tmp_path / "x" / "same", {"layers.0.q": random_factors(8, 6, 2, 0)})
    b = write_adapter(tmp_path / "y" / "same", {"layers.0.q": random_factors(8, 6, 2, 1)})
    assert_clean_failure(run("merge", a, b, "-o", tmp_path / "o.safetensors"), "same", "NAME=PATH")


def test_empty_input_list_fails_cleanly(tmp_path):
    assert_clean_failure(run("merge", "-o", tmp_path / "o.safetensors"), "no inputs")


def test_empty_glob_fails_cleanly(tmp_path):
    assert_clean_failure(
        run("merge", str(tmp_path / "*.safetensors"), "-o", tmp_path / "o.safetensors"), "no file matches"
    )


def test_existing_output_is_kept_unless_force(tmp_path, real):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    assert_clean_failure(run("merge", real / "gpt2-c_attn", "-o", out), "already exists", "--force")
    assert out.read_bytes() == b"precious"
    assert run("merge", real / "gpt2-c_attn", "-o", out, "--force").exit_code == 0
    assert out.read_bytes() != b"precious"


def test_missing_alpha_for_a_bare_file_fails_cleanly(tmp_path, real):
    shutil.copy(real / "gpt2-c_attn/winkitee__peft-lora-gpt2/adapter_model.safetensors", tmp_path / "x.safetensors")
    assert_clean_failure(run("merge", tmp_path / "x.safetensors", "-o", tmp_path / "o.safetensors"), "--alpha")


def test_bare_files_merge_with_alpha_and_the_assumption_is_reported(tmp_path, real):
    for name in ("winkitee__peft-lora-gpt2", "winkitee__imdb-checkpoint-125"):
        shutil.copy(real / f"gpt2-c_attn/{name}/adapter_model.safetensors", tmp_path / f"{name}.safetensors")
    result = run("merge", str(tmp_path / "*.safetensors"), "--alpha", "16", "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 0, result.output
    assert "Assumed lora_alpha=16" in result.output


def test_invalid_options_fail_cleanly(tmp_path, real):
    assert_clean_failure(
        run("merge", real / "gpt2-c_attn", "-o", tmp_path / "o.safetensors", "--energy", "2"), "--energy"
    )


def test_info_on_a_file_that_is_not_a_checkpoint_fails_cleanly(real):
    assert_clean_failure(
        run("info", real / "gpt2-c_attn/winkitee__peft-lora-gpt2/adapter_model.safetensors"), "not a Share checkpoint"
    )


@pytest.mark.parametrize(
    "command",
    ["merge", "info", "tasks", "extract", "add", "remove", "combine", "verify", "plan", "push", "pull", "demo"],
)
def test_every_command_documents_itself(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example:" in result.output


def test_names_and_paths_with_brackets_are_printed_verbatim(tmp_path):
    a = write_adapter(tmp_path / "x[bold]y", {"layers.0.q": random_factors(8, 6, 2, 0)})
    result = run("merge", a, "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 0, result.output
    assert "x[bold]y" in result.output
    bad = run("merge", tmp_path / "missing[/red]", "-o", tmp_path / "p.safetensors")
    assert bad.exit_code == 2 and "missing[/red]" in bad.output


def test_reports_of_many_tasks_show_the_new_ones_and_say_how_many_rows_are_left_out(tmp_path):
    from share_convert.io import write_synthetic_adapters
    from share_convert.report import MAX_ROWS

    write_synthetic_adapters(tmp_path / "old", count=MAX_ROWS + 5, layers=1, hidden=32, rank=2, shared_rank=2)
    write_synthetic_adapters(tmp_path / "new", count=1, layers=1, hidden=32, rank=2, shared_rank=2, prefix="late")
    ck = tmp_path / "c.safetensors"
    assert runner.invoke(app, ["merge", str(tmp_path / "old"), "-o", str(ck)]).exit_code == 0
    result = runner.invoke(app, ["add", str(ck), str(tmp_path / "new"), "--in-place"])
    assert result.exit_code == 0, result.output
    assert "late-000" in result.output
    assert "… and" in result.output and "more old tasks (every row: --json)" in result.output
    assert f"Drift over all {MAX_ROWS + 5} old tasks" in result.output
    info = json.loads(runner.invoke(app, ["info", str(ck), "--json"]).output)
    assert len(info["tasks"]) == MAX_ROWS + 6


def test_info_on_a_merge_of_many_tasks_shows_the_worst_and_counts_the_rest(tmp_path):
    from share_convert.io import write_synthetic_adapters
    from share_convert.report import MAX_ROWS

    write_synthetic_adapters(tmp_path / "a", count=MAX_ROWS + 10, layers=1, hidden=32, rank=2, shared_rank=2)
    ck = tmp_path / "c.safetensors"
    assert runner.invoke(app, ["merge", str(tmp_path / "a"), "-o", str(ck)]).exit_code == 0
    result = runner.invoke(app, ["info", str(ck)])
    assert result.exit_code == 0
    assert "… and 10 more tasks (every row: --json)" in result.output
    shown = [line for line in result.output.splitlines() if "task-0" in line]
    assert len(shown) == MAX_ROWS
