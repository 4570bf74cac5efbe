"""Per-task encoding and evaluation: sequence classification and causal-LM instruction tuning.

An encoded data set is ``{"input_ids": [[int]], "labels": [int] | [[int]]}``: one label per
example (classification) or one per token (causal LM, -100 where no loss is taken).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .chat import ChatExamples, CompletionExamples, encode_chats, encode_completions
from .data import DataError, Examples, PairExamples

CausalExamples = PairExamples | ChatExamples | CompletionExamples  # what data.causal_examples reads

IGNORE_INDEX = -100


class NonFiniteError(RuntimeError):
    """NaN/inf where training or evaluation needs numbers: training stopped on a NaN/inf loss or gradient (policy
    'stop', or too many skipped steps in a row; checkpoints already written are kept), or a model's outputs are
    not finite, so no metric is reported from them."""


def _check_finite(values: torch.Tensor, n_examples: int) -> None:
    if not torch.isfinite(values).all():
        raise NonFiniteError(
            f"the model's outputs on the {n_examples} evaluation examples hold NaN/inf, so no metric is reported: its "
            "weights diverged in training (train again with a lower learning rate)."
        )


def batches(enc: dict, order: list[int], batch_size: int, pad_id: int):
    """Padded (input_ids, attention_mask, labels, indices) batches in ``order``."""
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        seqs = [enc["input_ids"][i] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[row, : len(s)] = 1
        raw = [enc["labels"][i] for i in idx]
        if raw and isinstance(raw[0], list):
            labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
            for row, lab in enumerate(raw):
                labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        else:
            labels = torch.tensor(raw, dtype=torch.long)
        yield ids, mask, labels, idx


# ---------------------------------------------------------------------------- classification
def encode_classification(tokenizer, examples: Examples, max_length: int) -> dict:
    enc = tokenizer(examples.texts, truncation=True, max_length=max_length)
    return {"input_ids": list(enc["input_ids"]), "labels": list(examples.labels)}


def evaluate_classifier(
    model: nn.Module, tokenizer, examples: Examples, max_length: int = 64, batch_size: int = 64
) -> dict[str, float]:
    """Accuracy and macro-F1."""
    enc = encode_classification(tokenizer, examples, max_length)
    device = next(model.parameters()).device
    preds: list[int] = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for ids, mask, _, _ in batches(enc, list(range(len(examples.texts))), batch_size, tokenizer.pad_token_id or 0):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            _check_finite(logits, len(examples.texts))
            preds.extend(logits.argmax(-1).tolist())
    model.train(was_training)
    return classification_metrics(preds, examples.labels, len(examples.label_names))


def classification_metrics(preds: list[int], labels: list[int], n_labels: int) -> dict[str, float]:
    correct = sum(p == y for p, y in zip(preds, labels))
    f1s = []
    for c in range(n_labels):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": correct / max(1, len(labels)), "macro_f1": sum(f1s) / n_labels}


# ---------------------------------------------------------------------------- causal LM
def _prompt_text(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt + "\n"


def encode_causal(tokenizer, pairs: CausalExamples, max_length: int) -> dict:
    """Prompt (chat template when the tokenizer has one) + response; the loss is on the response only. Conversations
    and TRL's prompt / completion rows: training/chat.py."""
    if isinstance(pairs, ChatExamples):
        encoded = encode_chats(tokenizer, pairs, max_length)
    elif isinstance(pairs, CompletionExamples):
        encoded = encode_completions(tokenizer, pairs, max_length)
    else:
        encoded = _encode_pairs(tokenizer, pairs, max_length)
    # A token is predicted from the ones before it: a label at position 0 is never a target.
    if not any(v != IGNORE_INDEX for lab in encoded["labels"] for v in lab[1:]):
        raise DataError(
            f"no example keeps a response token to predict within max_length={max_length} tokens (the loss would be "
            "on nothing: every step skipped, a held-out loss of 0): raise --max-length."
        )
    return encoded


def _encode_pairs(tokenizer, pairs: PairExamples, max_length: int) -> dict:
    input_ids, labels = [], []
    eos = tokenizer.eos_token or ""
    for prompt, response in zip(pairs.prompts, pairs.responses):
        head = tokenizer(_prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        tail = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
        ids = (head + tail)[:max_length]
        lab = ([IGNORE_INDEX] * len(head) + tail)[:max_length]
        if all(v == IGNORE_INDEX for v in lab):  # the prompt filled the window: keep its end and the response
            head = head[len(head) - max_length // 2 :]  # (head[-0:] would be all of it)
            ids = (head + tail)[:max_length]
            lab = ([IGNORE_INDEX] * len(head) + tail)[:max_length]
        input_ids.append(ids)
        labels.append(lab)
    return {"input_ids": input_ids, "labels": labels}


def evaluate_causal_lm(
    model: nn.Module, tokenizer, pairs: CausalExamples, max_length: int = 128, batch_size: int = 8
) -> dict[str, float]:
    """Mean token loss on the responses (the assistant's turns, the completions) and its perplexity."""
    enc = encode_causal(tokenizer, pairs, max_length)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for ids, mask, labels, _ in batches(enc, list(range(len(pairs))), batch_size, tokenizer.pad_token_id):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
            target = labels[:, 1:].to(device)
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(),
                target.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            _check_finite(loss, len(pairs))
            total += float(loss)
            count += int((target != IGNORE_INDEX).sum())
    model.train(was_training)
    mean = total / max(1, count)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}
