"""Groups of tasks with separate bases per module (spec, section 6)."""

import torch
from typer.testing import CliRunner

from share_convert import ConsolidationConfig
from share_convert.checkpoint import Checkpoint
from share_convert.cli import app
from share_convert.engine import add, merge, remove
from share_convert.io import AdapterSource, extract, open_adapters, write_synthetic_adapters


def two_families(tmp_path):
    """Six adapters from one planted subspace and six from another: one basis serves them badly."""
    write_synthetic_adapters(
        tmp_path / "a", count=6, layers=1, hidden=96, rank=8, shared_rank=8, noise=0.001, seed=1, prefix="x"
    )
    write_synthetic_adapters(
        tmp_path / "a", count=6, layers=1, hidden=96, rank=8, shared_rank=8, noise=0.001, seed=2, prefix="y"
    )
    return open_adapters([str(tmp_path / "a")])


def test_groups_are_kept_where_they_are_cheaper_at_the_same_error(tmp_path):
    sources = two_families(tmp_path)
    merge(sources, tmp_path / "one.safetensors", ConsolidationConfig(target_error=0.02))
    merge(sources, tmp_path / "grp.safetensors", ConsolidationConfig(target_error=0.02, groups="auto"))
    one, grp = Checkpoint(tmp_path / "one.safetensors"), Checkpoint(tmp_path / "grp.safetensors")
    for module, info in grp.modules.items():
        assert len(info["groups"]) == 2
        families = [{t[0] for t in g["tasks"]} for g in info["groups"]]
        assert sorted(map(sorted, families)) == [["x"], ["y"]]  # the split follows the planted families
        assert info["params"] < one.modules[module]["params"]
        errs = [t["error"] for t in info["tasks"].values()]
        assert sum(errs) / len(errs) <= 0.02 + 1e-6


def test_grouped_checkpoints_extract_verify_add_and_remove(tmp_path):
    sources = two_families(tmp_path)
    merge(sources[:-1], tmp_path / "g.safetensors", ConsolidationConfig(target_error=0.02, groups="auto"))
    runner = CliRunner()
    assert runner.invoke(app, ["verify", str(tmp_path / "g.safetensors")]).exit_code == 0
    ckpt = Checkpoint(tmp_path / "g.safetensors")
    src = sources[0]
    out = extract(ckpt, src.task, tmp_path / "x")
    module = next(iter(ckpt.modules))
    f, e = src.read_module(module), AdapterSource(out.path).read_module(module)
    W, What = f.B.double() @ f.A.double(), e.B.double() @ e.A.double()
    err = float(torch.linalg.norm(W - What) / torch.linalg.norm(W))
    assert abs(err - ckpt.modules[module]["tasks"][src.task]["error"]) < 1e-4
    add(tmp_path / "g.safetensors", sources[-1:], tmp_path / "g2.safetensors")
    g2 = Checkpoint(tmp_path / "g2.safetensors")
    assert sources[-1].task in g2.tasks and g2.history[-1]["op"] == "add"
    assert runner.invoke(app, ["verify", str(tmp_path / "g2.safetensors")]).exit_code == 0
    remove(tmp_path / "g2.safetensors", [sources[0].task], tmp_path / "g3.safetensors")
    assert runner.invoke(app, ["verify", str(tmp_path / "g3.safetensors")]).exit_code == 0


def test_groups_option_is_validated():
    result = CliRunner().invoke(app, ["merge", "x", "-o", "y.safetensors", "--groups", "many"])
    assert result.exit_code == 2 and "--groups" in result.output


def test_adding_to_a_grouped_module_updates_only_the_group_the_new_task_joins(tmp_path):
    sources = two_families(tmp_path)
    xs = [s for s in sources if s.task.startswith("x")]
    old = [s for s in sources if s not in xs[-1:]]
    config = ConsolidationConfig(target_error=0.02, groups="auto")
    merge(old, tmp_path / "g.safetensors", config)
    add(tmp_path / "g.safetensors", xs[-1:], tmp_path / "g2.safetensors")
    before, after = Checkpoint(tmp_path / "g.safetensors"), Checkpoint(tmp_path / "g2.safetensors")
    new = xs[-1].task
    for module, info in after.modules.items():
        assert "groups" in info and after.history[-1]["op"] == "add"
        j = info["tasks"][new]["group"]
        assert all(t[0] == "x" for t in info["groups"][j]["tasks"])  # joined its own family's group
        for g, group in enumerate(info["groups"]):
            if g == j:
                continue
            # the other group is copied byte for byte: bases and its tasks' tensors
            basis = f"modules/{module}/g{g}/basis_B"
            assert not before.has(basis) or after.raw(basis) == before.raw(basis)
            for t in group["tasks"]:
                kept, now = before.task_tensors(t, module), after.task_tensors(t, module)
                assert kept.keys() == now.keys() and all(torch.equal(kept[p], now[p]) for p in kept)
            assert all(info["tasks"][t]["drift"] == 0.0 for t in group["tasks"])
        assert info["tasks"][new]["error"] < 0.05
    assert CliRunner().invoke(app, ["verify", str(tmp_path / "g2.safetensors")]).exit_code == 0


def test_a_modules_typed_entry_gives_its_shape_kind_widths_and_groups_with_their_tasks(tmp_path):
    merge(two_families(tmp_path), tmp_path / "g.safetensors", ConsolidationConfig(target_error=0.02, groups="auto"))
    ckpt = Checkpoint(tmp_path / "g.safetensors")
    for name, info in ckpt.modules.items():
        entry = ckpt.module(name)
        assert (entry.name, entry.shape, entry.kind, entry.dtype) == (
            name,
            (info["out_features"], info["in_features"]),
            info["kind"],
            info["dtype"],
        )
        assert (entry.k_B, entry.k_A, entry.task_names) == (info["k_B"], info["k_A"], tuple(info["tasks"]))
        assert entry.grouped
        stored = [(g["k_B"], g["k_A"], g["kind"], g["params"], tuple(g["tasks"])) for g in info["groups"]]
        assert [(g.k_B, g.k_A, g.kind, g.params, g.tasks) for g in entry.groups] == stored
        assert ckpt.module(name) is entry  # read once
