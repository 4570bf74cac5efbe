"""Tiny Hugging Face models built from configs (no downloads), shared by the tests."""

from __future__ import annotations

import zlib

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from dynarank.training.data import Examples

# The shape of every tiny encoder: 2 layers, 4 heads of 8 (hidden 32), FFN 64.
TINY_ENCODER = dict(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)

# The shape of every tiny decoder: 2 layers, grouped-query attention with 4 query and 2 key-value heads of 8.
TINY_DECODER = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)


def tiny_bert(num_labels: int = 2, seed: int = 0, **shape) -> BertForSequenceClassification:
    """BERT classifier of the TINY_ENCODER shape; ``shape`` overrides some of it (e.g. hidden_size=48)."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**{**TINY_ENCODER, **shape}, num_labels=num_labels)).eval()


def tiny_roberta(num_labels: int = 2, seed: int = 0) -> RobertaForSequenceClassification:
    """RoBERTa classifier, whose task head holds Linear modules of its own (classifier.dense / out_proj)."""
    torch.manual_seed(seed)
    config = RobertaConfig(**TINY_ENCODER, num_labels=num_labels, pad_token_id=1)
    return RobertaForSequenceClassification(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Llama decoder of the TINY_DECODER shape (grouped-query attention: 4 query heads, 2 key-value heads of 8)."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY_DECODER, vocab_size=100, tie_word_embeddings=False)).eval()


def tiny_bart(encoder_heads: int = 4, decoder_heads: int = 4, seed: int = 0):
    """BART of one encoder and one decoder layer (d_model 32), with each side's own head count."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    shape = dict(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, max_position_embeddings=64)
    heads = dict(encoder_attention_heads=encoder_heads, decoder_attention_heads=decoder_heads)
    return BartForConditionalGeneration(BartConfig(**shape, **heads, encoder_ffn_dim=48, decoder_ffn_dim=48)).eval()


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


def train_on_one_batch(model, opt, steps: int) -> torch.Tensor:
    """``steps`` optimizer steps of a tiny classifier on one fixed batch (token_batch(8, 6), labels 0, 1, ...);
    returns its input ids."""
    x, labels = token_batch(8, 6), torch.tensor([0, 1] * 4)
    for _ in range(steps):
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return x


def training_args(output_dir, **arguments):
    """TrainingArguments of a short CPU run of a tiny model: batches of 8, learning rate 1e-2, no reports, no saves,
    no progress bars; ``arguments`` add to or override these."""
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**settings, **arguments})


# A chat template for the MiniLM tokenizer: every turn "<role> content [SEP]" ([SEP] ends a turn, and is the EOS).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<' + m['role'] + '> ' + m['content'] + ' [SEP] ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)


def save_tiny_model_dir(path, kind: str = "bert", dropout: bool = True, chat: bool = False):
    """Save a tiny BERT classifier or Llama causal LM with the packaged MiniLM tokenizer (real text
    tokenizes) into ``path``: a model directory the CLI can load. ``chat``: the tokenizer gets TINY_CHAT_TEMPLATE and
    [SEP] as its end-of-sequence token. Returns ``path``."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from dynarank.training.models import packaged_minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    if chat:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
        tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    if kind == "bert":
        p = 0.1 if dropout else 0.0
        config = BertConfig(
            **{**TINY_ENCODER, "vocab_size": tokenizer.vocab_size},
            hidden_dropout_prob=p,
            attention_probs_dropout_prob=p,
        )
        model = BertForSequenceClassification(config)
    else:
        config = LlamaConfig(
            **TINY_DECODER,
            vocab_size=tokenizer.vocab_size,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class TokenDataset(torch.utils.data.Dataset):
    """Random token sequences labelled by their first token (a Trainer data set)."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class WordTokenizer:
    """Whitespace tokenizer over a 100-id vocabulary (id 0 pads)."""

    pad_token_id = 0

    def __call__(self, texts, truncation=True, max_length=16):
        # crc32, not hash(): Python salts str hashes per process, and the data must not change between runs.
        return {"input_ids": [[1 + zlib.crc32(w.encode()) % 99 for w in t.split()][:max_length] for t in texts]}


def examples(n: int = 48) -> Examples:
    words = [["good", "great", "fine"], ["bad", "awful", "poor"]]
    texts = [f"it was {words[i % 2][i % 3]} and {words[i % 2][(i + 1) % 3]} {i}" for i in range(n)]
    return Examples(texts, [i % 2 for i in range(n)], ["neg", "pos"])
