"""What a new user reads: messages that say what happened, and no silent bad outcome (issue 13).

Every command runs in-process through the CLI, on the real adapters where the message is about
them, and on small synthetic adapters where a property needs a controlled input.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from share_convert import api
from share_convert.checkpoint import Checkpoint

from .builders.adapters import random_factors, write_adapter
from .builders.cli import one_error_line, run
from .hub_servers import UploadServer

GPT2 = "gpt2-c_attn"
PEFT_FOLDER = "gpt2-c_attn/winkitee__peft-lora-gpt2"


@pytest.fixture(scope="module")
def nine(real, tmp_path_factory) -> Path:
    """The nine GPT-2 adapters, merged with the default target (read-only for the tests)."""
    out = tmp_path_factory.mktemp("nine") / "g9.safetensors"
    result = run("merge", real / "gpt2-c_attn", real / "gpt2-c_attn+c_proj", "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def five(real, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("five") / "g5.safetensors"
    assert run("merge", real / GPT2, "-o", out).exit_code == 0
    return out


# -- 1. info on an adapter ---------------------------------------------------------------------


def test_info_on_a_peft_folder_says_it_is_an_adapter_and_points_to_merge_and_plan(real):
    line = one_error_line(run("info", real / PEFT_FOLDER))
    assert "is a PEFT adapter folder, not a Share checkpoint" in line
    assert "share-convert merge" in line and "share-convert plan" in line
    assert "no such file" not in line


def test_tasks_on_a_bin_adapter_says_it_is_adapter_weights(real):
    line = one_error_line(run("tasks", real / "gpt2-c_attn/gsj-rifat__tmp/adapter_model.bin"))
    assert "is adapter weights, not a Share checkpoint" in line


def test_a_folder_holding_a_pulled_checkpoint_stands_for_it(five, tmp_path):
    shutil.copy(five, tmp_path / "share.safetensors")
    result = run("tasks", tmp_path)
    assert result.exit_code == 0, result.output
    assert len(result.output.split()) == 5


# -- 2. Hub errors -----------------------------------------------------------------------------


@pytest.fixture
def no_login(tmp_path, monkeypatch):
    """No token anywhere: no HF_TOKEN, and the saved-login file points at an empty place."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))


@pytest.mark.parametrize("command", [["pull", "alice/my-share", "-o", "OUT"], ["info", "hf://alice/my-share"]])
def test_no_connection_is_named_as_such_and_offline_mode_is_not_blamed(command, tmp_path, monkeypatch, no_login):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port
    line = one_error_line(run(*[str(tmp_path / "x") if a == "OUT" else a for a in command]))
    assert "no connection to the Hub at http://127.0.0.1:9" in line
    assert "HF_HUB_OFFLINE" not in line


def test_offline_mode_is_named_when_it_is_set(tmp_path, monkeypatch, no_login):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_error_line(run("pull", "alice/my-share", "-o", tmp_path / "x"))
    assert "offline mode (HF_HUB_OFFLINE) is on and there is no cached copy" in line


def test_push_without_connection_or_login_names_both(five, monkeypatch, no_login):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    line = one_error_line(run("push", five, "alice/x"))
    assert "no connection to the Hub" in line and "not logged in" in line


def test_push_refused_for_want_of_a_token_says_not_logged_in(five, tmp_path, monkeypatch, no_login):
    server = UploadServer(tmp_path / "mirrors", require_token="hf_needed")
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        line = one_error_line(run("push", five, "alice/x"))
        assert "not logged in" in line and "hf auth login" in line
    finally:
        server.stop()


# -- 3. the verdict --------------------------------------------------------------------------


