"""Tiny Hugging Face models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM


def tiny_bert(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    """BERT classifier: 2 layers, 4 heads of 8 (hidden 32), FFN 64."""
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Llama decoder with grouped-query attention: 4 query heads, 2 key-value heads of 8."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def token_batch(batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (batch, length), generator=g)


def randomize_adapters(model, seed: int = 0, scale: float = 0.3) -> None:
    """Give every adapter non-zero values so that outputs differ from the base."""
    from dynarank import elastic_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in elastic_layers(model).values():
            for p in layer.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
