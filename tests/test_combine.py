"""``combine``: a new task made from a checkpoint's tasks in coefficient space (docs/combine.md).

What is expected is computed here from the checkpoint the command read (its tasks as extracted, or
their stored coefficients), by direct float64 implementations of each rule, and compared with what
the command wrote; PEFT's own ``add_weighted_adapter`` and TIES are the outside references.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from share_convert import ConsolidationConfig, api
from share_convert.checkpoint import Checkpoint
from share_convert.io import AdapterSource
from share_convert.math import dare_mask, dare_seed

from .builders.adapters import random_factors, write_adapter, write_small_adapters
from .builders.cli import one_error_line, run

#: float32 storage: a stored factor is within about 6e-8 of its value, relative
STORED = 1e-6
WEIGHTS = {"a0": 0.7, "a1": 0.3}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> list[Path]:
    return write_small_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, adapters) -> dict[str, Path]:
    """The small adapters merged three ways: shared bases only (k = 6), shared bases with private
    corrections (k = 4, q = 2), and the default plan (private factors only, at this size)."""
    root = tmp_path_factory.mktemp("ckpt")
    configs = {
        "shared": ConsolidationConfig(k=6, precision="float"),
        "mixed": ConsolidationConfig(k=4, private_rank=2, precision="float"),
        "private": ConsolidationConfig(precision="float"),
    }
    out = {}
    for label, config in configs.items():
        out[label] = root / f"{label}.safetensors"
        api.merge([str(p) for p in adapters], out[label], config)
    return out


def delta(folder: Path, module: str) -> torch.Tensor:
    """ΔW of one module of an extracted PEFT adapter, float64 (extraction folds the scale: r = lora_alpha)."""
    f = AdapterSource(folder).read_module(module)
    return f.B.double() @ f.A.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def core(ckpt: Checkpoint, task: str, module: str) -> torch.Tensor:
    """A task's k_B × k_A core E_B E_Aᵀ as stored, float64."""
    parts = ckpt.task_tensors(task, module)
    return parts["coef_B"].double() @ parts["coef_A"].double().T


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_in_a_module_kept_in_fewer_bits_the_recorded_error_is_that_of_the_stored_rows(tmp_path, adapters, precision):
    ckpt, out = tmp_path / "q.safetensors", tmp_path / "out.safetensors"
    api.merge([str(p) for p in adapters], ckpt, ConsolidationConfig(k=4, private_rank=2, precision=precision))
    api.combine(ckpt, "mix", WEIGHTS, out)
    for task in ("mix", "a0", "a1"):
        api.extract(out, tmp_path / task, task=task)
    stored = Checkpoint(out)
    for module in stored.modules:
        expected = 0.7 * delta(tmp_path / "a0", module) + 0.3 * delta(tmp_path / "a1", module)
        measured = rel(delta(tmp_path / "mix", module), expected)
        assert measured > STORED  # the rows are rounded like the module's others
        assert stored.modules[module]["tasks"]["mix"]["error"] == pytest.approx(measured, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("kind", ["shared", "mixed", "private"])
def test_linear_is_exactly_the_weighted_sum_of_the_extracted_tasks(tmp_path, checkpoints, kind):
    out = tmp_path / "out.safetensors"
    api.combine(checkpoints[kind], "mix", {"a0": 0.7, "a1": 0.3, "a3": -1.25}, out)
    for task in ("mix", "a0", "a1", "a3"):
        api.extract(out, tmp_path / task, task=task)
    for module in Checkpoint(out).modules:
        expected = 0.7 * delta(tmp_path / "a0", module) + 0.3 * delta(tmp_path / "a1", module)
        expected -= 1.25 * delta(tmp_path / "a3", module)
        assert rel(delta(tmp_path / "mix", module), expected) < STORED


def test_in_shared_bases_the_new_task_is_a_balanced_core_of_its_own_rank_with_no_private_part(tmp_path, checkpoints):
    out = tmp_path / "out.safetensors"
    api.combine(checkpoints["shared"], "mix", WEIGHTS, out)
    ckpt = Checkpoint(out)
    for module, info in ckpt.modules.items():
        rec = info["tasks"]["mix"]
        C = 0.7 * core(ckpt, "a0", module) + 0.3 * core(ckpt, "a1", module)
        S = torch.linalg.svdvals(C)
        assert rec["private_rank"] == 0 and rec["rank"] == int((S > 1e-6 * S[0]).sum())
        parts = ckpt.task_tensors("mix", module)
        EB, EA = parts["coef_B"].double(), parts["coef_A"].double()
        for G in (EB.T @ EB, EA.T @ EA):  # balanced: both Gram matrices are the same diagonal S
            assert torch.allclose(G, torch.diag(S[: rec["rank"]]), rtol=1e-5, atol=1e-6 * float(S[0]))
        assert rec["error"] < STORED and rec["norm"] == pytest.approx(float(torch.linalg.norm(C)), rel=1e-6)


def test_linear_equals_peft_cat_of_the_extracted_adapters_on_a_model(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    def lm() -> torch.nn.Module:
        torch.manual_seed(0)
        return GPT2LMHeadModel(
            GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16, bos_token_id=0, eos_token_id=0)
        ).eval()

    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        base = lm()
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False)
        get_peft_model(base, config).save_pretrained(tmp_path / name)
    ckpt = tmp_path / "share.safetensors"
    api.merge([str(tmp_path / n) for n in "abc"], ckpt, ConsolidationConfig(k=4, private_rank=1))
    api.combine(ckpt, "mix", {"a": 0.7, "b": -0.3}, ckpt, force=True)
    (tmp_path / "out").mkdir()
    for task in ("a", "b", "mix"):
        api.extract(ckpt, tmp_path / "out" / task, task=task)

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    peft = PeftModel.from_pretrained(lm(), tmp_path / "out" / "a", adapter_name="a")
    peft.load_adapter(tmp_path / "out" / "b", adapter_name="b")
    peft.add_weighted_adapter(["a", "b"], [0.7, -0.3], "cat", combination_type="cat")
    peft.set_adapter("cat")
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        got = PeftModel.from_pretrained(lm(), tmp_path / "out" / "mix")(input_ids=ids).logits
        bare = lm()(input_ids=ids).logits
    assert rel(got - bare, expected - bare) < 1e-4  # the adapters' effect, not the base model's


