"""Continual updates: add, merge of checkpoints, remove — without the original adapters."""

import json

import pytest
import torch

from share_convert import ConsolidationConfig, api
from share_convert.checkpoint import Checkpoint
from share_convert.engine import add, merge, remove
from share_convert.errors import DuplicateTaskError, IncompatibleAdaptersError, UnknownTaskError, UnsupportedFormatError
from share_convert.io import CheckpointTask, open_adapters

from .builders.adapters import random_factors, write_adapter

FULL = ConsolidationConfig(k=100_000)
# the first three of the five GPT-2 adapters, in the order open_adapters gives them
GPT2_FIRST_THREE = (
    "gpt2-c_attn/ShutterStack__peft_model",
    "gpt2-c_attn/gsj-rifat__tmp",
    "gpt2-c_attn/winkitee__imdb-checkpoint-1000",
)


def recon(ckpt: Checkpoint, task: str, module: str) -> torch.Tensor:
    B, A = ckpt.reconstruction(task, module)
    return B @ A.T


def dense(src, module):
    f = src.read_module(module)
    return f.B.double() @ f.A.double()


def close(W1, W2, rtol=1e-4):
    return float(torch.linalg.norm(W1 - W2)) <= rtol * float(torch.linalg.norm(W2)) + 1e-10


def test_adding_one_by_one_equals_consolidating_all_at_once_without_truncation(tmp_path, real):
    """Four of the nine GPT-2 adapters, chosen so that the adds meet every case: the first add goes
    into the merged modules with another rank (4, then 8) and another file format (.bin, not
    fan-in-fan-out), the second brings modules the checkpoint does not have (c_proj), and the third
    adds to modules that an add created. The other five add no case (more tasks of the same kinds)
    and cost most of the time: an add's work grows with the old tasks."""
    sources = open_adapters([str(real / "gpt2-c_attn"), str(real / "gpt2-c_attn+c_proj")])
    sources = sources[:2] + sources[5:7]
    assert [s.task for s in sources] == [
        "ShutterStack__peft_model",
        "gsj-rifat__tmp",
        "Nitin-Mane__gpt-lora",
        "parikshit-06__legal",
    ]
    merge(sources, tmp_path / "all.safetensors", FULL)
    merge(sources[:1], tmp_path / "step.safetensors", FULL)
    for src in sources[1:]:
        add(tmp_path / "step.safetensors", [src], tmp_path / "step.safetensors", FULL)
    a, b = Checkpoint(tmp_path / "all.safetensors"), Checkpoint(tmp_path / "step.safetensors")
    assert list(b.tasks) == [s.task for s in sources]
    for module, info in a.modules.items():
        for task in info["tasks"]:
            W = dense(next(s for s in sources if s.task == task), module)
            assert close(recon(b, task, module), recon(a, task, module))
            assert close(recon(b, task, module), W)


def test_with_truncation_the_drift_is_reported_and_bounded_by_the_target(tmp_path, real):
    # the three checkpoints of one training run share a subspace; the target is on the worst task
    eps = 0.2
    # in the float dtype: at this target, fewer bits would let every module drop its shared basis
    cfg = ConsolidationConfig(target_error=eps, target_metric="max", precision="float")
    first = open_adapters(
        [str(real / "gpt2-c_attn/winkitee__imdb-checkpoint-125"), str(real / "gpt2-c_attn/winkitee__peft-lora-gpt2")]
    )
    merge(first, tmp_path / "c.safetensors", cfg)
    before = Checkpoint(tmp_path / "c.safetensors").modules
    add(
        tmp_path / "c.safetensors",
        open_adapters([str(real / "gpt2-c_attn/winkitee__imdb-checkpoint-1000")]),
        tmp_path / "c2.safetensors",
    )
    after = Checkpoint(tmp_path / "c2.safetensors")
    entry = after.history[-1]
    assert entry["op"] == "add" and set(entry["drift"]) == {s.task for s in first}
    for module, info in after.modules.items():
        for t in (s.task for s in first):
            rec, old = info["tasks"][t], before[module]["tasks"][t]
            # bound stated: the drift of an old task is at most ε times its (shared) reconstruction's size
            assert rec["drift"] <= eps * (1 + old["error"]) + 1e-6
            assert rec["error"] == pytest.approx(old["error"] + rec["drift"])
            assert rec["error_before"] == pytest.approx(old["error"])
    assert any(m["k_B"] > 0 for m in after.modules.values())  # the update really had a shared basis to move