def test_a_fixed_k_with_large_errors_claims_no_sharing_and_warns(real, tmp_path):
    result = run("merge", real / GPT2, "-o", tmp_path / "k.safetensors", "--k", "1", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["totals"]["mean_error"] > 0.10
    verdict = summary["plan"]["verdict"]
    assert "share structure" not in verdict.replace("Whether these adapters share structure", "")
    assert "not judged under this rule" in verdict and "share-convert plan" in verdict
    assert "Warning: the errors are large" in verdict


def test_the_default_verdict_compares_storage_with_truncation_at_the_same_error(nine):
    summary = api.info(nine)
    plan = summary["plan"]
    assert plan["no_sharing_params"] == plan["chosen_params"]  # nothing is shared in these adapters
    assert plan["verdict"].startswith("These adapters share little")
    assert "Warning" not in plan["verdict"]


def test_adapters_built_on_one_subspace_are_said_to_share_structure(tmp_path):
    from share_convert.io import write_synthetic_adapters

    write_synthetic_adapters(tmp_path / "a", count=8, layers=1, hidden=64, rank=8, shared_rank=4)
    summary = api.merge([str(tmp_path / "a")], tmp_path / "c.safetensors")
    saved = 1 - summary["plan"]["chosen_params"] / summary["plan"]["no_sharing_params"]
    assert saved >= 0.10
    assert summary["plan"]["verdict"].startswith("These adapters share structure")
    assert f"store {saved:.0%} fewer LoRA parameters" in summary["plan"]["verdict"]


# -- 4. --k 0 ----------------------------------------------------------------------------------


def test_k_zero_without_private_rank_is_refused_and_nothing_is_written(real, tmp_path):
    out = tmp_path / "k0.safetensors"
    line = one_error_line(run("merge", real / GPT2, "-o", out, "--k", "0"))
    assert "--k 0 without --private-rank stores nothing" in line
    assert not out.exists()


# -- 5. remove --refit -------------------------------------------------------------------------


def test_a_refit_that_makes_a_task_worse_than_the_target_is_refused_without_force(nine, tmp_path):
    out = tmp_path / "r.safetensors"
    line = one_error_line(run("remove", nine, "--task", "gsj-rifat__tmp", "--refit", "-o", out))
    assert "refitting would make" in line and "winkitee__imdb-checkpoint-1000" in line and "--force" in line
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_refit_with_force_is_written_and_reports_the_bounds(nine, tmp_path):
    out = tmp_path / "r.safetensors"
    result = run("remove", nine, "--task", "gsj-rifat__tmp", "--refit", "-o", out, "--force", "--json")
    assert result.exit_code == 0, result.output
    tasks = {t["task"]: t for t in json.loads(result.output)["tasks"]}
    assert tasks["winkitee__imdb-checkpoint-1000"]["error_is_bound"]
    assert tasks["winkitee__imdb-checkpoint-1000"]["max_error"] > 0.05


def test_remove_without_refit_changes_no_remaining_task(nine, tmp_path):
    out = tmp_path / "r.safetensors"
    assert run("remove", nine, "--task", "gsj-rifat__tmp", "-o", out).exit_code == 0
    before = {t["task"]: t["mean_error"] for t in api.info(nine)["tasks"]}
    after = {t["task"]: t["mean_error"] for t in api.info(out)["tasks"]}
    assert after == {t: e for t, e in before.items() if t != "gsj-rifat__tmp"}


def test_refit_help_says_what_it_trades():
    text = " ".join(run("remove", "--help").output.split())
    assert "their errors may grow up to the error target" in text and "unless --force" in text


# -- 6. the Why line ---------------------------------------------------------------------------


def test_why_after_add_counts_every_stored_parameter_and_does_not_repeat_the_merge(real, tmp_path):
    first = tmp_path / "a.safetensors"
    adapters = sorted((real / GPT2).iterdir())
    assert run("merge", *adapters[:3], "-o", first).exit_code == 0
    added = api.add(first, [str(adapters[3])], tmp_path / "b.safetensors")
    storage = added["totals"]["storage"]
    assert added["plan"]["chosen_params"] == sum(storage[p]["params"] for p in ("bases", "coefficients", "private"))
    assert added["plan"]["chosen_params"] > api.info(first)["plan"]["chosen_params"]
    assert added["plan"]["why"].startswith("after this update (add)")
    removed = api.remove(tmp_path / "b.safetensors", [adapters[0].name], tmp_path / "c.safetensors")
    assert removed["plan"]["why"].startswith("after this update (remove)")


def test_why_says_one_module_in_the_singular():
    from share_convert.report import why

    modules = {
        "m": {
            "alternatives": {"shared": None, "private": 10},
            "target_relaxed": True,
            "tasks": {},
        }
    }
    text = why(modules, 10, "merge")["why"]
    assert "in 1 module " in text and "1 modules" not in text


# -- 7. the rank column ------------------------------------------------------------------------


def test_ranks_that_differ_between_modules_are_shown_as_a_range(nine):
    summary = api.info(nine)
    task = next(t for t in summary["tasks"] if t["task"] == "gsj-rifat__tmp")
    private = task["ranks"]["private"]
    assert private["min"] < private["max"] and private["min"] <= private["mean"] <= private["max"]
    result = run("info", nine)
    assert f"0+{private['min']}–{private['max']}" in result.output.replace("\n", "")
    assert "shown as a range" in result.output


# -- 8. extract --rank -------------------------------------------------------------------------


def test_extract_rank_reports_the_error_the_truncation_adds(five, tmp_path):
    from safetensors.torch import load_file

    task = "winkitee__peft-lora-gpt2"
    result = run("extract", five, "--task", task, "--rank", "2", "-o", tmp_path / "r2", "--json")
    assert result.exit_code == 0, result.output
    added = json.loads(result.output)[0]["truncation_error"]
    assert run("extract", five, "--task", task, "-o", tmp_path / "full").exit_code == 0
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    cut = load_file(tmp_path / "r2" / "adapter_model.safetensors")
    ckpt = Checkpoint(five)
    measured = []
    for module, info in ckpt.modules.items():
        if task not in info["tasks"]:
            continue

        def delta(t, module=module):
            return t[f"{module}.lora_B.weight"].double() @ t[f"{module}.lora_A.weight"].double()

        measured.append(float(torch.linalg.norm(delta(full) - delta(cut))) / info["tasks"][task]["norm"])
    assert added["mean"] == pytest.approx(sum(measured) / len(measured), rel=1e-4)
    assert added["max"] == pytest.approx(max(measured), rel=1e-4)
    text = run("extract", five, "--task", task, "--rank", "2", "-o", tmp_path / "again").output
    assert f"adds {added['mean']:.2%} mean ΔW error" in " ".join(text.split())


# -- 9. file modes -----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_extracted_files_follow_the_umask(five, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert run("extract", five, "--all", "-o", tmp_path / "all").exit_code == 0
    finally:
        os.umask(old)
    for path in (tmp_path / "all").rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))
    assert stat.S_IMODE((tmp_path / "all").stat().st_mode) == 0o777 & ~umask


