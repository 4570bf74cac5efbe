"""--task causal-lm loads only causal decoders whose checkpoint holds every weight, the LM head's among them."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from dynarank.training.models import ModelError, load_causal_lm, packaged_minilm_path
from tiny_models import TINY_ENCODER, save_tiny_model_dir


def test_an_encoder_without_an_lm_head_is_refused_as_a_causal_lm(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "encoder")  # a BERT classifier: no cls.predictions weights
    with pytest.raises(ModelError, match=r"the checkpoint has no weight cls\.predictions\..* would start random"):
        load_causal_lm(model_dir)


def test_an_encoder_with_its_lm_head_but_bidirectional_attention_is_refused(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm_path()))
    BertForMaskedLM(BertConfig(**{**TINY_ENCODER, "vocab_size": tokenizer.vocab_size})).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="depend on later tokens, so it is not a causal decoder"):
        load_causal_lm(tmp_path)


def test_a_decoder_loads_as_a_causal_lm(tmp_path):
    model, _ = load_causal_lm(save_tiny_model_dir(tmp_path / "decoder", kind="llama"))
    assert type(model).__name__ == "LlamaForCausalLM"
