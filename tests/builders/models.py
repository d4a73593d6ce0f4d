"""Tiny transformers models built from configs: random weights, nothing downloaded.

Each builder seeds torch's global generator with 0 before building, so that two calls give the
same weights (a test compares a model with a copy built again, and PEFT's reference with the
runtime's model). Sizes are the smallest that keep what the tests need: the GPT-2 models are
GPT-2-shaped (12 layers of 768) because the real GPT-2 adapters must fit them; the vocabulary is
small wherever the tests' token ids allow it (the embedding is most of a default model's weights).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

VOCAB = 1000


def _dropout(bert: bool, dropout: float | None) -> dict[str, float]:
    """Config fields that set every dropout to ``dropout``; none when it is None (the config's defaults)."""
    if dropout is None:
        return {}
    if bert:
        return {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    return {"resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout}


def gpt2_classifier(
    labels: int = 2,
    *,
    layers: int = 12,
    hidden: int = 768,
    heads: int = 12,
    vocab: int = VOCAB,
    positions: int = 64,
    dropout: float | None = None,
) -> nn.Module:
    """A GPT-2 sequence classifier (pad token 0) with a score head of ``labels`` outputs, in eval mode."""
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab, n_positions=positions, pad_token_id=0,
        num_labels=labels, **_dropout(False, dropout),
    )  # fmt: skip
    return GPT2ForSequenceClassification(cfg).eval()


def gpt2_lm(labels: int = 0) -> nn.Module:
    """A GPT-2-shaped language model (12 layers of 768, vocabulary 1000), in eval mode; ``labels`` is
    ignored (a builder's signature, shared with the classifiers)."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=VOCAB, n_positions=64)).eval()


def distilbert(labels: int = 2) -> nn.Module:
    """A DistilBERT-base-shaped sequence classifier (vocabulary 1000), in eval mode."""
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=VOCAB, num_labels=labels)).eval()


def bert_classifier(
    labels: int = 2,
    *,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 2,
    intermediate: int = 512,
    vocab: int = VOCAB,
    dropout: float | None = None,
) -> nn.Module:
    """A BERT sequence classifier, bert-tiny-shaped by default (2 layers of 128), in eval mode."""
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, num_labels=labels, **_dropout(True, dropout),
    )  # fmt: skip
    return BertForSequenceClassification(cfg).eval()


def vit(labels: int = 7) -> nn.Module:
    """A ViT-base-shaped image classifier on 32×32 images (patches of 16), in eval mode."""
    torch.manual_seed(0)
    return ViTForImageClassification(ViTConfig(image_size=32, patch_size=16, num_labels=labels)).eval()


def llama(
    labels: int = 0,
    *,
    vocab: int = VOCAB,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    positions: int = 64,
) -> nn.Module:
    """A Llama causal LM (2 layers of 64 by default: the synthetic adapters' shapes), in eval mode;
    ``labels`` is ignored (a builder's signature, shared with the classifiers)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=positions,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def tokens(rows: int = 4, length: int = 8, vocab: int = VOCAB) -> dict[str, torch.Tensor]:
    """Fixed token ids (1 … vocab-1; 0 is the pad token) as a model's keyword inputs."""
    return {"input_ids": torch.randint(1, vocab, (rows, length), generator=torch.Generator().manual_seed(0))}


def pixels(rows: int = 4) -> dict[str, torch.Tensor]:
    """Fixed 32×32 RGB images as a ViT's keyword inputs."""
    return {"pixel_values": torch.randn(rows, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
