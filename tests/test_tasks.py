"""Encoding for causal-LM instruction tuning: the chat template, the response-only loss, truncation."""

from __future__ import annotations

import pytest

from dynarank.training.data import DataError, PairExamples
from dynarank.training.tasks import IGNORE_INDEX, encode_causal


class CharTokenizer:
    """One id per character (ord); an optional chat template that wraps the user turn."""

    eos_token = "$"

    def __init__(self, chat_template: str | None = None) -> None:
        self.chat_template = chat_template

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        assert messages == [{"role": "user", "content": messages[0]["content"]}] and not tokenize
        return f"<{messages[0]['content']}>" + (":" if add_generation_prompt else "")

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def decode(ids) -> str:
    return "".join(chr(i) for i in ids)


def test_a_tokenizer_with_a_chat_template_gets_the_prompt_wrapped_as_a_user_turn():
    enc = encode_causal(CharTokenizer(chat_template="yes"), PairExamples(["hi"], ["yo"]), max_length=64)
    assert decode(enc["input_ids"][0]) == "<hi>:yo$"


def test_without_a_template_the_prompt_ends_with_a_newline():
    enc = encode_causal(CharTokenizer(), PairExamples(["hi"], ["yo"]), max_length=64)
    assert decode(enc["input_ids"][0]) == "hi\nyo$"


def test_the_loss_is_on_the_response_and_its_end_of_sequence_only():
    enc = encode_causal(CharTokenizer(chat_template="yes"), PairExamples(["hi"], ["yo"]), max_length=64)
    labels = enc["labels"][0]
    assert labels[:5] == [IGNORE_INDEX] * 5  # "<hi>:"
    assert decode(labels[5:]) == "yo$"


def test_a_prompt_that_fills_the_window_keeps_its_end_and_the_response():
    enc = encode_causal(CharTokenizer(), PairExamples(["x" * 40], ["yo"]), max_length=16)
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    assert len(ids) <= 16 and decode(ids).endswith("x\nyo$")
    assert decode([v for v in labels if v != IGNORE_INDEX]) == "yo$"


def test_a_window_of_two_tokens_still_predicts_the_responses_first_token():
    enc = encode_causal(CharTokenizer(), PairExamples(["hi"], ["yo"]), max_length=2)
    assert decode(enc["input_ids"][0]) == "\ny" and decode(enc["labels"][0][1:]) == "y"


def test_a_window_that_leaves_no_response_token_to_predict_is_refused():
    """--max-length 1: every label fell at position 0, which nothing predicts; every step was skipped as a
    non-finite loss and the held-out loss read 0.0 (perplexity 1.0), exit code 0."""
    with pytest.raises(DataError, match="max_length=1.*raise --max-length"):
        encode_causal(CharTokenizer(), PairExamples(["hi", "there"], ["yo", "you"]), max_length=1)
