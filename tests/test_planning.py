"""The planner on real adapters: never worse than the extremes it contains, targets met, curves honest."""

import json

import pytest
import torch

from share_convert.analysis import plan_collection
from share_convert.checkpoint import Checkpoint
from share_convert.consolidation import ConsolidationConfig, ModuleStack, check_compatible, merge, prepare_member
from share_convert.extraction import extract
from share_convert.formats import AdapterSource, open_adapters


def planners(sources, config=ConsolidationConfig()):
    for name, (n, d, idx) in check_compatible(sources).items():
        members = [prepare_member(sources[i].task, sources[i].read_module(name), config) for i in idx]
        stack = ModuleStack(n, d, members, config)
        yield name, stack.fit(stack.full)[4]


@pytest.fixture(scope="module")
def gpt2_planners(real):
    sources = open_adapters([str(real / "gpt2-c_attn"), str(real / "gpt2-c_attn+c_proj")])
    return list(planners(sources))


@pytest.mark.parametrize("ratio", [1.1, 1.5, 2, 3, 4, 8, 16])
def test_at_any_budget_the_plan_is_never_worse_than_either_extreme(gpt2_planners, ratio):
    for _name, planner in gpt2_planners:
        budget = int(planner.original_params() / ratio)
        plan = planner.for_budget(budget)
        assert plan.params <= budget
        assert plan.mean_error <= planner.pure_sharing(budget).mean_error + 1e-9  # q = 0
        assert plan.mean_error <= planner.truncation(budget).mean_error + 1e-9  # k = 0, equal ranks
        assert plan.mean_error <= planner.truncation_allocated(budget).mean_error + 1e-9  # k = 0, allocated


@pytest.mark.parametrize("error", [0.02, 0.1, 0.3])
def test_the_target_plan_is_the_cheapest_of_the_extremes_or_cheaper(gpt2_planners, error):
    for _name, planner in gpt2_planners:
        plan = planner.for_target(error)
        assert plan.mean_error <= error + 1e-9
        pure = planner.pure_sharing_for_target(error)
        if pure is not None:
            assert plan.params <= pure.params
        assert plan.params <= planner.original_params()


def test_predicted_errors_are_the_errors_of_the_stored_tensors(tmp_path, real):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    merge(sources, tmp_path / "c.safetensors", ConsolidationConfig(budget="3x"))
    predicted = {
        name: dict(zip([s.task for s in sources], p.for_budget(int(p.original_params() / 3)).predicted_errors))
        for name, p in planners(sources)
    }
    for module, info in Checkpoint(tmp_path / "c.safetensors").modules.items():
        for t, rec in info["tasks"].items():
            assert rec["error"] == pytest.approx(predicted[module][t], abs=1e-5)


def test_default_merge_is_never_worse_than_the_extremes_at_the_same_storage(real):
    for groups in (["gpt2-c_attn"], ["gpt2-c_attn", "gpt2-c_attn+c_proj"]):
        sources = open_adapters([str(real / g) for g in groups])
        result = plan_collection(sources)
        dp = result["default_plan"]
        assert dp["mean_error"] <= dp["at_same_storage"]["shared"] + 1e-9
        assert dp["mean_error"] <= dp["at_same_storage"]["private"] + 1e-9


def test_plan_curves_show_the_planner_below_both_extremes(real):
    result = plan_collection(open_adapters([str(real / "gpt2-c_attn")]), ratios=(2.0, 4.0))
    for row in result["curves"]:
        assert row["mixed"]["mean_error"] <= row["shared"]["mean_error"] + 1e-9
        assert row["mixed"]["mean_error"] <= row["private"]["mean_error"] + 1e-9
    assert result["verdict"].startswith("These adapters share")


def test_planted_shared_structure_is_detected(tmp_path):
    from share_convert.synthetic import write_synthetic_adapters

    write_synthetic_adapters(tmp_path / "a", count=8, hidden=48, rank=8, shared_rank=6, noise=0.001)
    result = plan_collection(open_adapters([str(tmp_path / "a")]), ratios=(2.0, 4.0))
    assert "share enough structure" in result["verdict"]


def test_private_corrections_survive_extract(tmp_path, real):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    merge(sources, tmp_path / "c.safetensors", ConsolidationConfig(k=3, private_rank=2))
    ckpt = Checkpoint(tmp_path / "c.safetensors")
    assert all(t["private_rank"] == 2 for m in ckpt.modules.values() for t in m["tasks"].values())
    for src in sources:
        out = extract(ckpt, src.task, tmp_path / src.task)
        assert out.rank <= 3 + 2
        exported = AdapterSource(out.path)
        for module in ckpt.modules:
            Bh, Ah = ckpt.reconstruction(src.task, module)
            f = exported.read_module(module)
            assert torch.allclose(f.B.double() @ f.A.double(), Bh @ Ah.T, atol=1e-6)


def test_plan_command_prints_curves_and_a_verdict_and_draws_a_png(tmp_path, real):
    from typer.testing import CliRunner

    from share_convert.cli import app

    r = CliRunner().invoke(app, ["plan", str(real / "gpt2-c_attn"), "--plot", str(tmp_path / "c.png")])
    assert r.exit_code == 0, r.output
    assert "These adapters share" in r.output
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(CliRunner().invoke(app, ["plan", str(real / "gpt2-c_attn"), "--json"]).output)
    assert {"curves", "default_plan", "verdict"} <= set(data)
