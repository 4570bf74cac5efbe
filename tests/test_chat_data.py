"""Chat data for the causal LM: conversations (``messages``) and TRL's prompt / completion rows, rendered with the
model's own chat template, the loss on what the assistant says; in the CLI, on a float and on a 4-bit base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer

from dynarank.cli import main
from dynarank.cli.commands import load_trained
from dynarank.training.chat import (
    ChatExamples,
    CompletionExamples,
    encode_chats,
    encode_completions,
    encode_conversation,
    truncate,
)
from dynarank.training.data import PairExamples, causal_examples
from dynarank.training.models import load_causal_lm
from tiny_models import save_tiny_model_dir

IGNORE = -100


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """The tiny Llama with the MiniLM tokenizer and a chat template ('<role> content [SEP]' per turn)."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-chat"), kind="llama", chat=True)


@pytest.fixture(scope="module")
def tokenizer(chat_dir):
    return AutoTokenizer.from_pretrained(chat_dir)


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def trained_spans(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """The text of every run of tokens that carries the loss."""
    spans, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans, current = spans + [tokenizer.decode(current)], []
    return spans + ([tokenizer.decode(current)] if current else [])


CONVERSATION = [
    turn("system", "answer briefly"),
    turn("user", "what is two plus two?"),
    turn("assistant", "it is four."),
    turn("user", "and three plus three?"),
    turn("assistant", "six."),
]


# ---------------------------------------------------------------------------- the encoding
def test_every_assistant_turn_and_its_end_of_turn_marker_carry_the_loss_and_nothing_else(tokenizer):
    ids, labels = encode_conversation(tokenizer, CONVERSATION)
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]  # the model's own template, as rendered
    assert trained_spans(tokenizer, ids, labels) == ["it is four. [SEP]", "six. [SEP]"]


def test_a_conversational_prompt_completion_row_trains_its_completion_only(tokenizer):
    rows = [{"prompt": CONVERSATION[:4], "completion": [turn("assistant", "six.")]}]
    chats = causal_examples(rows)
    assert isinstance(chats, ChatExamples) and chats.trained_from == [4]
    encoded = encode_chats(tokenizer, chats, max_length=128)
    assert trained_spans(tokenizer, encoded["input_ids"][0], encoded["labels"][0]) == ["six. [SEP]"]


def test_a_plain_prompt_completion_row_is_text_with_eos_and_the_loss_on_the_completion(tokenizer):
    rows = causal_examples([{"prompt": "the sky is", "completion": " blue."}])
    assert isinstance(rows, CompletionExamples)
    encoded = encode_completions(tokenizer, rows, max_length=64)
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    assert ids == tokenizer("the sky is blue.[SEP]")["input_ids"]  # no chat template; the tokenizer's own specials
    assert trained_spans(tokenizer, ids, labels) == ["blue. [SEP] [SEP]"]  # BERT's tokenizer closes with its own SEP


def test_prompt_response_columns_keep_their_meaning(tokenizer):
    rows = [{"prompt": "hi", "completion": "yo", "question": "q", "answer": "a"}]
    assert isinstance(causal_examples(rows, prompt_column="question", response_column="answer"), PairExamples)
    assert isinstance(causal_examples([{"question": "q", "answer": "a"}]), PairExamples)