def test_an_update_needs_only_the_checkpoint_not_the_old_adapters(tmp_path, real):
    import shutil

    for p in sorted((real / "gpt2-c_attn").iterdir())[:3]:
        shutil.copytree(p, tmp_path / "old" / p.name)
    merge(open_adapters([str(tmp_path / "old")]), tmp_path / "c.safetensors", FULL)
    shutil.rmtree(tmp_path / "old")  # the originals of the old tasks are gone
    new = open_adapters([str(p) for p in sorted((real / "gpt2-c_attn").iterdir())[3:]])
    add(tmp_path / "c.safetensors", new, tmp_path / "c2.safetensors", FULL)
    assert len(Checkpoint(tmp_path / "c2.safetensors").tasks) == 5


def test_merging_two_checkpoints_equals_consolidating_their_reconstructions(tmp_path, merged):
    """Two checkpoints of three and two GPT-2 adapters (the second also has c_proj modules, which the
    first has not): more tasks of the same kinds would check nothing more."""
    cfg = ConsolidationConfig(k=6)
    g1 = merged(*GPT2_FIRST_THREE, k=6)
    g2 = merged("gpt2-c_attn+c_proj/Nitin-Mane__gpt-lora", "gpt2-c_attn+c_proj/parikshit-06__legal", k=6)
    api.merge([str(g1), str(g2)], tmp_path / "both.safetensors", cfg)
    api.extract(g1, tmp_path / "x1", all_tasks=True)
    api.extract(g2, tmp_path / "x2", all_tasks=True)
    api.merge([str(tmp_path / "x1"), str(tmp_path / "x2")], tmp_path / "recon.safetensors", cfg)
    a, b = Checkpoint(tmp_path / "both.safetensors"), Checkpoint(tmp_path / "recon.safetensors")
    assert set(a.tasks) == set(b.tasks) == set(Checkpoint(g1).tasks) | set(Checkpoint(g2).tasks)
    for module, info in a.modules.items():
        for t in info["tasks"]:
            assert close(recon(a, t, module), recon(b, t, module), 1e-3)


def test_tasks_from_a_checkpoint_carry_an_error_bound(tmp_path, merged):
    g1 = merged("gpt2-c_attn", k=4)
    api.merge([str(g1)], tmp_path / "again.safetensors", ConsolidationConfig(k=2))
    before = Checkpoint(g1).modules
    for module, info in Checkpoint(tmp_path / "again.safetensors").modules.items():
        for t, rec in info["tasks"].items():
            assert rec["bound"] and rec["error"] >= before[module]["tasks"][t]["error"] - 1e-9


def test_an_existing_task_name_is_an_error_unless_replace(tmp_path, real, merged):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    with pytest.raises(DuplicateTaskError, match="--replace"):
        add(merged("gpt2-c_attn"), sources[:1], tmp_path / "c2.safetensors")
    add(merged("gpt2-c_attn"), sources[:1], tmp_path / "c2.safetensors", replace=True)
    ckpt = Checkpoint(tmp_path / "c2.safetensors")
    assert sorted(ckpt.tasks) == sorted(s.task for s in sources)
    assert ckpt.history[-1]["tasks_replaced"] == [sources[0].task]


def test_adapters_of_another_base_are_refused(tmp_path, real, merged):
    with pytest.raises(IncompatibleAdaptersError, match="different base model"):
        add(merged("gpt2-c_attn"), open_adapters([str(real / "bert-tiny")]), tmp_path / "c2.safetensors")
    assert not (tmp_path / "c2.safetensors").exists()


def test_shapes_that_disagree_with_the_checkpoint_are_refused(tmp_path):
    a = write_adapter(tmp_path / "a", {"layers.0.q": random_factors(8, 6, 2, 0)})
    b = write_adapter(tmp_path / "b", {"layers.0.q": random_factors(9, 6, 2, 1)})
    merge(open_adapters([str(a)]), tmp_path / "c.safetensors")
    with pytest.raises(IncompatibleAdaptersError, match="9×6"):
        add(tmp_path / "c.safetensors", open_adapters([str(b)]), tmp_path / "c2.safetensors")


