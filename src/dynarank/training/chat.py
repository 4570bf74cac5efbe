"""Chat data for causal-LM training: conversations (a ``messages`` column) and TRL's ``prompt`` / ``completion``
rows, checked turn by turn, and their encoding; the loss is on what the assistant says.

Formats (JSON Lines; TRL reads the same rows):

* ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...]}``: rendered with the
  model's own chat template; every assistant turn carries the loss, with its end-of-turn marker (the model learns to
  stop), and nothing else does.
* ``{"prompt": [turns...], "completion": [assistant turns...]}`` (conversational): the prompt rendered with the
  generation prompt, the completion's turns carry the loss.
* ``{"prompt": "text", "completion": "text"}`` (plain, CSV too): prompt + completion + EOS as plain text (no chat
  template), the loss on the completion: TRL's language-modelling reading.

Where a turn's tokens are is found by rendering the conversation's prefixes with the template and tokenizing them:
a turn starts where the tokens of everything before it (with the generation prompt) stop matching the tokens of the
whole conversation, and ends where the tokens of the conversation up to it do (TRL's common-prefix rule, per turn).
No string is searched for.
"""

from __future__ import annotations

from dataclasses import dataclass

from .data import DataError

ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100  # tasks.IGNORE_INDEX (tasks imports this module)

Turn = dict[str, str]


@dataclass
class ChatExamples:
    """Conversations; in conversation i, the assistant turns from turn ``trained_from[i]`` on carry the loss (0 for a
    ``messages`` row; the length of the prompt for a conversational prompt / completion row)."""

    conversations: list[list[Turn]]
    trained_from: list[int]

    def __len__(self) -> int:
        return len(self.conversations)


@dataclass
class CompletionExamples:
    """TRL's plain prompt / completion rows: plain text, no chat template, the loss on the completion."""

    prompts: list[str]
    completions: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


# ---------------------------------------------------------------------------- reading rows
def _where(path: str, number: int, turn: int | None = None) -> str:
    return f"{path or 'data'}, row {number}" + (f", turn {turn}" if turn is not None else "")


def _turns(value, path: str, number: int, column: str, first: int = 1) -> list[Turn]:
    """The turns of one row's ``column``, checked: a non-empty list of {role, content} objects, roles known, content
    not empty (``first``: the number of the first turn, for messages)."""
    if not isinstance(value, list) or not value:
        raise DataError(
            f'{_where(path, number)}: {column!r} must be a non-empty list of turns ({{"role": ..., "content": '
            f"...}} objects, in a JSON Lines file); got {type(value).__name__}."
        )
    turns = []
    for index, turn in enumerate(value, first):
        where = _where(path, number, index)
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
            raise DataError(f"{where}: a turn is an object with a 'role' and a 'content'; got {str(turn)[:60]!r}.")
        role, content = turn["role"], turn["content"]
        if role not in ROLES:
            raise DataError(f"{where}: unknown role {role[:40]!r}; the roles are {', '.join(ROLES)}.")
        if not isinstance(content, str):
            raise DataError(
                f"{where} ({role}): the content must be text, got {type(content).__name__} {str(content)[:40]!r} (a "
                "list of content parts, images and the like, is not read: give the text)."
            )
        if not content.strip():
            raise DataError(f"{where} ({role}): empty content; fill it in or drop the turn.")
        turns.append({"role": role, "content": content})
    return turns


def _check_conversation(turns: list[Turn], path: str, number: int) -> None:
    speakers = [t["role"] for t in turns if t["role"] != "system"]
    if not speakers:
        raise DataError(
            f"{_where(path, number)}: the conversation holds system turns only; give it a user turn and the "
            "assistant's answer (the loss is on the assistant's turns)."
        )
    if speakers[0] == "assistant":
        raise DataError(
            f"{_where(path, number)}: the conversation has no user turn before the assistant's first; the assistant "
            "answers a prompt, so give one."
        )
    if turns[-1]["role"] != "assistant":
        raise DataError(
            f"{_where(path, number)}: the conversation ends with a {turns[-1]['role']} turn; it must end with the "
            "assistant's (the loss is on the assistant's turns)."
        )


def chat_examples(rows: list[dict], path: str = "", row_numbers: list[int] | None = None) -> ChatExamples:
    """Conversations from the ``messages`` column (``row_numbers``: the rows' places in their file, for errors)."""
    numbers = row_numbers or range(1, len(rows) + 1)
    conversations = []
    for number, row in zip(numbers, rows):
        turns = _turns(row.get("messages"), path, number, "messages")
        _check_conversation(turns, path, number)
        conversations.append(turns)
    return ChatExamples(conversations, [0] * len(conversations))