# -- 10. demo ----------------------------------------------------------------------------------


def test_demo_says_its_temporary_files_are_gone_and_how_to_keep_them():
    result = run("demo")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "removed when the demo ends" in text and "--keep DIR" in text


def test_demo_keep_keeps_the_files_and_json_says_where(tmp_path):
    result = run("demo", "--keep", tmp_path / "d", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["kept"] and Path(data["folder"]) == tmp_path / "d"
    assert (tmp_path / "d" / "share.safetensors").is_file()
    assert (Path(data["extract"]["path"]) / "adapter_model.safetensors").is_file()


# -- 11. bare weights file without a config ----------------------------------------------------


def test_a_bare_file_without_config_names_both_config_names(real, tmp_path):
    shutil.copy(real / PEFT_FOLDER / "adapter_model.safetensors", tmp_path / "x.safetensors")
    line = one_error_line(run("merge", tmp_path / "x.safetensors", "-o", tmp_path / "o.safetensors"))
    assert "x.json or x_config.json" in line and "--alpha" in line


# -- 12. plan ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planned(real) -> dict:
    return api.plan([str(real / GPT2)])


def test_plan_says_what_its_cells_are_and_marks_cells_far_from_their_budget(real):
    result = run("plan", real / GPT2)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "Each cell: mean ΔW error @ the compression that rule actually reaches" in text
    assert "*:" in text and "away from their budget" in text


def test_plan_reports_the_ratio_merge_reports(planned, five):
    assert round(planned["default_plan"]["ratio"], 2) == round(api.info(five)["totals"]["ratio"], 2)


def test_plot_ticks_are_labelled_and_do_not_crowd(planned, tmp_path):
    from share_convert.report import plot_curves, ratio_ticks

    ticks = ratio_ticks(planned)
    assert len(ticks) >= 5
    assert all(b / a >= 1.3 for a, b in zip(ticks, ticks[1:]))
    plot_curves(planned, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


# -- 13. adapters with a zero ΔW ---------------------------------------------------------------


def test_a_zero_adapter_is_named_in_a_warning_and_left_out_of_the_mean(tmp_path):
    mods = ("layers.0.q", "layers.1.q")
    for i in range(3):
        write_adapter(tmp_path / "in" / f"t{i}", {m: random_factors(16, 12, 4, 10 * i + j) for j, m in enumerate(mods)})
    zero = {m: (random_factors(16, 12, 4, 99)[0], torch.zeros(16, 4)) for m in mods}  # lora_B untouched: ΔW = 0
    write_adapter(tmp_path / "in" / "untrained", zero)
    result = run("merge", tmp_path / "in", "-o", tmp_path / "c.safetensors", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert [t["task"] for t in summary["tasks"] if t["zero_delta"]] == ["untrained"]
    assert any("untrained" in w and "zero ΔW" in w for w in summary["warnings"])
    others = [t["mean_error"] for t in summary["tasks"] if t["task"] != "untrained"]
    assert summary["totals"]["mean_error"] == pytest.approx(sum(others) / len(others))
    shown = run("info", tmp_path / "c.safetensors").output
    assert "Warning:" in shown and "untrained" in shown


# -- CLI conventions ---------------------------------------------------------------------------


def test_help_shows_flags_without_a_type_required_marks_and_choices():
    text = run("merge", "--help").output
    assert "<bool>" not in text
    assert "[required]" in text.split("--output")[1].split("--k")[0]
    for choices in ("<auto|cpu|cuda>", "<mean|max>", "<equal|norm>", "<auto|float32|bfloat16|float16>"):
        assert choices in text


def test_the_help_default_target_is_the_engine_default():
    from share_convert import ConsolidationConfig

    text = run("merge", "--help").output.split("--target-error")[1].split("--")[0]
    assert f"[default: {ConsolidationConfig().target_error:g}]" in " ".join(text.split())


def test_a_bad_choice_is_refused_with_the_choices():
    result = run("merge", "x", "-o", "y", "--device", "tpu")
    assert result.exit_code == 2 and "auto" in result.output and "cuda" in result.output


def test_push_takes_the_repository_like_pull_and_the_old_option_still_works(five, tmp_path, monkeypatch, no_login):
    server = UploadServer(tmp_path / "mirrors")
    try:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        result = run("push", five, "alice/new", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["repo"] == "alice/new"
        assert (tmp_path / "mirrors/models/alice/new/share.safetensors").is_file()
        old = run("push", five, "--repo", "alice/old")
        assert old.exit_code == 0, old.output
        assert "--repo is deprecated" in old.output and (tmp_path / "mirrors/models/alice/old").is_dir()
    finally:
        server.stop()


def test_pull_json_says_where_the_checkpoint_went(five, tmp_path, monkeypatch, no_login):
    from .hub_servers import Olah

    olah = Olah(tmp_path / "olah")
    uploads = UploadServer(olah.mirrors)
    try:
        monkeypatch.setenv("HF_ENDPOINT", uploads.url)
        assert run("push", five, "alice/pulled").exit_code == 0
        monkeypatch.setenv("HF_ENDPOINT", olah.url)
        result = run("pull", "alice/pulled", "-o", tmp_path / "p", "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert data == {
            "repo": "alice/pulled",
            "revision": None,
            "checkpoint": str(tmp_path / "p" / "share.safetensors"),
        }
        assert Path(data["checkpoint"]).read_bytes() == five.read_bytes()
    finally:
        uploads.stop()
        olah.stop()


def test_storage_rows_give_every_tensor_its_role(tmp_path):
    from share_convert.io import write_synthetic_adapters
    from share_convert.report import storage_role

    write_synthetic_adapters(tmp_path / "a", count=6, layers=1, hidden=64, rank=8, shared_rank=4)
    summary = api.merge([str(tmp_path / "a")], tmp_path / "c.safetensors")
    storage = summary["totals"]["storage"]
    for role in ("bases", "grams", "coefficients", "records"):
        assert storage[role]["params"] > 0, role
    assert sum(p["bytes"] for p in storage.values()) == summary["totals"]["checkpoint_bytes"]
    names = Checkpoint(tmp_path / "c.safetensors").manifest["tensors"]
    assert {storage_role(n) for n in names if n.endswith(("coefs_B", "coef_B"))} == {"coefficients"}
    assert {storage_role(n) for n in names if n.endswith("basis_B")} == {"bases"}
    assert "records" in run("info", tmp_path / "c.safetensors").output