def test_a_checkpoint_of_an_unknown_format_version_is_refused(tmp_path, real):
    import json

    from safetensors.torch import save_file

    from share_convert.checkpoint import MANIFEST_KEY, MANIFEST_SHA_KEY, sha256

    merge(open_adapters([str(real / "gpt2-c_attn/ShutterStack__peft_model")]), tmp_path / "c.safetensors")
    ckpt = Checkpoint(tmp_path / "c.safetensors")
    text = json.dumps(dict(ckpt.manifest, format_version=99))
    tensors = {name: ckpt.tensor(name) for name in ckpt.manifest["tensors"]}
    save_file(
        tensors, str(tmp_path / "future.safetensors"), {MANIFEST_KEY: text, MANIFEST_SHA_KEY: sha256(text.encode())}
    )
    with pytest.raises(UnsupportedFormatError, match="version 99"):
        Checkpoint(tmp_path / "future.safetensors")


def test_remove_drops_a_task_and_keeps_the_others_unchanged(tmp_path, real, merged):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    c = merged("gpt2-c_attn", k=8)
    remove(c, [sources[0].task], tmp_path / "r.safetensors")
    a, b = Checkpoint(c), Checkpoint(tmp_path / "r.safetensors")
    assert sources[0].task not in b.tasks and len(b.tasks) == 4
    for module, info in b.modules.items():
        for t in info["tasks"]:
            assert torch.equal(recon(a, t, module), recon(b, t, module))
    with pytest.raises(UnknownTaskError, match="Available tasks"):
        remove(c, ["nope"], tmp_path / "r2.safetensors")


def test_remove_with_refit_fits_the_bases_to_the_remaining_tasks(tmp_path, real, merged):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    remove(merged("gpt2-c_attn", k=8), [s.task for s in sources[:3]], tmp_path / "r.safetensors", refit=True)
    b = Checkpoint(tmp_path / "r.safetensors")
    assert b.history[-1]["op"] == "remove+refit" and len(b.tasks) == 2
    for info in b.modules.values():  # the two remaining rank-8 tasks span 16 directions; k = 8 keeps 8
        assert info["k_B"] == 8 and set(info["tasks"]) == set(b.tasks)


def test_private_corrections_survive_add(tmp_path, real, merged):
    sources = open_adapters([str(real / "gpt2-c_attn")])
    c = merged(*GPT2_FIRST_THREE, k=4, private_rank=2)
    before = Checkpoint(c)
    add(c, sources[3:], tmp_path / "c2.safetensors")
    after = Checkpoint(tmp_path / "c2.safetensors")
    for module, info in after.modules.items():
        for t in (s.task for s in sources[:3]):
            assert info["tasks"][t]["private_rank"] == before.modules[module]["tasks"][t]["private_rank"] > 0
            for part in ("private_B", "private_A"):
                assert torch.equal(after.task_tensors(t, module)[part], before.task_tensors(t, module)[part])


def test_old_private_corrections_are_kept_byte_for_byte(tmp_path, real, merged):
    from share_convert.checkpoint import tensor_bytes

    sources = open_adapters([str(real / "gpt2-c_attn")])
    c = merged(*GPT2_FIRST_THREE, k=4, private_rank=2)
    add(c, sources[3:], tmp_path / "c2.safetensors")
    before, after = Checkpoint(c), Checkpoint(tmp_path / "c2.safetensors")
    compared = 0
    for module in before.modules:
        for t in (s.task for s in sources[:3]):
            old, new = before.task_tensors(t, module), after.task_tensors(t, module)
            for part in ("private_B", "private_A"):
                assert tensor_bytes(new[part]) == tensor_bytes(old[part])
                compared += 1
    assert compared