def ties_reference(cores: list[np.ndarray], weights: list[float], density: float) -> np.ndarray:
    """TIES (Yadav et al. 2023) with PEFT's weighting: trim each to its top ⌊density·size⌋ magnitudes
    (ties in row-major order), elect the sign of the sum, average the agreeing weighted entries."""
    trimmed = []
    for c in cores:
        x = c.ravel()
        keep = np.argsort(-np.abs(x), kind="stable")[: int(density * x.size)]
        y = np.zeros_like(x)
        y[keep] = x[keep]
        trimmed.append(y)
    T = np.stack(trimmed)
    sign = np.where(T.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(T) == sign
    merged = (T * np.asarray(weights)[:, None] * agree).sum(0) / np.maximum(agree.sum(0), 1)
    return merged.reshape(cores[0].shape)


WEIGHTS3 = {"a0": 0.7, "a1": 0.3, "a2": 1.0}


def test_ties_follows_the_paper_on_the_tasks_coefficients(tmp_path, checkpoints):
    from peft.utils.merge_utils import ties as peft_ties

    out = tmp_path / "out.safetensors"
    api.combine(checkpoints["shared"], "mix", WEIGHTS3, out, method="ties", density=0.4)
    before, after = Checkpoint(checkpoints["shared"]), Checkpoint(out)
    for module in before.modules:
        cores = [core(before, t, module) for t in WEIGHTS3]
        expected = ties_reference([c.numpy() for c in cores], list(WEIGHTS3.values()), 0.4)
        w = torch.tensor(list(WEIGHTS3.values()), dtype=torch.float64)
        assert np.allclose(peft_ties(cores, w, 0.4).numpy(), expected, rtol=1e-12, atol=1e-12)  # PEFT agrees
        got = core(after, "mix", module).numpy()
        assert np.linalg.norm(got - expected) <= STORED * np.linalg.norm(expected)
        assert after.modules[module]["tasks"]["mix"]["private_rank"] == 0


def test_dare_drops_with_its_seeded_masks_and_rescales(tmp_path, checkpoints):
    out = tmp_path / "out.safetensors"
    api.combine(checkpoints["shared"], "mix", WEIGHTS3, out, method="dare", density=0.6, seed=7)
    before, after = Checkpoint(checkpoints["shared"]), Checkpoint(out)
    for module in before.modules:
        expected = np.zeros(core(before, "a0", module).shape)
        for t, w in WEIGHTS3.items():
            c = core(before, t, module).numpy()
            mask = dare_mask(c.shape, 0.6, dare_seed(7, module, t)).numpy()
            expected += w * np.where(mask, c / 0.6, 0.0)
        got = core(after, "mix", module).numpy()
        assert np.linalg.norm(got - expected) <= STORED * np.linalg.norm(expected)


def test_dare_masks_keep_about_the_density_and_differ_by_seed_module_and_task():
    masks = [dare_mask((64, 64), 0.3, dare_seed(s, m, t)) for s, m, t in ((0, "m", "a"), (1, "m", "a"), (0, "n", "a"))]
    masks.append(dare_mask((64, 64), 0.3, dare_seed(0, "m", "b")))
    assert all(abs(float(m.double().mean()) - 0.3) < 0.03 for m in masks)
    assert all(not torch.equal(masks[0], m) for m in masks[1:])
    assert torch.equal(masks[0], dare_mask((64, 64), 0.3, dare_seed(0, "m", "a")))


@pytest.mark.parametrize("options", [{}, {"method": "ties", "density": 0.5}, {"method": "dare", "density": 0.5}])
def test_the_same_combination_gives_the_same_bytes(tmp_path, checkpoints, options):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    api.combine(checkpoints["mixed"], "mix", WEIGHTS, one, **options)
    api.combine(checkpoints["mixed"], "mix", WEIGHTS, two, **options)
    assert one.read_bytes() == two.read_bytes()


def test_no_other_task_changes_and_the_result_verifies(tmp_path, checkpoints):
    out = tmp_path / "out.safetensors"
    api.combine(checkpoints["mixed"], "mix", WEIGHTS, out)
    before, after = Checkpoint(checkpoints["mixed"]), Checkpoint(out)
    for module, info in before.modules.items():
        for task, rec in info["tasks"].items():
            assert after.modules[module]["tasks"][task]["error"] == rec["error"]
            old, new = before.task_tensors(task, module), after.task_tensors(task, module)
            assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
        for side in ("basis_B", "basis_A"):
            assert torch.equal(before.tensor(f"modules/{module}/{side}"), after.tensor(f"modules/{module}/{side}"))
    assert api.verify(out)["ok"]
    assert list(after.tasks) == [*before.tasks, "mix"]


def test_the_history_records_the_combination_and_the_new_task_how_it_was_made(tmp_path, checkpoints):
    out = tmp_path / "out.safetensors"
    api.combine(checkpoints["shared"], "mix", WEIGHTS, out, method="dare", density=0.5, seed=3)
    ckpt = Checkpoint(out)
    last = ckpt.history[-1]
    assert last["op"] == "combine" and last["tasks_added"] == ["mix"]
    made = {"method": "dare", "weights": WEIGHTS, "density": 0.5, "seed": 3}
    assert last["combined"] == made and ckpt.task("mix")["combined"] == made


def test_in_place_and_replace_through_the_cli(tmp_path, checkpoints):
    ckpt = tmp_path / "share.safetensors"
    ckpt.write_bytes(checkpoints["mixed"].read_bytes())
    result = run("combine", ckpt, "--task", "mix", "--weights", "a0=1,a1=1", "--in-place", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["combined"]["weights"] == {"a0": 1.0, "a1": 1.0}
    result = run("combine", ckpt, "--task", "mix", "--weights", "mix=0.5", "--in-place", "--replace")
    assert result.exit_code == 0, result.output
    assert "mix = 0.5·mix (linear)" in result.output
    api.extract(ckpt, tmp_path / "mix", task="mix")
    api.extract(checkpoints["mixed"], tmp_path / "a0", task="a0")
    api.extract(checkpoints["mixed"], tmp_path / "a1", task="a1")
    for module in Checkpoint(ckpt).modules:
        expected = 0.5 * (delta(tmp_path / "a0", module) + delta(tmp_path / "a1", module))
        assert rel(delta(tmp_path / "mix", module), expected) < STORED
    assert list(Checkpoint(ckpt).tasks).count("mix") == 1


def test_tasks_in_different_groups_of_bases_combine_exactly(tmp_path):
    from share_convert.engine import merge
    from share_convert.io import open_adapters, write_synthetic_adapters

    for seed, prefix in ((1, "x"), (2, "y")):
        write_synthetic_adapters(
            tmp_path / "a", count=3, layers=1, hidden=48, rank=4, shared_rank=4, noise=1e-3, seed=seed, prefix=prefix
        )
    ckpt = tmp_path / "g.safetensors"
    merge(
        open_adapters([str(tmp_path / "a")]),
        ckpt,
        ConsolidationConfig(target_error=0.02, groups="auto", precision="float"),
    )
    assert all(len(info["groups"]) == 2 for info in Checkpoint(ckpt).modules.values())
    weights = {"x-000": 0.5, "y-001": -0.25, "x-001": 1.0}
    api.combine(ckpt, "mix", weights, tmp_path / "out.safetensors")
    out = Checkpoint(tmp_path / "out.safetensors")
    for module, info in out.modules.items():
        assert "mix" in info["groups"][info["tasks"]["mix"]["group"]]["tasks"]
        B, A = out.reconstruction("mix", module)
        expected = sum(w * (lambda f: f[0] @ f[1].T)(out.reconstruction(t, module)) for t, w in weights.items())
        assert rel(B @ A.T, expected) < STORED
    assert api.verify(tmp_path / "out.safetensors")["ok"]


def with_heads(root: Path, heads: dict[str, torch.Tensor]) -> list[Path]:
    """Three adapters of one module, each with the given head tensor under ``score.weight`` (or its own)."""
    paths = []
    for i, name in enumerate(("h0", "h1", "h2")):
        head = heads.get(name, torch.full((2, 8), float(i)))
        mods = {"layers.0.q": random_factors(8, 8, 2, i)}
        paths.append(write_adapter(root / name, mods, heads={"base_model.model.score.modules_to_save.weight": head}))
    return paths


def test_shared_heads_are_carried_and_differing_heads_need_head_from(tmp_path):
    same = torch.arange(16.0).reshape(2, 8)
    paths = with_heads(tmp_path / "in", {"h0": same, "h1": same})
    ckpt = tmp_path / "share.safetensors"
    api.merge([str(p) for p in paths], ckpt)
    api.combine(ckpt, "mix", {"h0": 0.5, "h1": 0.5}, tmp_path / "same.safetensors")
    assert torch.equal(
        Checkpoint(tmp_path / "same.safetensors").heads("mix")["base_model.model.score.modules_to_save.weight"], same
    )
    line = one_error_line(
        run("combine", ckpt, "--task", "mix", "--weights", "h0=1,h2=1", "-o", tmp_path / "o.safetensors")
    )
    assert "different heads" in line and "--head-from" in line
    assert not (tmp_path / "o.safetensors").exists()
    result = run(
        "combine",
        ckpt,
        "--task",
        "mix",
        "--weights",
        "h0=1,h2=1",
        "--head-from",
        "h2",
        "-o",
        tmp_path / "o.safetensors",
    )
    assert result.exit_code == 0, result.output
    got = Checkpoint(tmp_path / "o.safetensors")
    assert got.heads("mix").keys() == got.heads("h2").keys()
    assert all(torch.equal(got.heads("mix")[k], got.heads("h2")[k]) for k in got.heads("h2"))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--task", "mix", "--weights", "a0=1,nope=1"], "nope"),
        (["--task", "mix", "--weights", "a0"], "TASK=WEIGHT"),
        (["--task", "mix", "--weights", "a0=x"], "not a number"),
        (["--task", "mix", "--weights", "a0=nan"], "not a number"),
        (["--task", "mix", "--weights", "a0=1,a0=2"], "twice"),
        (["--task", "mix", "--weights", "=1"], "TASK=WEIGHT"),
        (["--task", "a1", "--weights", "a0=1"], "already exists"),
        (["--task", "mix", "--weights", "a0=1", "--method", "ties"], "--density"),
        (["--task", "mix", "--weights", "a0=1", "--density", "0.5"], "--density applies"),
        (["--task", "mix", "--weights", "a0=1", "--method", "dare", "--density", "0"], "(0, 1]"),
        (["--task", "mix", "--weights", "a0=1", "--seed", "1"], "--seed applies"),
        (["--task", "mix", "--weights", "a0=1", "--head-from", "a3"], "--head-from"),
        (["--task", "../mix", "--weights", "a0=1"], "task name"),
        (["--weights", "a0=1"], "--task"),
        (["--task", "mix"], "--weights"),
    ],
)
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, checkpoints, args, says):
    out = tmp_path / "out.safetensors"
    line = one_error_line(run("combine", checkpoints["mixed"], *args, "-o", out))
    assert says in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_are_refused_where_no_task_has_coefficients(tmp_path, checkpoints, method):
    """The default plan of these small adapters keeps each task's own directions: the rule would apply nowhere."""
    args = ["--task", "mix", "--weights", "a0=1,a1=1", "--method", method, "--density", "0.5"]
    line = one_error_line(run("combine", checkpoints["private"], *args, "-o", tmp_path / "out.safetensors"))
    assert "no module holds any" in line and "--method linear" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", [["-o", "out.bin"], [], ["-o", "out.safetensors", "--in-place"]])
