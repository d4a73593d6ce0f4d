"""Builders the tests share: one home for what several test files make from scratch.

- :mod:`.adapters`: PEFT adapter folders from factors, kohya and diffusers LoRA files from factors,
  random factors. Light (torch and safetensors only): any test may import it.
- :mod:`.models`: tiny transformers models built from configs (random weights, nothing downloaded):
  GPT-2, DistilBERT, BERT, ViT and Llama, each seeded so that two calls build the same weights.
- :mod:`.pipelines`: tiny SD 1.5-like, SDXL-like and Flux-like diffusers pipelines, and kohya and
  diffusers LoRA files written from their real module names and shapes, with the ΔW each file means.

The submodules are imported by name (``from .builders.models import llama``) so that a test that
needs only adapters does not pay for importing transformers or diffusers.
"""
