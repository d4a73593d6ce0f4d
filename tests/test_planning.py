"""The planner on real adapters: never worse than the extremes it contains, targets met, curves honest."""

import json

import pytest
import torch

from share_convert.checkpoint import Checkpoint
from share_convert.engine import (
    ConsolidationConfig,
    FrozenTasks,
    ModulePlanner,
    ModuleStack,
    check_compatible,
    merge,
    prepare_member,
)
from share_convert.io import AdapterSource, extract, open_adapters
from share_convert.report import plan_collection


def planners(sources, config=ConsolidationConfig()):
    for name, (n, d, idx) in check_compatible(sources).items():
        members = [prepare_member(sources[i].task, sources[i].read_module(name), config) for i in idx]
        stack = ModuleStack(n, d, members, config)
        yield name, stack.fit(stack.full)[4]


@pytest.fixture(scope="module")
def gpt2_planners(real):
    sources = open_adapters([str(real / "gpt2-c_attn"), str(real / "gpt2-c_attn+c_proj")])
    return list(planners(sources))


@pytest.fixture(scope="module")
def plan_of(real):
    """``plan_of(*groups)``: plan_collection of the real adapters of ``groups`` (default ratios), made
    once per module: several tests read the same plans (nine GPT-2 adapters take seconds)."""
    plans: dict[tuple[str, ...], dict] = {}

    def get(*groups: str) -> dict:
        if groups not in plans:
            plans[groups] = plan_collection(open_adapters([str(real / g) for g in groups]))
        return plans[groups]

    return get


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


@pytest.mark.parametrize("metric", ["mean", "max"])
def test_a_search_at_one_target_does_not_change_the_plan_at_another(real, metric):
    """A planner keeps what it computed per k between searches (a precision plan searches at many
    targets): its plans are those a fresh planner finds, whatever was searched before."""
    sources = open_adapters([str(real / "gpt2-c_attn"), str(real / "gpt2-c_attn+c_proj")])
    targets = [0.3, 0.02, 0.1, 0.05, 0.3, 0.0]
    for _name, planner in list(planners(sources))[:3]:
        fresh = [next(p for n, p in planners(sources) if n == _name).for_target(e, metric) for e in targets]
        for error, alone in zip(targets, fresh):
            plan = planner.for_target(error, metric)
            assert (plan.k_B, plan.k_A, plan.private_ranks, plan.params) == (
                alone.k_B, alone.k_A, alone.private_ranks, alone.params
            )  # fmt: skip
            assert plan.predicted_errors == alone.predicted_errors


def frozen_of(fits, prior=0.0):
    """The tasks of ``fits`` as frozen tasks (zero-padded to one rank), each with error ``prior`` so far."""
    r = max(f.rank for f in fits)
    pad = lambda E: torch.nn.functional.pad(E, (0, r - E.shape[1]))  # noqa: E731
    return FrozenTasks(
        Eb=torch.stack([pad(f.Eb) for f in fits]),
        Ea=torch.stack([pad(f.Ea) for f in fits]),
        norm2=torch.tensor([f.norm2 for f in fits], dtype=torch.float64),
        ranks=torch.tensor([f.rank for f in fits]),
        prior=torch.tensor([prior] * len(fits), dtype=torch.float64),
        scale=torch.tensor([f.norm2**-0.5 if f.norm2 > 0 else 0.0 for f in fits], dtype=torch.float64),
    )


def test_frozen_tasks_have_the_errors_they_would_have_unfrozen_at_q0(gpt2_planners):
    for _name, planner in gpt2_planners:
        frozen = frozen_of(planner.fits)
        for k in (1, 4, 16, max(planner.K_B, planner.K_A)):
            expected = planner.shared_errors(*planner.sides(k))
            assert frozen.errors(*planner.sides(k)).tolist() == pytest.approx(expected, abs=1e-12)
        assert frozen.coef_params(8, 8) + 8 * planner.n + 8 * planner.d + 128 == planner.shared_params(8, 8)


@pytest.mark.parametrize("metric", ["mean", "max"])
def test_a_target_counts_frozen_tasks_but_gives_them_no_private_directions(gpt2_planners, metric):
    for _name, planner in gpt2_planners:
        half = len(planner.fits) // 2
        mixed = ModulePlanner(planner.n, planner.d, planner.fits[half:], frozen=frozen_of(planner.fits[:half]))
        plan = mixed.for_target(0.1, metric)
        assert len(plan.private_ranks) == len(planner.fits) - half
        frozen_errors = mixed.frozen.errors(plan.k_B, plan.k_A).tolist()
        every = frozen_errors + plan.predicted_errors
        assert plan.frozen_count == half and plan.frozen_error_sum == pytest.approx(sum(frozen_errors))
        if max(every) < 1:  # a plan that keeps sharing must meet the target over all tasks
            value = max(every) if metric == "max" else sum(every) / len(every)
            assert value <= 0.1 + 1e-9
            assert plan.mean_error == pytest.approx(sum(every) / len(every))


def test_predicted_errors_are_the_errors_of_the_stored_tensors(tmp_path, real):
    from share_convert.engine import plan_group

    sources = open_adapters([str(real / "gpt2-c_attn")])
    merge(sources, tmp_path / "c.safetensors", ConsolidationConfig(budget="3x", precision="float"))
    config = ConsolidationConfig()
    for module, info in Checkpoint(tmp_path / "c.safetensors").modules.items():
        n, d, idx = check_compatible(sources)[module]
        members = [prepare_member(sources[i].task, sources[i].read_module(module), config) for i in idx]
        # a budget merge gives each module an error target (recorded): its plan at that target
        plan = plan_group(ModuleStack(n, d, members, config), ConsolidationConfig(target_error=info["target_error"]))[2]
        predicted = dict(zip([m.task for m in members], plan.predicted_errors))
        assert any(rec["private_rank"] for rec in info["tasks"].values()) or info["k_B"]
        for t, rec in info["tasks"].items():
            assert rec["error"] == pytest.approx(predicted[t], abs=1e-5)