def prompt_completion_examples(
    rows: list[dict], path: str = "", row_numbers: list[int] | None = None
) -> ChatExamples | CompletionExamples:
    """TRL's prompt / completion rows: all conversational (lists of turns) or all plain text."""
    numbers = list(row_numbers or range(1, len(rows) + 1))
    conversational = isinstance(rows[0].get("prompt"), list)
    prompts, completions = [], []
    for number, row in zip(numbers, rows):
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) != conversational or isinstance(completion, list) != conversational:
            kind = "lists of turns" if conversational else "text"
            raise DataError(
                f"{_where(path, number)}: 'prompt' and 'completion' are {kind} in row {numbers[0]} and not here; "
                "give every row the same form."
            )
        if conversational:
            prompt = _turns(prompt, path, number, "prompt")
            completion = _turns(completion, path, number, "completion", first=len(prompt) + 1)
            _check_conversation(prompt + completion, path, number)
        elif not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise DataError(
                f"{_where(path, number)}: 'prompt' and 'completion' must be text, and the completion not empty."
            )
        prompts.append(prompt)
        completions.append(completion)
    if conversational:
        return ChatExamples([p + c for p, c in zip(prompts, completions)], [len(p) for p in prompts])
    return CompletionExamples(prompts, completions)


# ---------------------------------------------------------------------------- encoding
def require_chat_template(tokenizer, where: str) -> None:
    """Refuse conversations for a tokenizer without a chat template (they could only be rendered by a guess)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"the model {where} has no chat template, which conversations (messages, or prompt / completion turns) "
            "are rendered with: give prompt / response columns, or a model whose tokenizer has a chat template."
        )


def _render(tokenizer, turns: list[Turn], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template writes the special tokens


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def truncate(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """The first ``max_length`` tokens; when the loss would then be on none of them, a window that starts half a
    window before the first trained token instead."""
    if len(ids) <= max_length or any(v != IGNORE_INDEX for v in labels[:max_length]):
        return ids[:max_length], labels[:max_length]
    first = next((i for i, v in enumerate(labels) if v != IGNORE_INDEX), 0)
    start = max(0, first - max_length // 2)
    return ids[start : start + max_length], labels[start : start + max_length]


def encode_conversation(tokenizer, turns: list[Turn], trained_from: int = 0) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one conversation rendered with the tokenizer's chat template; labels are the ids on the
    assistant's turns from ``trained_from`` on (each with its end-of-turn marker), -100 elsewhere."""
    ids = _render(tokenizer, turns, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for k, turn in enumerate(turns):
        if k < trained_from or turn["role"] != "assistant":
            continue
        begin = common_prefix_length(_render(tokenizer, turns[:k], generation_prompt=True), ids)
        end = len(ids) if k == len(turns) - 1 else common_prefix_length(_render(tokenizer, turns[: k + 1], False), ids)
        labels[begin:end] = ids[begin:end]
    return ids, labels


def encode_chats(tokenizer, chats: ChatExamples, max_length: int) -> dict:
    """The encoded data set of :mod:`.tasks` for conversations (a template that refuses one names its row)."""
    from jinja2.exceptions import TemplateError

    require_chat_template(tokenizer, getattr(tokenizer, "name_or_path", "") or "in use")
    input_ids, labels = [], []
    for number, (turns, start) in enumerate(zip(chats.conversations, chats.trained_from), 1):
        try:
            ids, lab = encode_conversation(tokenizer, turns, start)
        except (TemplateError, ValueError, TypeError) as exc:
            raise DataError(f"conversation {number}: the model's chat template refuses it ({exc}).") from None
        ids, lab = truncate(ids, lab, max_length)
        input_ids.append(ids)
        labels.append(lab)
    return {"input_ids": input_ids, "labels": labels}


def encode_completions(tokenizer, rows: CompletionExamples, max_length: int) -> dict:
    """TRL's plain prompt / completion: tokenize prompt and prompt + completion + EOS as text (the tokenizer's own
    special tokens added); the loss starts where the two stop agreeing."""
    eos = tokenizer.eos_token or ""
    input_ids, labels = [], []
    for prompt, completion in zip(rows.prompts, rows.completions):
        completion = completion if not eos or completion.endswith(eos) else completion + eos
        head = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + completion)["input_ids"]
        n = common_prefix_length(head, ids)
        ids, lab = truncate(ids, [IGNORE_INDEX] * n + ids[n:], max_length)
        input_ids.append(ids)
        labels.append(lab)
    return {"input_ids": input_ids, "labels": labels}