def test_old_tasks_of_mixed_ranks_are_rotated_as_one_batch_without_changing_their_updates(tmp_path):
    # ranks 2, 5 and 3 over one module: the update pads them to one width; the full basis keeps
    # every old ΔŴ exact and each task's stored rank
    paths = []
    for i, r in enumerate((2, 5, 3, 4)):
        paths.append(write_adapter(tmp_path / f"t{i}", {"layers.0.q_proj": random_factors(24, 20, r, seed=i)}, r=r))
    sources = open_adapters([str(p) for p in paths])
    merge(sources[:3], tmp_path / "c.safetensors", FULL)
    add(tmp_path / "c.safetensors", sources[3:], tmp_path / "c2.safetensors", FULL)
    before, after = Checkpoint(tmp_path / "c.safetensors"), Checkpoint(tmp_path / "c2.safetensors")
    (module,) = before.modules
    for t in before.tasks:
        old_rec, new_rec = before.modules[module]["tasks"][t], after.modules[module]["tasks"][t]
        assert new_rec["rank"] == old_rec["rank"] and new_rec["drift"] < 1e-5
        assert close(recon(after, t, module), recon(before, t, module), rtol=1e-5)


def test_cli_add_in_place_reports_drift_and_info_shows_history(tmp_path, real):
    from typer.testing import CliRunner

    from share_convert.cli import app

    runner = CliRunner()
    ck = tmp_path / "c.safetensors"
    assert (
        runner.invoke(app, ["merge", str(real / "gpt2-c_attn/winkitee__imdb-checkpoint-125"), "-o", str(ck)]).exit_code
        == 0
    )
    r = runner.invoke(app, ["add", str(ck), str(real / "gpt2-c_attn/winkitee__peft-lora-gpt2"), "--in-place"])
    assert r.exit_code == 0, r.output
    assert "before → after" in r.output and "History" in r.output
    info = json.loads(runner.invoke(app, ["info", str(ck), "--json"]).output)
    assert [h["op"] for h in info["history"]] == ["merge", "add"]
    assert "winkitee__imdb-checkpoint-125" in info["history"][-1]["drift"]
    r = runner.invoke(app, ["add", str(ck), str(real / "bert-tiny"), "--in-place"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


def test_checkpoint_task_source_reads_reconstructions(tmp_path, real):
    merge(open_adapters([str(real / "gpt2-c_attn/ShutterStack__peft_model")]), tmp_path / "c.safetensors", FULL)
    ckpt = Checkpoint(tmp_path / "c.safetensors")
    src = CheckpointTask(ckpt, "ShutterStack__peft_model")
    module = next(iter(ckpt.modules))
    f = src.read_module(module)
    assert close(f.B.double() @ f.A.double(), recon(ckpt, src.task, module))


def test_a_replaced_task_leaves_the_bases_and_the_stored_gram_matrices(tmp_path):
    paths = [write_adapter(tmp_path / f"t{i}", {"layers.0.q": random_factors(24, 20, 4, seed=i)}) for i in range(3)]
    other = write_adapter(tmp_path / "t2b", {"layers.0.q": random_factors(24, 20, 4, seed=7)})
    sources = open_adapters([str(p) for p in paths])
    merge(sources, tmp_path / "c.safetensors", FULL)
    add(tmp_path / "c.safetensors", open_adapters([f"t2={other}"]), tmp_path / "c2.safetensors", FULL, replace=True)
    ckpt = Checkpoint(tmp_path / "c2.safetensors")
    (module,) = ckpt.modules
    info = ckpt.modules[module]
    assert info["k_B"] == info["k_A"] == 12  # three rank-4 tasks: the replaced one's directions are gone
    for side in ("B", "A"):
        expected = sum(
            (1 / info["tasks"][t]["norm"])
            * ckpt.task_tensors(t, module)[f"coef_{side}"].double()
            @ ckpt.task_tensors(t, module)[f"coef_{side}"].double().T
            for t in info["tasks"]
        )
        assert torch.allclose(ckpt.tensor(f"modules/{module}/gram_{side}").double(), expected, atol=1e-5)


def test_after_a_remove_the_next_add_sees_only_the_remaining_tasks(tmp_path):
    paths = [write_adapter(tmp_path / f"t{i}", {"layers.0.q": random_factors(24, 20, 4, seed=i)}) for i in range(4)]
    sources = open_adapters([str(p) for p in paths])
    merge(sources[:3], tmp_path / "c.safetensors", FULL)
    remove(tmp_path / "c.safetensors", [sources[2].task], tmp_path / "c2.safetensors")
    add(tmp_path / "c2.safetensors", sources[3:], tmp_path / "c3.safetensors", FULL)
    (info,) = Checkpoint(tmp_path / "c3.safetensors").modules.values()
    assert info["k_B"] == info["k_A"] == 12  # t0, t1, t3: rank 4 each, nothing left of t2


def test_after_an_add_every_module_meets_the_target_counting_the_old_tasks_errors(tmp_path, real, merged):
    # old tasks keep their errors (private truncation included): the new task gets only what is left
    sources = open_adapters([str(real / "gpt2-c_attn")])
    add(merged(*GPT2_FIRST_THREE, target_error=0.05), sources[3:4], tmp_path / "c2.safetensors")
    for info in Checkpoint(tmp_path / "c2.safetensors").modules.values():
        errors = [t["error"] for t in info["tasks"].values()]
        assert len(errors) == 4 and sum(errors) / len(errors) <= 0.05 + 1e-6


def test_merging_checkpoints_meets_the_target_on_the_errors_it_records(tmp_path, real, merged):
    # tasks from checkpoints are planned on their bounds (error so far + drift), the figures recorded
    sources = open_adapters([str(real / "gpt2-c_attn")])
    merge(sources[3:], tmp_path / "b.safetensors", ConsolidationConfig(target_error=0.05))
    a = merged(*GPT2_FIRST_THREE, target_error=0.05)
    api.merge([str(a), str(tmp_path / "b.safetensors")], tmp_path / "ab.safetensors")
    for info in Checkpoint(tmp_path / "ab.safetensors").modules.values():
        errors = [t["error"] for t in info["tasks"].values()]
        assert len(errors) == len(sources) and sum(errors) / len(errors) <= 0.05 + 1e-6


def test_when_earlier_errors_exceed_the_target_a_merge_holds_the_error_it_adds(tmp_path, real):
    # a lossy checkpoint (a 4× budget) merged again under the default 5% target: the target cannot
    # be met, so the step must not add more than 5% on top, nor keep every direction it was given
    sources = open_adapters([str(real / "gpt2-c_attn")])[:3]
    # a budget in parameters (float factors): one in bytes would keep more directions in fewer bits
    merge(sources, tmp_path / "lossy.safetensors", ConsolidationConfig(budget="4x", precision="float"))
    lossy = Checkpoint(tmp_path / "lossy.safetensors")
    summary = api.merge([str(lossy.path)], tmp_path / "again.safetensors")
    again = Checkpoint(tmp_path / "again.safetensors")
    for module, info in again.modules.items():
        assert info.get("target_relaxed")
        before = lossy.modules[module]["tasks"]
        added = [t["error"] - before[name]["error"] for name, t in info["tasks"].items()]
        assert sum(added) / len(added) <= 0.05 + 1e-6
        assert info["params"] <= lossy.modules[module]["params"] * 1.05
    assert summary["plan"]["modules_target_relaxed"] == len(again.modules)


def test_add_to_a_budget_checkpoint_of_an_adapter_with_a_new_module_plans_it_on_the_error_target(tmp_path):
    old = [write_adapter(tmp_path / f"o{i}", {"layers.0.q": random_factors(24, 20, 4, seed=i)}) for i in range(3)]
    new = write_adapter(
        tmp_path / "n",
        {"layers.0.q": random_factors(24, 20, 4, seed=9), "layers.0.v": random_factors(24, 20, 4, seed=10)},
    )
    merge(open_adapters([str(p) for p in old]), tmp_path / "c.safetensors", ConsolidationConfig(budget="2x"))
    add(tmp_path / "c.safetensors", open_adapters([str(new)]), tmp_path / "c2.safetensors")
    ckpt = Checkpoint(tmp_path / "c2.safetensors")
    v = next(m for m in ckpt.modules if m.endswith("layers.0.v"))
    assert ckpt.modules[v]["tasks"]["n"]["error"] <= 0.05 + 1e-9


def test_a_checkpoint_made_on_a_gpu_is_extended_on_a_machine_without_one(tmp_path, real):
    import json

    from safetensors.torch import save_file

    from share_convert.checkpoint import MANIFEST_KEY, MANIFEST_SHA_KEY, sha256

    sources = open_adapters([str(real / "gpt2-c_attn")])
    merge(sources[:2], tmp_path / "c.safetensors", ConsolidationConfig(k=4, device="cpu"))
    ckpt = Checkpoint(tmp_path / "c.safetensors")
    manifest = dict(ckpt.manifest, config=dict(ckpt.config, device="cuda"))  # as written by --device cuda
    text = json.dumps(manifest)
    tensors = {name: ckpt.tensor(name) for name in ckpt.manifest["tensors"]}
    save_file(tensors, str(tmp_path / "gpu.safetensors"), {MANIFEST_KEY: text, MANIFEST_SHA_KEY: sha256(text.encode())})
    add(tmp_path / "gpu.safetensors", sources[2:3], tmp_path / "c2.safetensors")
    assert sources[2].task in Checkpoint(tmp_path / "c2.safetensors").tasks


def test_add_gives_the_same_bytes_whatever_the_number_of_workers(tmp_path, real):
    sources = open_adapters([str(real / "gpt2-c_attn+c_proj")])
    merge(sources[:2], tmp_path / "c.safetensors", ConsolidationConfig(k=4, private_rank=1))
    add(tmp_path / "c.safetensors", sources[2:], tmp_path / "one.safetensors", workers=1)
    add(tmp_path / "c.safetensors", sources[2:], tmp_path / "two.safetensors", workers=2)
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()


def _lora_bytes(path) -> int:
    storage = api.info(path)["totals"]["storage"]
    return sum(storage[role]["bytes"] for role in ("bases", "grams", "coefficients", "private"))


def test_updates_never_store_more_than_the_original_adapters(tmp_path):
    from share_convert.io import write_synthetic_adapters

    paths = write_synthetic_adapters(tmp_path / "a", count=10, layers=1, hidden=512, rank=8, shared_rank=16, noise=0.1)
    api.merge([str(p) for p in paths[:4]], tmp_path / "c4.safetensors")
    api.add(tmp_path / "c4.safetensors", [str(p) for p in paths[4:7]], tmp_path / "c7.safetensors")
    api.add(tmp_path / "c7.safetensors", [str(p) for p in paths[7:]], tmp_path / "c10.safetensors")
    original = sum(t["original_bytes"] for t in api.info(tmp_path / "c10.safetensors")["tasks"])
    assert _lora_bytes(tmp_path / "c10.safetensors") <= original


@pytest.mark.parametrize("command", ["merge", "add", "remove", "remove --refit"])
def test_every_command_computes_on_one_thread_whatever_torchs_setting(tmp_path, command):
    """Thread counts change how sums are split, and so the last bits of the results: merge, add and
    remove (with or without refit) all compute on one thread, so that their bytes do not depend on it.
    Observed through the progress callback, which runs inside the computation."""
    from share_convert.io import write_synthetic_adapters

    write_synthetic_adapters(tmp_path / "a", count=3, layers=1, hidden=16, rank=2, shared_rank=2)
    write_synthetic_adapters(tmp_path / "b", count=1, layers=1, hidden=16, rank=2, shared_rank=2, prefix="new")
    if command != "merge":  # in float: a refit of rounded factors rounds again, and may be refused as worse
        api.merge([str(tmp_path / "a")], tmp_path / "c.safetensors", ConsolidationConfig(precision="float"))
    threads: list[int] = []

    def progress(name: str, step: int, total: int) -> None:
        threads.append(torch.get_num_threads())

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        out = tmp_path / "out.safetensors"
        if command == "merge":
            api.merge([str(tmp_path / "a")], out, progress=progress)
        elif command == "add":
            api.add(tmp_path / "c.safetensors", [str(tmp_path / "b")], out, progress=progress)
        else:
            api.remove(tmp_path / "c.safetensors", ["task-000"], out, refit="refit" in command, progress=progress)
        assert torch.get_num_threads() == 3  # and the setting is given back
    finally:
        torch.set_num_threads(before)
    assert threads and set(threads) == {1}