def test_a_budget_plan_is_never_worse_than_the_target_plan_at_the_same_storage(tmp_path, real, merged):
    # in parameters: --precision float (a budget with precisions counts bytes)
    groups = ("gpt2-c_attn", "gpt2-c_attn+c_proj")
    default = Checkpoint(merged(*groups, precision="float"))
    stored = sum(info["params"] for info in default.modules.values())
    original = sum(
        rec["original_rank"] * (info["out_features"] + info["in_features"])
        for info in default.modules.values()
        for rec in info["tasks"].values()
    )
    ratio = original / stored * (1 - 1e-9)  # a budget of the default plan's storage (and a hair more)
    sources = open_adapters([str(real / g) for g in groups])
    merge(sources, tmp_path / "b.safetensors", ConsolidationConfig(budget=f"{ratio!r}x", precision="float"))
    budget = Checkpoint(tmp_path / "b.safetensors")
    assert sum(info["params"] for info in budget.modules.values()) <= original / ratio

    def mean_error(ckpt: Checkpoint) -> float:
        errors = [rec["error"] for info in ckpt.modules.values() for rec in info["tasks"].values()]
        return sum(errors) / len(errors)

    assert mean_error(budget) <= mean_error(default) + 1e-6


def test_default_merge_is_never_worse_than_the_extremes_at_the_same_storage(plan_of):
    for groups in (["gpt2-c_attn"], ["gpt2-c_attn", "gpt2-c_attn+c_proj"]):
        dp = plan_of(*groups)["default_plan"]
        assert dp["mean_error"] <= dp["at_same_storage"]["shared"] + 1e-9
        assert dp["mean_error"] <= dp["at_same_storage"]["private"] + 1e-9


def test_plan_curves_show_the_planner_below_both_extremes(plan_of):
    result = plan_of("gpt2-c_attn")
    for row in result["curves"]:
        assert row["mixed"]["mean_error"] <= row["shared"]["mean_error"] + 1e-9
        assert row["mixed"]["mean_error"] <= row["private"]["mean_error"] + 1e-9
    assert result["verdict"].startswith("These adapters share")


def test_planted_shared_structure_is_detected(tmp_path):
    from share_convert.io import write_synthetic_adapters

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
    """On two of the GPT-2 adapters: the command's output is what is tested (the plans' figures are
    tested above, on all of them)."""
    from typer.testing import CliRunner

    from share_convert.cli import app

    two = [str(real / "gpt2-c_attn" / name) for name in ("winkitee__imdb-checkpoint-125", "winkitee__peft-lora-gpt2")]
    r = CliRunner().invoke(app, ["plan", *two, "--plot", str(tmp_path / "c.png")])
    assert r.exit_code == 0, r.output
    assert "These adapters share" in r.output
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(CliRunner().invoke(app, ["plan", *two, "--json"]).output)
    assert {"curves", "default_plan", "verdict"} <= set(data)


def test_a_zero_adapter_does_not_loosen_the_target_of_the_others(tmp_path):
    from share_convert import ConsolidationConfig
    from share_convert.checkpoint import Checkpoint
    from share_convert.engine import merge
    from share_convert.io import open_adapters

    from .builders.adapters import random_factors, write_adapter

    paths = [write_adapter(tmp_path / f"t{i}", {"layers.0.q": random_factors(32, 32, 8, seed=i)}) for i in range(3)]
    A, B = random_factors(32, 32, 8, seed=9)
    paths.append(write_adapter(tmp_path / "zero", {"layers.0.q": (A, torch.zeros_like(B))}))
    merge(open_adapters([str(p) for p in paths]), tmp_path / "c.safetensors", ConsolidationConfig(target_error=0.4))
    (info,) = Checkpoint(tmp_path / "c.safetensors").modules.values()
    errors = [r["error"] for t, r in info["tasks"].items() if t != "zero"]
    assert sum(errors) / len(errors) <= 0.4 + 1e-9


def test_a_task_merged_again_from_a_checkpoint_keeps_its_original_rank(tmp_path):
    from share_convert import ConsolidationConfig
    from share_convert.checkpoint import Checkpoint
    from share_convert.engine import merge
    from share_convert.io import checkpoint_tasks, open_adapters

    from .builders.adapters import random_factors, write_adapter

    paths = [write_adapter(tmp_path / f"t{i}", {"layers.0.q": random_factors(24, 20, 6, seed=i)}) for i in range(3)]
    merge(open_adapters([str(p) for p in paths]), tmp_path / "a.safetensors", ConsolidationConfig(k=3))
    first = Checkpoint(tmp_path / "a.safetensors")
    merge(checkpoint_tasks(first), tmp_path / "b.safetensors", ConsolidationConfig(k=3))
    (info,) = Checkpoint(tmp_path / "b.safetensors").modules.values()
    assert {r["original_rank"] for r in info["tasks"].values()} == {6}
    assert all(r["rank"] <= 3 for r in info["tasks"].values())


def test_the_plan_curve_of_the_mix_is_never_above_the_default_plan(plan_of):
    result = plan_of("gpt2-c_attn", "gpt2-c_attn+c_proj")
    default = result["default_plan"]
    # every budget with at least the default plan's storage: the mix (spent across modules) errs no more
    rows = [row for row in result["curves"] if row["budget_ratio"] <= default["ratio_params"]]  # curves: parameters
    assert rows and all(row["mixed"]["mean_error"] <= default["mean_error"] + 1e-9 for row in rows)
