"""Training a new task inside a Share checkpoint (share_convert.runtime.training), on small models built from
configs and synthetic, learnable tasks.

Every task labels a sequence of tokens by the sign of a weighted token count, Σ_j v[x_j] > 0, with
its own weight vector v over the vocabulary. The "old" tasks (v = rows 0..3 of an orthonormal set)
are trained here with ordinary PEFT LoRA and consolidated with ``merge``; a *related* task uses a
combination of old rows (its update lies near the old tasks' subspace), an *outside* task a row
orthogonal to all of them (it does not)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from share_convert import ConsolidationConfig, ShareModel, api
from share_convert.checkpoint import Checkpoint
from share_convert.errors import (
    DuplicateTaskError,
    InvalidOptionError,
    InvalidTaskNameError,
    ModelMismatchError,
    ShareError,
    UnknownTaskError,
    UntrainedTaskError,
)
from share_convert.runtime import TrainableTask

from .builders.models import bert_classifier, gpt2_classifier

VOCAB, LENGTH, RANK, K = 64, 8, 4, 10
STEPS, LR, BATCH = 200, 1e-2, 64


# -- models from small configs, tasks, a training loop ---------------------------------------------------------


def bert() -> nn.Module:
    """A one-layer BERT (hidden 128) with a frozen random classifier shared by every task."""
    model = bert_classifier(vocab=VOCAB, layers=1, intermediate=256, dropout=0.0)
    with torch.no_grad():  # a classifier of useful scale: the adapters move the features, not the head
        model.classifier.weight.mul_(25)
    return model


def gpt2() -> nn.Module:
    """A one-layer GPT-2 (hidden 64) with a frozen random score head of useful scale."""
    model = gpt2_classifier(layers=1, hidden=64, heads=2, vocab=VOCAB, positions=LENGTH, dropout=0.0)
    with torch.no_grad():
        model.score.weight.mul_(25)
    return model


def task_vectors() -> torch.Tensor:
    """Six orthogonal weight vectors over the vocabulary (rows), of norm √VOCAB."""
    q, _ = torch.linalg.qr(torch.randn(VOCAB, 6, generator=torch.Generator().manual_seed(1)))
    return q.T * VOCAB**0.5


V = task_vectors()
OLD = {f"t{i}": V[i] for i in range(4)}
RELATED = (V[0] + V[1]) / 2**0.5
OUTSIDE = V[5]


def data(v: torch.Tensor, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(1, VOCAB, (rows, LENGTH), generator=torch.Generator().manual_seed(seed))
    return x, (v[x].sum(1) > 0).long()


Forward = Callable[[torch.Tensor], torch.Tensor]


def train(params: list[nn.Parameter], forward: Forward, v: torch.Tensor, steps: int = STEPS) -> None:
    """A plain PyTorch loop: Adam on ``params``, cross-entropy on fresh batches of one training set."""
    opt = torch.optim.Adam(params, lr=LR)
    x, y = data(v, 4096, seed=0)
    for step in range(steps):
        i = torch.randint(0, len(x), (BATCH,), generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(forward(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()


@torch.no_grad()
def accuracy(forward: Forward, v: torch.Tensor) -> float:
    x, y = data(v, 2000, seed=99)
    return float((forward(x).argmax(-1) == y).float().mean())


def lora(build: Callable[[], nn.Module], targets: list[str], v: torch.Tensor, **extra) -> nn.Module:
    model = get_peft_model(build(), LoraConfig(r=RANK, lora_alpha=RANK, target_modules=targets, **extra))
    train([p for p in model.parameters() if p.requires_grad], lambda x: model(input_ids=x).logits, v)
    return model


def share(checkpoint: Path, build: Callable[[], nn.Module] = bert, **options) -> tuple[ShareModel, TrainableTask]:
    model = ShareModel.from_checkpoint(build(), checkpoint)
    return model, model.add_task("new", rank=RANK, **options)


def on(model: ShareModel, task: str | None = "new") -> Forward:
    return lambda x: model(input_ids=x, task=task).logits


# -- shared fixtures: old tasks trained with PEFT LoRA, consolidated ----------------------------------------------


@dataclass
class World:
    adapters: Path
    checkpoint: Path  # fixed k = K: every module has shared bases
    private_only: Path  # k = 0: every task keeps private factors only
    folder: Path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than two on a shared machine (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("training")
    for name, v in OLD.items():
        lora(bert, ["query", "value"], v).save_pretrained(root / "adapters" / name)
    inputs = [f"{name}={root / 'adapters' / name}" for name in OLD]
    api.merge(inputs, root / "share.safetensors", ConsolidationConfig(k=K))
    api.merge(inputs, root / "private.safetensors", ConsolidationConfig(k=0, private_rank=RANK))
    return World(root / "adapters", root / "share.safetensors", root / "private.safetensors", root)


@pytest.fixture(scope="module")
def related(world: World) -> dict:
    """The related task trained as an ordinary LoRA and coefficient-only (φ = 0)."""
    reference = lora(bert, ["query", "value"], RELATED)
    model, task = share(world.checkpoint)
    train(model.trainable_parameters(), on(model), RELATED)
    return {
        "lora": accuracy(lambda x: reference(input_ids=x).logits, RELATED),
        "lora_parameters": sum(p.numel() for p in reference.parameters() if p.requires_grad),
        "model": model,
        "task": task,
        "share": accuracy(on(model), RELATED),
    }


@pytest.fixture(scope="module")
def outside(world: World) -> dict:
    """The outside task trained coefficient-only with φ = 0 and with φ = 2 temporary directions."""
    out = {}
    for phi in (0, 2):
        model, task = share(world.checkpoint, new_directions=phi)
        train(model.trainable_parameters(), on(model), OUTSIDE)
        out[phi] = {"model": model, "task": task, "accuracy": accuracy(on(model), OUTSIDE)}
    return out


# -- training ----------------------------------------------------------------------------------------------------


def test_related_task_reaches_lora_accuracy_with_ten_times_fewer_trainable_parameters(related: dict) -> None:
    count = related["task"].count()
    trainable = sum(p.numel() for p in related["model"].trainable_parameters())
    assert count.share == trainable  # the reported count is what the optimizer gets
    assert count.lora == related["lora_parameters"]  # against PEFT's own LoRA of the same rank and modules
    assert count.ratio >= 10
    assert related["share"] >= 0.95 * related["lora"], related


def test_old_tasks_are_learned_and_the_base_model_is_at_chance(world: World) -> None:
    model = ShareModel.from_checkpoint(bert(), world.checkpoint)
    assert accuracy(on(model, None), RELATED) < 0.6
    for name, v in OLD.items():
        assert accuracy(on(model, name), v) > 0.75, name


def test_temporary_directions_help_a_task_outside_the_span(outside: dict) -> None:
    assert outside[0]["accuracy"] < 0.7
    assert outside[2]["accuracy"] > outside[0]["accuracy"] + 0.15


def test_temporary_directions_stay_orthogonal_to_the_bases_while_training(outside: dict) -> None:
    for module in outside[2]["task"].layers.values():
        D_B, D_A = module.directions()
        k_B, k_A = module.basis_B.shape[1], module.basis_A.shape[1]
        assert (module.basis_B.T @ D_B[:, k_B:]).abs().max() < 1e-5
        assert (module.basis_A.T @ D_A[:, k_A:]).abs().max() < 1e-5
        assert D_B[:, k_B:].norm(dim=0).min() > 0.1  # and they are real directions


def test_a_new_task_starts_at_exactly_zero_and_only_its_parameters_train(world: World) -> None:
    model, task = share(world.checkpoint, new_directions=2)
    x, _ = data(RELATED, 8, seed=3)
    assert torch.equal(model(input_ids=x, task="new").logits, model(input_ids=x, task=None).logits)
    trainable = {id(p) for p in model.trainable_parameters()}
    assert trainable == {id(p) for p in task.parameters()}
    assert {id(p) for p in model.base_model.parameters() if p.requires_grad} == trainable
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"coef_A", "coef_B", "phi_A", "phi_B"}
    assert all(m.coef_B.abs().max() == 0 for m in task.layers.values())


def test_a_second_new_task_freezes_the_first_and_any_valid_name_works(world: World) -> None:
    model, first = share(world.checkpoint)
    second = model.add_task("parameters.v2", rank=2)  # dots, and a name that is also a method's
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in second.parameters()}
    model.train_task("new", "parameters.v2")  # both train
    assert len(model.trainable_parameters()) == len(list(first.parameters())) + len(list(second.parameters()))
    x, _ = data(RELATED, 4, seed=2)
    assert model(input_ids=x, task=["new", "parameters.v2", "t0", None]).logits.shape == (4, 2)


def test_train_task_chooses_which_added_task_trains(world: World) -> None:
    """After a second add_task the first is frozen; train_task makes it the one that trains again."""
    model, first = share(world.checkpoint)
    second = model.add_task("second", rank=2)
    params = model.train_task("new")
    assert {id(p) for p in params} == {id(p) for p in first.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}  # nothing else
    x, y = data(RELATED, 512, seed=0)

    def loss() -> float:
        with torch.no_grad():
            return float(F.cross_entropy(on(model)(x), y))

    before = loss()
    train(params, on(model), RELATED, steps=40)
    assert loss() < before
    assert all(torch.count_nonzero(m.coef_B) == 0 for m in second.layers.values())  # the other did not move
    assert {id(p) for p in model.train_task("second")} == {id(p) for p in second.parameters()}
    with pytest.raises(UnknownTaskError, match="no trainable task named 't0'"):
        model.train_task("t0")  # a stored task is not trainable


def test_saving_or_folding_a_task_that_was_never_trained_is_refused_in_one_line(world: World, tmp_path: Path) -> None:
    model, _ = share(world.checkpoint)
    saved, folded = tmp_path / "saved", tmp_path / "folded.safetensors"
    for write in (lambda: model.save_task("new", saved), lambda: model.fold_into("new", world.checkpoint, folded)):
        with pytest.raises(UntrainedTaskError, match="'new' was never trained") as caught:
            write()
        assert "\n" not in str(caught.value)
    assert not saved.exists() and not folded.exists()


def test_rows_of_the_new_task_mix_with_stored_tasks_in_one_batch(related: dict) -> None:
    model = related["model"]
    x, _ = data(RELATED, 4, seed=4)
    tasks = ["new", "t0", None, "new"]
    mixed = model(input_ids=x, task=tasks).logits
    for i, t in enumerate(tasks):
        alone = model(input_ids=x[i : i + 1], task=t).logits
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(world: World) -> None:
    """Checkpointed layers run again during backward: the task must still be selected then, so the
    step (forward and backward) runs inside ``model.use(task)``, calling the base model."""
    x, y = data(RELATED, 16, seed=5)
    grads = []
    for checkpointing in (False, True):
        model, task = share(world.checkpoint, new_directions=1, seed=3)
        model.train()
        if checkpointing:
            model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with torch.no_grad():  # a non-zero E_B so that every parameter gets a gradient
            for m in task.layers.values():
                m.coef_B.normal_(generator=torch.Generator().manual_seed(0))
        with model.use("new"):
            F.cross_entropy(model.base_model(input_ids=x).logits, y).backward()
        grads.append([p.grad.clone() for p in model.trainable_parameters()])
    assert all(g.abs().max() > 0 for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_autocast_trains(world: World) -> None:
    model, task = share(world.checkpoint)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=x, task="new").logits.float()

    before = accuracy(forward, RELATED)
    train(model.trainable_parameters(), forward, RELATED, steps=100)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.trainable_parameters())
    assert accuracy(forward, RELATED) > max(before, 0.7)


def test_the_transformers_trainer_trains_it_with_gradient_checkpointing(world: World, tmp_path: Path) -> None:
    """The Trainer sees the base model only: inside ``model.use(task)`` its calls (and the recomputation
    of checkpointed layers during backward) run the new task, whose parameters the base model holds."""
    from transformers import Trainer, TrainingArguments

    model, task = share(world.checkpoint)
    x, y = data(RELATED, 4096, seed=0)
    rows = [{"input_ids": x[i], "labels": y[i]} for i in range(len(x))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    stored = model(input_ids=x[:8], task="t0").logits
    with model.use("new"):
        Trainer(model=model.base_model, args=args, train_dataset=rows).train()
    model.eval()
    assert accuracy(on(model), RELATED) > 0.75
    assert task.count().share == sum(p.numel() for p in model.base_model.parameters() if p.requires_grad)
    torch.testing.assert_close(model(input_ids=x[:8], task="t0").logits, stored)  # nothing else moved


# -- saving and folding --------------------------------------------------------------------------------------------


def assert_peft_gives_the_task(model, base: torch.nn.Module, path: Path, seed: int) -> tuple[PeftModel, torch.Tensor]:
    """The saved task, loaded with PEFT into a fresh ``base``, gives the model's outputs for task "new";
    returns the PEFT model and the inputs compared."""
    peft = PeftModel.from_pretrained(base, path).eval()
    x, _ = data(RELATED, 8, seed=seed)
    with torch.no_grad():
        torch.testing.assert_close(
            peft(input_ids=x).logits, model(input_ids=x, task="new").logits, rtol=1e-5, atol=1e-5
        )
    return peft, x


def test_saved_task_loads_with_peft_and_gives_the_same_outputs(related: dict, tmp_path: Path) -> None:
    model = related["model"]
    assert_peft_gives_the_task(model, bert(), model.save_task("new", tmp_path / "new"), seed=6)


def _reconstruction_gap(before: Checkpoint, after: Checkpoint, task: str, module: str) -> float:
    Bb, Ab = before.reconstruction(task, module)
    Ba, Aa = after.reconstruction(task, module)
    delta = Bb.double() @ Ab.double().T - Ba.double() @ Aa.double().T
    return float(delta.norm())


def test_folding_keeps_every_old_task_within_its_reported_drift(outside: dict, world: World, tmp_path: Path) -> None:
    model = outside[2]["model"]
    model.fold_into("new", world.checkpoint, tmp_path / "folded.safetensors")
    before, after = Checkpoint(world.checkpoint), Checkpoint(tmp_path / "folded.safetensors")
    assert after.history[-1]["tasks_added"] == ["new"]
    assert set(after.history[-1]["drift"]) == set(OLD)  # the history records every old task's drift
    grew = 0
    for module, info in after.modules.items():
        assert info["tasks"]["new"]  # the new task is in every module it trained
        for t in OLD:
            rec = info["tasks"][t]
            gap = _reconstruction_gap(before, after, t, module)
            assert gap <= (rec["drift"] * (1 + 1e-3) + 1e-6) * rec["norm"], (module, t)  # 1e-6: float32 storage
            assert rec["drift"] < 1e-5  # k grew by φ (fold_into's default): the old span is kept
        k_before = before.bases(module)[0].shape[1]
        grew += after.bases(module)[0].shape[1] > k_before
    assert grew  # the temporary directions became part of some bases
    # the folded task serves as it was trained, within its recorded error
    folded = ShareModel.from_checkpoint(bert(), after)
    x, _ = data(OUTSIDE, 256, seed=7)
    agree = (folded(input_ids=x, task="new").logits.argmax(-1) == on(model)(x).argmax(-1)).float().mean()
    assert agree > 0.95


def test_folding_a_task_trained_without_new_directions_keeps_the_span(
    related: dict, world: World, tmp_path: Path
) -> None:
    """With φ = 0 the new task's factors lie in span(β) and span(α): ``add`` finds no new direction,
    keeps k, and only rotates the old coefficients within the same span (drift at rounding level)."""
    related["model"].fold_into("new", world.checkpoint, tmp_path / "folded.safetensors")
    before, after = Checkpoint(world.checkpoint), Checkpoint(tmp_path / "folded.safetensors")
    for module, info in after.modules.items():
        for old, new in zip(before.bases(module), after.bases(module)):
            assert new.shape == old.shape
            outside_span = new.double() - old.double() @ (old.double().T @ new.double())
            assert outside_span.norm() < 1e-4, module
        for t in OLD:
            assert info["tasks"][t]["drift"] < 1e-5, (module, t)
            assert _reconstruction_gap(before, after, t, module) <= 1e-5 * info["tasks"][t]["norm"]


def test_folding_into_an_energy_checkpoint_adds_no_direction_but_may_drop_one(world: World, tmp_path: Path) -> None:
    """``add`` re-chooses k by the checkpoint's own rule (here an energy target) on the combined
    spectrum: with φ = 0 the new bases stay inside the old span, but a weak direction may be
    dropped; any old task that moves has its drift recorded, and it bounds the change."""
    inputs = [f"{name}={world.adapters / name}" for name in OLD]
    api.merge(inputs, tmp_path / "energy.safetensors", ConsolidationConfig(energy=0.9))
    model, _ = share(tmp_path / "energy.safetensors")
    train(model.trainable_parameters(), on(model), RELATED, steps=50)
    model.fold_into("new", tmp_path / "energy.safetensors", tmp_path / "folded.safetensors")
    before, after = Checkpoint(tmp_path / "energy.safetensors"), Checkpoint(tmp_path / "folded.safetensors")
    for module, info in after.modules.items():
        for old, new in zip(before.bases(module), after.bases(module)):
            assert new.shape[1] <= old.shape[1]
            assert (new.double() - old.double() @ (old.double().T @ new.double())).norm() < 1e-4, module
        for t in OLD:
            rec = info["tasks"][t]
            gap = _reconstruction_gap(before, after, t, module)
            assert gap <= (rec["drift"] * (1 + 1e-3) + 1e-6) * rec["norm"], (module, t)


# -- modules without shared bases ----------------------------------------------------------------------------------


def test_private_only_checkpoint_trains_in_the_principal_subspace_of_its_tasks(world: World, tmp_path: Path) -> None:
    model = ShareModel.from_checkpoint(bert(), world.private_only)
    assert all(layer.basis_B is None for layer in model._layers.values())
    task = model.add_task("new", rank=RANK, k=12)
    assert all(m.subspace == "principal" and m.basis_B.shape[1] == 12 for m in task.layers.values())
    for m in task.layers.values():  # orthonormal, and spanned by the stored tasks' factors
        layer = model._layers[m.name]
        torch.testing.assert_close(m.basis_B.T @ m.basis_B, torch.eye(12), atol=1e-5, rtol=0)
        stack = torch.cat([layer.factors.private(t)[0] for t in layer.factors.private_ranks], 1)
        q, _ = torch.linalg.qr(stack.double())
        assert (m.basis_B.double() - q @ (q.T @ m.basis_B.double())).norm() < 1e-4
    assert task.count().ratio >= 5
    train(model.trainable_parameters(), on(model), RELATED)
    assert accuracy(on(model), RELATED) > 0.75
    # the checkpoint's plan (k = 0, private rank 4 = p) stores the task's factors, which lie in the
    # subspace, as its private factors: exactly, and no old task moves
    model.fold_into("new", world.private_only, tmp_path / "folded.safetensors")
    after = Checkpoint(tmp_path / "folded.safetensors")
    for info in after.modules.values():
        assert info["tasks"]["new"]["error"] < 1e-5
        for t in OLD:
            assert info["tasks"][t].get("drift", 0) == 0
    folded = ShareModel.from_checkpoint(bert(), after)
    x, _ = data(RELATED, 16, seed=9)
    torch.testing.assert_close(folded(input_ids=x, task="new").logits, on(model)(x), rtol=1e-4, atol=1e-4)
    # with k given, the principal subspace becomes the module's shared basis
    model.fold_into("new", world.private_only, tmp_path / "shared.safetensors", k=12)
    shared = Checkpoint(tmp_path / "shared.safetensors")
    for module in shared.modules:
        basis, _ = shared.bases(module)
        trained = task.module(module[len("base_model.model.") :]).basis_B.double()
        assert basis is not None and basis.shape[1] <= 12
        assert (basis.double() - trained @ (trained.T @ basis.double())).norm() < 1e-4


def test_energy_sets_the_principal_subspace_rank(world: World) -> None:
    small = ShareModel.from_checkpoint(bert(), world.private_only).add_task("new", energy=0.5)
    large = ShareModel.from_checkpoint(bert(), world.private_only).add_task("new", energy=0.99)
    for name in small.module_names:
        assert 1 <= small.module(name).basis_B.shape[1] < large.module(name).basis_B.shape[1] <= 4 * RANK


# -- heads and a GPT-2-like model ------------------------------------------------------------------------------------


def test_a_gpt2_task_with_its_own_head_trains_saves_and_loads_with_peft(tmp_path: Path) -> None:
    for name in ("t0", "t1"):
        lora(gpt2, ["c_attn"], OLD[name], fan_in_fan_out=True).save_pretrained(tmp_path / name)
    api.merge([f"{n}={tmp_path / n}" for n in ("t0", "t1")], tmp_path / "gpt2.safetensors", ConsolidationConfig(k=6))
    model = ShareModel.from_checkpoint(gpt2(), tmp_path / "gpt2.safetensors")
    base_score = copy.deepcopy(model.base_model.score.weight)
    task = model.add_task("new", rank=RANK, new_directions=2, heads=["score"])
    assert task.count().heads == base_score.numel()
    train(model.trainable_parameters(), on(model), RELATED)
    assert accuracy(on(model), RELATED) > 0.7
    assert torch.equal(model.heads_of("t0")["score"].weight, base_score)  # other tasks keep the base head
    peft, x = assert_peft_gives_the_task(model, gpt2(), model.save_task("new", tmp_path / "new"), seed=8)
    report = model.fold_into("new", tmp_path / "gpt2.safetensors", tmp_path / "folded.safetensors")
    assert report is not None
    folded = ShareModel.from_checkpoint(gpt2(), tmp_path / "folded.safetensors")
    torch.testing.assert_close(folded(input_ids=x, task="new").logits, peft(input_ids=x).logits, rtol=1e-3, atol=1e-3)


# -- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"name": "t1"}, DuplicateTaskError, "already exists"),
        ({"new_directions": 200}, InvalidOptionError, "free dimension"),
        (
            {"modules": ["bert.encoder.layer.0.attention.self.key"]},
            ModelMismatchError,
            "not a module of the checkpoint",
        ),
        ({"heads": ["nowhere"]}, ModelMismatchError, "no module"),
        ({"rank": 0}, InvalidOptionError, "rank"),
        ({"name": "a/b"}, InvalidTaskNameError, "path separator"),
    ],
)
def test_bad_input_is_one_clear_error_and_changes_nothing(world: World, options: dict, error: type, words: str) -> None:
    model = ShareModel.from_checkpoint(bert(), world.checkpoint)
    name = options.pop("name", "new")
    with pytest.raises(error, match=words) as caught:
        model.add_task(name, **options)
    assert isinstance(caught.value, ShareError) and "\n" not in str(caught.value)
    assert model.tasks == list(OLD) and model.trainable_parameters() == []


def test_saving_an_unknown_trainable_task_names_the_known_ones(related: dict, tmp_path: Path) -> None:
    with pytest.raises(ShareError, match="no trainable task named 't0'.*new"):
        related["model"].save_task("t0", tmp_path / "x")


def test_add_task_and_fold_into_take_the_keywords_of_what_they_call() -> None:
    """ShareModel.add_task takes add_trainable_task's keywords and fold_into takes add's options, by name
    and default (no **options: a misspelt option is a TypeError at the call, and IDEs list them)."""
    import inspect

    from share_convert.runtime import add_trainable_task

    def keywords(fn: Callable, skip: int) -> dict[str, object]:
        params = list(inspect.signature(fn).parameters.values())[skip:]
        assert all(p.kind is not p.VAR_KEYWORD for p in params), f"{fn.__qualname__} takes **options"
        return {p.name: p.default for p in params}

    assert keywords(ShareModel.add_task, 1) == keywords(add_trainable_task, 1)  # after self / model
    assert keywords(ShareModel.fold_into, 4) == keywords(api.add, 3)  # after (self,) name, checkpoint, output
    assert inspect.signature(ShareModel.add_task).return_annotation == "TrainableTask"
