"""Where each checkpoint module lies in the model being served: a plain model, one component of a
diffusers pipeline (a UNet, a Flux transformer, a text encoder), or a whole pipeline.

A checkpoint made from PEFT adapters names its modules by PEFT key (``base_model.model.…``), the
model's own paths behind PEFT's prefix. A checkpoint made from text-to-image LoRAs (kohya, diffusers
or PEFT adapters of a pipeline component, share_convert.io.t2i) names them canonically: the
component, then the diffusers module path (``unet.down_blocks.1.attentions.0.proj_in``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``transformer.…``). Such a checkpoint
is served by

- a pipeline (anything whose components are attributes: ``pipe.unet``, ``pipe.text_encoder``…):
  every module of the checkpoint, in its component;
- one component: the modules of that component, the others' left out (serve them with the
  pipeline, or with one :class:`~share_convert.runtime.model.ShareModel` per component). Which
  component a model is, is ``component=`` or, left out, the one component of the checkpoint whose
  every module the model holds with the checkpoint's shapes.

Text encoders' paths are found with and without CLIP's ``text_model.`` wrapper (kohya files name it;
newer transformers versions have none).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..checkpoint.reader import Checkpoint
from ..errors import InvalidOptionError, ModelMismatchError
from ..io.t2i.naming import COMPONENTS
from .layers import layer_kind, model_path, submodule


def is_pipeline(model: Any) -> bool:
    """Whether ``model`` is a diffusion pipeline (not a module, with at least one component module)."""
    return not isinstance(model, nn.Module) and any(isinstance(getattr(model, c, None), nn.Module) for c in COMPONENTS)


def is_t2i(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint's modules carry canonical text-to-image names (``unet.…``)."""
    return any(isinstance(record.get("t2i"), dict) for record in ckpt.tasks.values())


def module_paths(model: Any, ckpt: Checkpoint, modules: list[str], component: str | None) -> dict[str, str]:
    """The path in ``model`` of each of ``modules`` (checkpoint names) that ``model`` serves.

    A module of a text-to-image checkpoint that lies in another component than ``model`` is left
    out; every other module must resolve (the caller checks that the module exists).
    """
    if not is_t2i(ckpt):
        if component is not None:
            raise InvalidOptionError(
                "component= is for checkpoints of text-to-image LoRAs", path=ckpt.path, hint="Leave it out"
            )
        if not isinstance(model, nn.Module):
            raise InvalidOptionError(
                f"a {type(model).__name__} is not a torch module", hint="Pass the model the adapters were trained on"
            )
        return {m: model_path(m) for m in modules}
    by_component: dict[str, list[str]] = {}
    for m in modules:
        head = m.split(".", 1)[0]
        by_component.setdefault(head if head in COMPONENTS else "", []).append(m)
    if "" in by_component:
        raise ModelMismatchError(
            f"module {by_component[''][0]} of a text-to-image checkpoint names no pipeline component",
            path=ckpt.path,
            hint="Re-create the checkpoint",
        )
    if is_pipeline(model):
        if component is not None:
            raise InvalidOptionError(
                "component= is for serving one component; a pipeline serves all of them", hint="Leave it out"
            )
        missing = [c for c in by_component if not isinstance(getattr(model, c, None), nn.Module)]
        if missing:
            raise ModelMismatchError(
                f"the checkpoint adapts {missing[0]}, which this {type(model).__name__} lacks",
                path=ckpt.path,
                hint="Load it into the pipeline of the base model the LoRAs were made for",
            )
        return {m: f"{c}.{_inner(getattr(model, c), m)}" for c, ms in by_component.items() for m in ms}
    if not isinstance(model, nn.Module):
        raise InvalidOptionError(
            f"a {type(model).__name__} is neither a pipeline nor a torch module",
            hint="Pass the pipeline or one of its components (pipe.unet, pipe.transformer, pipe.text_encoder…)",
        )
    if component is None:
        component = _infer(model, ckpt, by_component)
    elif component not in by_component:
        raise InvalidOptionError(
            f"component={component!r}: the checkpoint adapts {', '.join(sorted(by_component))}",
            path=ckpt.path,
            hint="Name one of them",
        )
    return {m: _inner(model, m) for m in by_component[component]}


def _inner(model: nn.Module, module: str) -> str:
    """A canonical module's path inside its component ``model`` (with or without ``text_model.``)."""
    path = module.split(".", 1)[1]
    if path.startswith("text_model.") and not _has(model, path) and _has(model, path[len("text_model.") :]):
        return path[len("text_model.") :]
    return path


def _has(model: nn.Module, path: str) -> bool:
    try:
        submodule(model, path)
    except AttributeError:
        return False
    return True


def _infer(model: nn.Module, ckpt: Checkpoint, by_component: dict[str, list[str]]) -> str:
    """The one component of the checkpoint whose every module ``model`` holds with the checkpoint's shapes."""
    fitting = [c for c, modules in by_component.items() if all(_fits(model, ckpt, m) for m in modules)]
    if len(fitting) == 1:
        return fitting[0]
    adapted = ", ".join(sorted(by_component))
    if not fitting:
        raise ModelMismatchError(
            f"this {type(model).__name__} is none of the components the checkpoint adapts ({adapted})",
            path=ckpt.path,
            hint="Pass the pipeline, or the component of the base model the LoRAs were made for",
        )
    raise InvalidOptionError(
        f"this {type(model).__name__} fits several components of the checkpoint ({', '.join(fitting)})",
        path=ckpt.path,
        hint=f"Say which with component= (one of {', '.join(fitting)})",
    )


def _fits(model: nn.Module, ckpt: Checkpoint, module: str) -> bool:
    path = _inner(model, module)
    if not _has(model, path):
        return False
    target = submodule(model, path)
    kind = layer_kind(target)
    info = ckpt.modules[module]
    return kind is not None and kind.fits(target.weight, info["out_features"], info["in_features"])


__all__ = ["is_pipeline", "is_t2i", "module_paths"]
