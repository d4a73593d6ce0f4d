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

    ``coefficients`` include the zero padding and the zero slot of their stacks; ``private`` holds
    each task's private rows once, unpadded (as codes and scales where they are kept quantized);
    ``lora_equivalent`` is what the same tasks would hold as plain LoRA factors of rank p + q per
    module in the same dtype (unpadded), the figure the Share layout is to be compared with.

    ``dequantized_from``: for a checkpoint that stores factors as int8 or NF4 codes (format version
    4), the bytes those codes and their scales take in the file, by precision, for what is loaded:
    the runtime dequantizes them at load and holds them in the layers' dtype (the figures above).
    Empty for float checkpoints, and for the parts kept as codes (``keep_quantized=True``; left out of
    :meth:`as_dict` when empty).

    ``held``: the bytes of ``adapters`` by the precision they are held at (``float32``, ``bfloat16``…,
    or ``int8`` / ``nf4`` for codes with their scales).
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
    bases = coefficients = private = index = backup = lora = 0
    coded: dict[str, int] = {}
    held: dict[str, int] = {}

    def hold(precision: str, size: int) -> None:
        if size:
            held[precision] = held.get(precision, 0) + size

    for layer in layers.values():
        f = layer.factors
        for precision, size in getattr(f, "dequantized_from", {}).items():
            coded[precision] = coded.get(precision, 0) + size
        bases += _nbytes(layer.basis_A) + _nbytes(layer.basis_B)
        coefficients += _nbytes(f.coef_A) + _nbytes(f.coef_B)
        private += f.private_A.nbytes + f.private_Bt.nbytes
        index += _nbytes(f.coef_slot)
        for t in (layer.basis_A, layer.basis_B, f.coef_A, f.coef_B, f.coef_slot):
            if t is not None:
                hold(_precision(t), _nbytes(t))
        for store in (f.private_A, f.private_Bt):
            hold(store.held_as, store.nbytes)
        backup += _nbytes(layer._backup)
        ranks = {t: s[5] for t, s in f.spans.items()}
        for t, (_, q) in f.private_ranks.items():
            ranks[t] = ranks.get(t, 0) + q
        size = f.coef_A.element_size()
        lora += sum(ranks.values()) * (layer.out_features + layer.in_features) * size
    head_tensors = [t for head in heads.values() for m in head.copies.values() for t in _tensors_of(m)]
    for t in head_tensors:
        hold(_precision(t), _nbytes(t))
    return MemoryReport(
        tasks=tasks,
        modules=len(layers),
        bases=bases,
        coefficients=coefficients,
        private=private,
        heads=sum(_nbytes(t) for t in head_tensors),
        index=index,
        merge_backup=backup,
        lora_equivalent=lora,
        dequantized_from=dict(sorted(coded.items())),
        held=dict(sorted(held.items())),
    )


__all__ = ["MemoryReport", "memory_report"]
