"""What a :class:`ShareModel` holds in memory beyond its base model: bases once per module, then per task."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .heads import ShareHead
from .layers import ShareLayer


@dataclass
class MemoryReport:
    """Bytes held by a :class:`ShareModel` beyond the base model (tensors only, as held).

    ``coefficients`` held as values are stacked: they include the zero padding to the module's
    largest rank and the zero slot (``coefficient_padding``: those bytes); held as codes
    (``keep_quantized``) they are ragged, without padding. ``private`` holds each task's private
    rows once, unpadded (as codes and scales where they are kept quantized);
    ``lora_equivalent`` is what the same tasks would hold as plain LoRA factors of rank p + q per
    module in the same dtype (unpadded), the figure the Share layout is to be compared with.

    ``dequantized_from``: for a checkpoint that stores factors as int8 or NF4 codes (format version
    4), the bytes those codes and their scales take in the file, by precision, for what is loaded:
    the runtime dequantizes them at load and holds them in the layers' dtype (the figures above).
    Empty for float checkpoints, and for the parts kept as codes (``keep_quantized=True``, the
    default; left out of :meth:`as_dict` when empty).

    ``held``: the bytes of ``adapters`` by the precision they are held at (``float32``, ``bfloat16``…,
    or ``int8`` / ``nf4`` for codes with their scales); ``by_role``: the same split for each role
    (``bases``, ``coefficients``, ``private``, ``heads``, ``index``).
    """

    tasks: int
    modules: int
    bases: int
    coefficients: int
    private: int
    heads: int
    index: int
    merge_backup: int
    lora_equivalent: int
    dequantized_from: dict[str, int] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    by_role: dict[str, dict[str, int]] = field(default_factory=dict)
    coefficient_padding: int = 0

    @property
    def adapters(self) -> int:
        """Everything the tasks add: bases, coefficients, private factors, heads and slot maps."""
        return self.bases + self.coefficients + self.private + self.heads + self.index

    @property
    def per_task(self) -> float:
        """Bytes per task beyond the shared bases."""
        return (self.adapters - self.bases) / max(self.tasks, 1)

    def as_dict(self) -> dict[str, Any]:
        out = dict(asdict(self), adapters=self.adapters, per_task=self.per_task)
        if not self.dequantized_from:
            out.pop("dequantized_from")
        else:
            out["note"] = (
                "the checkpoint stores some factors as "
                + " and ".join(sorted(self.dequantized_from))
                + " codes (dequantized_from: their bytes in the file); they are held dequantized"
            )
        return out


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _precision(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tensors_of(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def memory_report(tasks: int, layers: dict[str, ShareLayer], heads: dict[str, ShareHead]) -> MemoryReport:
    """The :class:`MemoryReport` of ``tasks`` loaded tasks served by ``layers`` and ``heads``."""
    coded: dict[str, int] = {}
    roles: dict[str, dict[str, int]] = {}
    backup = lora = padding = 0

    def hold(role: str, precision: str, size: int) -> None:
        if size:
            held = roles.setdefault(role, {})
            held[precision] = held.get(precision, 0) + size

    def hold_tensor(role: str, t: torch.Tensor | None) -> None:
        if t is not None:
            hold(role, _precision(t), _nbytes(t))

    for layer in layers.values():
        f = layer.factors
        for precision, size in getattr(f, "dequantized_from", {}).items():
            coded[precision] = coded.get(precision, 0) + size
        for t, store in ((layer.basis_A, layer.coded_A), (layer.basis_B, layer.coded_B)):
            hold_tensor("bases", t)
            if store is not None:
                hold("bases", store.held_as, store.nbytes)
        hold_tensor("coefficients", f.coef_A)
        hold_tensor("coefficients", f.coef_B)
        for store in f.ragged.stores() if f.ragged is not None else ():
            hold("coefficients", store.held_as, store.nbytes)
        hold_tensor("index", f.coef_slot)
        for store in (f.private_A, f.private_Bt):
            hold("private", store.held_as, store.nbytes)
        backup += _nbytes(layer._backup)
        ranks = {t: s[5] for t, s in f.spans.items()}
        if f.ragged is None:  # the stacks' bytes beyond each task's own k × p rows
            used = sum(p * (s[2] - s[1] + s[4] - s[3]) for t, s in f.spans.items() for p in (s[5],))
            padding += _nbytes(f.coef_A) + _nbytes(f.coef_B) - used * f.coef_A.element_size()
        for t, (_, q) in f.private_ranks.items():
            ranks[t] = ranks.get(t, 0) + q
        lora += sum(ranks.values()) * (layer.out_features + layer.in_features) * f.coef_A.element_size()
    head_tensors = [t for head in heads.values() for m in head.copies.values() for t in _tensors_of(m)]
    for t in head_tensors:
        hold_tensor("heads", t)
    total: dict[str, int] = {}
    for held in roles.values():
        for precision, size in held.items():
            total[precision] = total.get(precision, 0) + size

    def role(name: str) -> int:
        return sum(roles.get(name, {}).values())

    return MemoryReport(
        tasks=tasks,
        modules=len(layers),
        bases=role("bases"),
        coefficients=role("coefficients"),
        private=role("private"),
        heads=role("heads"),
        index=role("index"),
        merge_backup=backup,
        lora_equivalent=lora,
        dequantized_from=dict(sorted(coded.items())),
        held=dict(sorted(total.items())),
        by_role={name: dict(sorted(held.items())) for name, held in sorted(roles.items())},
        coefficient_padding=padding,
    )


__all__ = ["MemoryReport", "memory_report"]
