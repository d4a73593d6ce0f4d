"""Wide bases at once (issue 26): the Gram route, the sharing floor, one wide fit, a budget read once."""

from pathlib import Path

import pytest
import torch

from share_convert.engine import ConsolidationConfig, ModuleStack, check_compatible, pipeline, plan_group
from share_convert.engine import budget as budget_pass
from share_convert.engine import members as members_module
from share_convert.engine import read_members as read_module_members
from share_convert.engine.sharing_floor import SharingFloor
from share_convert.io import open_adapters, write_synthetic_adapters
from share_convert.math.linalg import GramDecomposition

TARGET = ConsolidationConfig()


def one_module(folder: Path, **shape) -> ModuleStack:
    """The stack of one q_proj module of ``write_synthetic_adapters(**shape)``."""
    paths = write_synthetic_adapters(folder, layers=1, targets=("q_proj",), **shape)
    sources = open_adapters([str(p) for p in paths])
    ((name, (n, d, idx)),) = check_compatible(sources).items()
    return ModuleStack(n, d, read_module_members([sources[i] for i in idx], name, TARGET), TARGET)


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> ModuleStack:
    """12 rank-16 adapters of one 256 × 256 module: a planted rank-48 subspace and 5% of their own
    directions (192 stacked columns: past the columns fitted exactly, so the wide route applies)."""
    folder = tmp_path_factory.mktemp("noisy")
    return one_module(folder, count=12, hidden=256, rank=16, shared_rank=48, noise=0.05, seed=3)


def noisy_stack(read: ModuleStack) -> ModuleStack:
    """A fresh stack of the same members (nothing fitted yet)."""
    return ModuleStack(read.n, read.d, read.members, TARGET)


def projector(U: torch.Tensor) -> torch.Tensor:
    U = U.double()
    return U @ U.T


@pytest.mark.parametrize("shape", [(300, 120), (90, 200)], ids=["tall", "wide"])
def test_the_gram_route_spans_the_top_singular_directions(shape):
    gen = torch.Generator().manual_seed(0)
    n, m = shape
    spectrum = torch.logspace(0, -2, min(n, m))  # well separated: the top 20 are determined
    U0 = torch.linalg.qr(torch.randn(n, min(n, m), generator=gen)).Q
    V0 = torch.linalg.qr(torch.randn(m, min(n, m), generator=gen)).Q
    stack = (U0 * spectrum) @ V0.T
    gram = GramDecomposition(stack)
    U = gram.basis(20)
    assert torch.allclose(U.T @ U, torch.eye(20), atol=1e-5)
    assert torch.dist(projector(U), projector(U0[:, :20])) < 1e-3
    assert torch.allclose(gram.S[:20], spectrum[:20].double(), rtol=1e-4)
    # the planner's coordinates are those of the basis formed (each row up to its sign)
    coords, exact = gram.coordinates(20), (U.T @ stack).double()
    assert torch.allclose(coords.T @ coords, exact.T @ exact, atol=1e-5)


def test_a_narrower_gram_basis_is_the_prefix_of_a_wider_one():
    stack = torch.randn(200, 150, generator=torch.Generator().manual_seed(1))
    gram = GramDecomposition(stack)
    assert torch.allclose(gram.basis(40)[:, :10], gram.basis(10), atol=1e-5)


@pytest.mark.parametrize("metric", ["mean", "max"])
@pytest.mark.parametrize("target", [0.02, 0.05, 0.1])
def test_no_plan_costs_less_than_the_floor_at_its_width(noisy, metric, target):
    stack = noisy_stack(noisy)
    planner = stack.fit(stack.full)[4]  # every direction, exactly: every plan the search can reach
    floor = SharingFloor(stack.no_basis_planner(), target, metric)
    found = 0
    for k in planner.grid():
        plan = planner._target_at(*planner.sides(k), target, metric) if k else None
        if plan is None or plan.k_B == 0:
            continue
        found += 1
        assert floor.cap(plan.params, stack.full) >= min(plan.k_B, plan.k_A)
        if plan.k_B <= floor.R:
            assert plan.params >= int(floor.bounds[plan.k_B - 1])
    assert found


def test_the_floor_is_reached_when_every_task_lies_in_one_subspace(tmp_path):
    stack = one_module(tmp_path, count=6, hidden=64, rank=8, shared_rank=8, noise=0.0)
    plan = stack.fit(8)[4].pure(8, 8)  # the shared subspace holds every task: error 0 at width 8
    floor = SharingFloor(stack.no_basis_planner(), 0.01, "mean")
    assert max(plan.predicted_errors) < 1e-3  # float32 rounding: the plan meets the target
    assert plan.params == int(floor.bounds[7])