def test_the_encoding_agrees_with_trl_on_the_same_rows(chat_dir, tokenizer, tmp_path):
    """TRL's own tokenization of the rows (SFTTrainer's prepared data set): the same ids, and for prompt /
    completion rows the same tokens under the loss."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from dynarank.training.models import load_causal_lm

    model, _ = load_causal_lm(chat_dir)
    cases = {
        "messages": [{"messages": CONVERSATION}],
        "conversational prompt/completion": [{"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]}],
        "plain prompt/completion": [{"prompt": "the sky is", "completion": " blue."}],
    }
    for name, rows in cases.items():
        args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to=[], max_length=128)
        prepared = trl.SFTTrainer(
            model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer
        ).train_dataset[0]
        ours = encode_chats if name != "plain prompt/completion" else encode_completions
        encoded = ours(tokenizer, causal_examples(rows), max_length=128)
        assert encoded["input_ids"][0] == prepared["input_ids"], name
        if "completion_mask" in prepared:
            trained = [int(label != IGNORE) for label in encoded["labels"][0]]
            assert trained == prepared["completion_mask"], name


def test_truncation_keeps_tokens_under_the_loss():
    ids, labels = list(range(10)), [IGNORE] * 8 + [8, 9]
    assert truncate(ids, labels, 4) == ([6, 7, 8, 9], [IGNORE, IGNORE, 8, 9])
    assert truncate(ids, [IGNORE, 1] + [IGNORE] * 8, 4) == ([0, 1, 2, 3], [IGNORE, 1, IGNORE, IGNORE])


# ---------------------------------------------------------------------------- the CLI
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sums(n: int = 40) -> list[dict]:
    return [
        {"messages": [turn("user", f"what is {i} plus one?"), turn("assistant", f"it is {i + 1}.")]} for i in range(n)
    ]


def chat_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    argv = ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--method", "ard", "--r0", "2"]
    return [*argv, "--max-steps", "6", "--batch-size", "4", "--max-length", "32", "--lr", "1e-2", *extra]


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_chat_jsonl_trains_evaluates_and_exports_to_stock_peft(chat_dir, tmp_path, capsys, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    data = write_jsonl(tmp_path / "chat.jsonl", sums())
    run = tmp_path / "run"
    assert main(chat_argv(chat_dir, data, run, *(["--quantize", quantize] if quantize else []))) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["quantize"] == quantize and set(summary["eval"]) == {"loss", "perplexity"}
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data)]) == 0
    run_loss = json.loads(capsys.readouterr().out)["loss"]
    assert run_loss == pytest.approx(summary["eval"]["loss"], rel=1e-3)
    assert main(["export", str(run), "--out", str(tmp_path / "adapter")]) == 0
    assert main(["export", str(run), "--server-safe", "--out", str(tmp_path / "server")]) == 0
    # Every adapter folder the run wrote records how its base was loaded, and eval loads it that way: the same loss
    # as the run's (measured: within 2e-7; a float base in place of the 4-bit one moves it by 6e-4).
    capsys.readouterr()
    for folder in (run / "adapter", tmp_path / "adapter", tmp_path / "server"):
        assert json.loads((folder / "dynarank_run.json").read_text()).get("quantize") == quantize, folder
        assert main(["eval", str(folder), "--data", str(data)]) == 0
        assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(run_loss, rel=1e-6), folder
    model, tokenizer, _ = load_trained(run)  # the base loaded as the run trained it
    base, _ = load_causal_lm(chat_dir, quantize=quantize)
    stock = PeftModel.from_pretrained(base, tmp_path / "adapter")
    text = tokenizer.apply_chat_template(
        [turn("user", "what is 3 plus one?")], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    model.eval(), stock.eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=0)
    if quantize:  # merged into the float base it was made from: an update cannot be added into quantized bytes
        assert main(["export", str(run), "--merged", "--out", str(tmp_path / "merged")]) == 0
        assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_a_killed_4bit_chat_run_resumed_equals_the_uninterrupted_run(chat_dir, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import dynarank.cli.train as train_module

    data = write_jsonl(tmp_path / "chat.jsonl", sums())
    extra = ("--quantize", "nf4", "--save-every", "3", "--ard-lambda", "0.05")
    real = train_module.train_causal_lm

    def killed(*args, **kwargs):  # the process dies after step 4 (checkpoint at 3)
        def on_step(record, inner=kwargs["on_step"]):
            inner(record)
            if record["step"] == 4:
                raise KeyboardInterrupt

        return real(*args, **{**kwargs, "on_step": on_step})

    monkeypatch.setattr(train_module, "train_causal_lm", killed)
    assert main(chat_argv(chat_dir, data, tmp_path / "killed", *extra)) == 130
    monkeypatch.setattr(train_module, "train_causal_lm", real)
    torch.manual_seed(999)
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    assert main(chat_argv(chat_dir, data, tmp_path / "full", *extra)) == 0
    ranks = [json.loads(line)["total_rank"] for line in (tmp_path / "full" / "ranks.jsonl").read_text().splitlines()]
    assert len(set(ranks)) > 1, "the ranks never changed"
    for name in ("metrics.jsonl", "ranks.jsonl", "adapter/adapter_model.safetensors"):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


@pytest.mark.slow
def test_packaged_smollm2_trains_on_chat_jsonl_with_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    data = write_jsonl(tmp_path / "chat.jsonl", sums(24))
    argv = ["train", "--model", "smollm2", "--data", str(data), "--out", str(tmp_path / "run"), "--method", "ard"]
    assert main([*argv, "--max-steps", "4", "--batch-size", "2", "--r0", "4", "--quantize", "nf4"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["quantize"] == "nf4" and summary["eval"]["perplexity"] < 1e4
    assert len(summary["final_ranks"]["model.layers.0.self_attn.k_proj"]) == 3