def test_the_output_must_be_one_safetensors_target(tmp_path, checkpoints, target):
    args = [a if a.startswith("-") else str(tmp_path / a) for a in target]
    one_error_line(run("combine", checkpoints["mixed"], "--task", "mix", "--weights", "a0=1", *args))
    assert list(tmp_path.iterdir()) == []


def test_rows_kept_under_older_bases_stay_as_stored_with_their_chain(tmp_path, monkeypatch):
    from share_convert.engine import add, merge
    from share_convert.engine import chain as chains
    from share_convert.io import open_adapters

    monkeypatch.setattr(chains, "CHAIN_MIN_BYTES", 0)  # chain these small tensors too
    module = "base_model.model.layers.0.q"
    paths = [
        write_adapter(tmp_path / f"t{i}", {"layers.0.q": random_factors(24, 20, 2, seed=i)}, alpha=2) for i in range(7)
    ]
    merge(open_adapters([str(p) for p in paths[:6]]), tmp_path / "c0.safetensors", ConsolidationConfig(k=4))
    add(tmp_path / "c0.safetensors", open_adapters([str(paths[6])]), tmp_path / "c1.safetensors")
    before = Checkpoint(tmp_path / "c1.safetensors")
    assert before.manifest["format_version"] == 3
    api.combine(tmp_path / "c1.safetensors", "mix", {"t0": 0.5, "t6": 2.0}, tmp_path / "out.safetensors")
    after = Checkpoint(tmp_path / "out.safetensors")
    prefix = f"modules/{module}/"
    for name in ("rotations_B", "rotations_A", "chain_rows"):
        assert torch.equal(after.tensor(prefix + name), before.tensor(prefix + name))
    for side in "BA":  # the stored rows lead, unchanged; the new task's follow in the current bases
        old = before.tensor(f"{prefix}coefs_{side}")
        assert torch.equal(after.tensor(f"{prefix}coefs_{side}")[: len(old)], old)
    B, A = after.reconstruction("mix", module)
    expected = sum(
        w * (lambda f: f[0] @ f[1].T)(after.reconstruction(t, module)) for t, w in (("t0", 0.5), ("t6", 2.0))
    )
    assert rel(B @ A.T, expected) < STORED
    assert api.verify(tmp_path / "out.safetensors")["ok"]


def test_a_combined_task_is_an_ordinary_task_for_later_updates(tmp_path, checkpoints):
    out = tmp_path / "out.safetensors"
    api.combine(checkpoints["shared"], "mix", WEIGHTS, out)
    new = {"layers.0.q": random_factors(16, 12, 3, 99), "layers.0.v": random_factors(8, 12, 3, 98)}
    api.add(out, [str(write_adapter(tmp_path / "new", new, alpha=3))], out, force=True)
    ckpt = Checkpoint(out)
    assert list(ckpt.tasks)[-2:] == ["mix", "new"] and api.verify(out)["ok"]
    for info in ckpt.modules.values():  # the new bases hold it as they hold the others: with a drift
        assert info["tasks"]["mix"]["drift"] >= 0
    api.remove(out, ["mix"], out, force=True)
    assert "mix" not in Checkpoint(out).tasks and api.verify(out)["ok"]
