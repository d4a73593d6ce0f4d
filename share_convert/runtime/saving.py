"""A trained task out of the runtime: written as a standard PEFT LoRA adapter, or folded into a checkpoint.

:func:`save_task` writes the task's factors per module (B = D_B E_B and A = (D_A E_A)ᵀ, scale folded)
and its head copies as a PEFT folder; :func:`fold_into` saves it to a temporary folder and gives it to
``add``, so that a trained task enters a checkpoint exactly as an adapter given to ``share-convert add``
would. A task that was never trained is refused by both. The API is documented in docs/training.md.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..checkpoint.sharding import DEFAULT_MAX_SHARD_SIZE
from ..errors import UntrainedTaskError
from ..files.atomic import publish_dir, temp_dir_beside
from ..io.export import prepare_output_dir
from ..io.peft import PEFT_PREFIX
from ..names import path_under
from .training import ServingModel, TrainableTask, trainable_task

if TYPE_CHECKING:
    from ..config import ConsolidationConfig
    from ..report.summary import Report


@torch.no_grad()
def check_trained(model: ServingModel, task: TrainableTask) -> None:
    """Refuse a task that was never trained: E_B starts at zero, so its ΔW is still exactly zero in every
    module, and its head copies still equal the modules they were copied from."""
    if any(torch.count_nonzero(m.coef_B) for m in task.layers.values()):  # type: ignore[arg-type]
        return
    for path in task.head_names:
        trained, base = task.head(path).state_dict(), model._heads[path].base_module.state_dict()
        if trained.keys() != base.keys() or any(not torch.equal(v, base[k].to(v)) for k, v in trained.items()):
            return
    raise UntrainedTaskError(
        f"task {task.name!r} was never trained (its ΔW is zero in every module and its heads are the base "
        "model's): nothing was written",
        hint=f"Train it first; model.train_task({task.name!r}) makes it the task that trains",
    )


def adapter_config(model: ServingModel, task: TrainableTask) -> dict[str, Any]:
    """A PEFT LoRA config for the trained task: exact target paths, r = lora_alpha = p (scale 1)."""
    transposed = any(model._layers[m].kind.transposed for m in task.module_names)
    cls = type(model.base_model).__name__
    # PEFT's SEQ_CLS / TOKEN_CLS add the classifier to modules_to_save and expect its tensors:
    # a task that trains no head is written without a task type (the model's head is used as is).
    if cls.endswith(("ForCausalLM", "LMHeadModel")):
        task_type: str | None = "CAUSAL_LM"
    elif task.head_names and cls.endswith("ForSequenceClassification"):
        task_type = "SEQ_CLS"
    elif task.head_names and cls.endswith("ForTokenClassification"):
        task_type = "TOKEN_CLS"
    else:
        task_type = None
    rank = max(m.rank for m in task.layers.values())  # type: ignore[type-var]
    config = getattr(model.base_model, "config", None)
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(config, "_name_or_path", None) or None,
        "target_modules": sorted(task.module_names),
        "modules_to_save": sorted(task.head_names) or None,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": transposed,
        "bias": "none",
        "inference_mode": True,
    }


@torch.no_grad()
def adapter_tensors(task: TrainableTask) -> dict[str, torch.Tensor]:
    """The task's PEFT tensors (float32, CPU): lora_A p × d and lora_B n × p per module, then head tensors."""
    tensors: dict[str, torch.Tensor] = {}
    for path in task.module_names:
        B, A = task.module(path).factors()
        tensors[f"{PEFT_PREFIX}{path}.lora_A.weight"] = A.float().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{path}.lora_B.weight"] = B.float().cpu().contiguous()
    for path in task.head_names:
        for leaf, value in task.head(path).state_dict().items():
            tensors[f"{PEFT_PREFIX}{path}.{leaf}"] = value.float().cpu().contiguous()
    return tensors


def save_task(model: ServingModel, name: str, path: str | Path, *, force: bool = False) -> Path:
    """Write trainable task ``name`` to the folder ``path`` as a standard PEFT LoRA adapter (scale folded).

    A task that was never trained is refused (:class:`~share_convert.errors.UntrainedTaskError`).
    """
    task = trainable_task(model, name)
    check_trained(model, task)
    output = Path(path)
    prepare_output_dir(output, force)
    tmp = temp_dir_beside(output)
    try:
        save_file(adapter_tensors(task), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = adapter_config(model, task)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        publish_dir(tmp, output)  # with the modes the umask gives (safetensors writes 0600, mkdtemp 0700)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def fold_into(
    model: ServingModel,
    name: str,
    checkpoint: str | Path,
    output: str | Path,
    *,
    config: ConsolidationConfig | None = None,
    k: int | None = None,
    target_error: float | None = None,
    alpha: float | None = None,
    device: str | None = None,
    replace: bool = False,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    wait: bool = True,
    on_wait: Callable[[str], None] | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> Report:
    """Fold trainable task ``name`` into ``checkpoint``, writing ``output``: the same engine as ``add``.

    The task is saved as a PEFT adapter in a temporary folder and given to :func:`share_convert.api.add`
    with the options here (``config``, ``k``, ``target_error``... mean what they mean there). Without
    ``k`` or ``config``, a checkpoint made with a fixed k is folded with k + φ, so that the task's
    temporary directions become part of the bases instead of being truncated away. Returns ``add``'s
    report; the checkpoint's history records the drift of every old task. A task that was never
    trained is refused (:class:`~share_convert.errors.UntrainedTaskError`).
    """
    # Through the API, lazily (the one place above the runtime that it reaches): api.add is where a
    # checkpoint path (hf://, a folder, a shard index) is opened, the output's writers take turns, the
    # checkpoint's own options are the defaults, inputs are classified and the report is read back;
    # calling the engine's add from here would write those steps a second time.
    from .. import api

    task = trainable_task(model, name)
    check_trained(model, task)
    if k is None and config is None:
        with api.open_checkpoint(checkpoint) as ckpt:
            fixed = ckpt.config.get("k")
        if fixed is not None and task.new_directions:
            k = fixed + task.new_directions
    with tempfile.TemporaryDirectory(prefix="share-train-") as tmp:
        folder = path_under(tmp, name)
        save_task(model, name, folder)
        return api.add(
            checkpoint,
            [f"{name}={folder}"],
            output,
            config,
            k=k,
            target_error=target_error,
            alpha=alpha,
            device=device,
            replace=replace,
            force=force,
            progress=progress,
            max_shard_size=max_shard_size,
            wait=wait,
            on_wait=on_wait,
            executor=executor,
            ray_address=ray_address,
        )


__all__ = ["adapter_config", "adapter_tensors", "check_trained", "fold_into", "save_task"]