def test_sharing_ruled_out_by_the_floor_fits_no_basis_and_plans_as_the_search_does(tmp_path):
    # one adapter of high rank: a basis can only hold what its own directions hold, at more storage
    stack = one_module(tmp_path, count=1, hidden=160, rank=136, shared_rank=8, noise=0.5)
    beta, alpha, plan, _ = plan_group(stack, TARGET)
    searched = ModuleStack(stack.n, stack.d, stack.members, TARGET).fit(stack.full)[4].for_target(0.05)
    assert plan.kind == "private" and beta.shape[1] == alpha.shape[1] == 0
    assert not stack._fits and not stack._widened  # no basis was fitted
    assert (plan.params, plan.private_ranks) == (searched.params, searched.private_ranks)
    assert plan.alternatives["shared_at_least"] > plan.params


def test_the_report_of_a_module_ruled_out_says_what_the_floor_found(tmp_path):
    from share_convert import api

    paths = write_synthetic_adapters(
        tmp_path / "a", count=1, layers=1, targets=("q_proj",), hidden=160, rank=136, shared_rank=8, noise=0.5
    )
    report = api.merge([str(p) for p in paths], tmp_path / "c.safetensors")
    assert report["plan"]["pure_sharing_params"] is None
    assert "pure sharing would need at least" in report["plan"]["why"]
    assert "cannot meet the target" not in report["plan"]["why"]


def test_a_plan_wider_than_the_first_fit_comes_from_one_wide_fit(noisy):
    stack = noisy_stack(noisy)
    beta, alpha, plan, _ = plan_group(stack, TARGET)
    assert plan.k_B > 48  # the set needs a basis wider than the first fit
    assert [key[0] for key in stack._widened] == ["wide"]  # one wide fit, no widening
    assert beta.shape[1] >= plan.k_B and alpha.shape[1] >= plan.k_A
    assert torch.allclose(beta[:, : plan.k_B].T @ beta[:, : plan.k_B], torch.eye(plan.k_B), atol=1e-5)
    exact = ModuleStack(stack.n, stack.d, stack.members, TARGET).fit(stack.full)[4].for_target(0.05)
    assert plan.params <= exact.params * 1.01  # as small as the exact search's, within rounding of k


def test_a_wide_fit_plan_in_fewer_bits_encodes_with_bases_as_wide_as_it_uses(noisy):
    # a wide fit forms only the vectors a plan keeps: the plan in int8 (and its fallbacks) may keep more
    stack = noisy_stack(noisy)
    from share_convert.engine.consolidation import consolidate_group

    res = consolidate_group("m", stack.n, stack.d, stack.members, TARGET, torch.float32, stack=stack)
    assert [key[0] for key in stack._widened] == ["wide"] and res.plan.k_B > 48
    assert res.tensors["modules/m/basis_B"].shape[1] == res.plan.k_B
    assert res.precision  # stored in fewer bits than float32
    assert sum(r["error"] for r in res.records.values()) / len(res.records) <= TARGET.target_error + 1e-9


def test_a_budget_merge_reads_each_module_once_and_writes_what_two_reads_write(tmp_path, monkeypatch):
    paths = write_synthetic_adapters(tmp_path / "a", count=6, hidden=32, rank=4, shared_rank=4, noise=0.1)
    reads: list[str] = []
    real_read = members_module.read_module_stack

    def counted(sources, module, *args, **kwargs):
        reads.append(module)
        return real_read(sources, module, *args, **kwargs)

    monkeypatch.setattr(members_module, "read_module_stack", counted)
    monkeypatch.setattr(pipeline, "read_module_stack", counted)
    sources = open_adapters([str(p) for p in paths])
    modules = len(check_compatible(sources))
    config = ConsolidationConfig(budget="3x")
    pipeline.merge(sources, tmp_path / "once.safetensors", config, workers=1)
    assert len(reads) == modules and len(set(reads)) == modules
    monkeypatch.setattr(budget_pass, "KEEP_BYTES", 0)  # nothing kept: the second pass reads again
    pipeline.merge(sources, tmp_path / "twice.safetensors", config, workers=1)
    assert len(reads) == 3 * modules
    assert (tmp_path / "once.safetensors").read_bytes() == (tmp_path / "twice.safetensors").read_bytes()
