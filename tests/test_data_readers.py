"""The data readers: what a CSV or JSON Lines file holds is what training sees, exactly, or one clear refusal."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynarank.training.data import (
    DataError,
    causal_examples,
    classification_examples,
    classification_sets,
    held_out_split,
    label_name,
    load_table,
    packaged_dialogs,
    packaged_sentiment,
)


def _csv(path: Path, rows: list[list[str]], header=("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, quoting=csv.QUOTE_ALL)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- line breaks inside fields
def test_a_newline_inside_a_quoted_csv_field_is_kept(tmp_path):
    data = tmp_path / "data.csv"
    data.write_bytes(b'text,label\n"first line\nsecond line",pos\n"a\r\nb",neg\n')
    rows = load_table(data)
    assert [r["text"] for r in rows] == ["first line\nsecond line", "a\r\nb"]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0c", "\x0b", "\x1c", "\x1d", "\x1e"])
def test_a_csv_row_with_a_unicode_line_separator_in_an_unquoted_field_is_one_row(tmp_path, separator):
    data = tmp_path / "data.csv"
    data.write_text(f"text,label\ngood,pos\nbad,neg\nso{separator}so,pos\nfine,neg\n", encoding="utf-8", newline="")
    rows = load_table(data)
    assert len(rows) == 4 and rows[2] == {"text": f"so{separator}so", "label": "pos"}
    assert classification_examples(rows).labels == [1, 0, 1, 0]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0c"])
def test_a_json_lines_string_holding_a_unicode_line_separator_is_one_line(tmp_path, separator):
    data = tmp_path / "data.jsonl"
    lines = ['{"text": "good", "label": "pos"}', f'{{"text": "so{separator}so", "label": "neg"}}']
    data.write_text("\n".join(lines) + "\n", encoding="utf-8", newline="")
    assert load_table(data) == [{"text": "good", "label": "pos"}, {"text": f"so{separator}so", "label": "neg"}]


def test_json_lines_with_windows_line_ends_are_read(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b'{"text": "good", "label": "pos"}\r\n{"text": "bad", "label": "neg"}\r\n')
    assert [r["text"] for r in load_table(data)] == ["good", "bad"]


# ---------------------------------------------------------------------------- fuzz: what goes in comes out
TEXT = st.text(st.characters(codec="utf-8"), max_size=40)  # any Unicode scalar value (no lone surrogates)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=6))
def test_any_unicode_in_quoted_csv_fields_round_trips_exactly(tmp_path, rows):
    data = _csv(tmp_path / "fuzz.csv", [list(r) for r in rows])
    assert [(r["text"], r["label"]) for r in load_table(data)] == rows


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {"text": TEXT, "label": TEXT}, optional={"n": st.integers() | st.floats(allow_nan=False)}
        ),
        min_size=1,
        max_size=6,
    )
)
def test_any_unicode_in_json_lines_strings_round_trips_exactly(tmp_path, rows):
    data = _jsonl(tmp_path / "fuzz.jsonl", rows)
    assert load_table(data) == rows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(TEXT, min_size=2, max_size=8))
def test_any_text_reaches_the_classifier_unchanged(tmp_path, texts):
    rows = [[t, ("pos", "neg")[i % 2]] for i, t in enumerate(texts)]
    examples = classification_examples(load_table(_csv(tmp_path / "fuzz.csv", rows)))
    assert examples.texts == texts


# ---------------------------------------------------------------------------- columns
def test_a_column_named_twice_is_refused(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label,text\na,pos,b\nc,neg,d\n")
    with pytest.raises(DataError, match="the header names the column 'text' 2 times"):
        load_table(data)


def test_empty_header_cells_are_not_a_repeated_name(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label,,\na,pos,,\nc,neg,,\n")
    assert [r["label"] for r in load_table(data)] == ["pos", "neg"]


def test_a_csv_row_with_more_cells_than_the_header_is_refused_naming_its_line(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text('text,label\n"a, quoted",pos\ngreat, really,pos\nc,neg\n')
    with pytest.raises(DataError, match=r"data.csv, line 3: 3 cells, but the header names 2 columns"):
        load_table(data)


def test_a_json_object_with_a_key_twice_is_refused(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg", "label": "pos"}\n')
    with pytest.raises(DataError, match="line 2: the key 'label' appears twice"):
        load_table(data)


def test_the_text_column_cannot_be_the_label_column(tmp_path):
    rows = load_table(_csv(tmp_path / "data.csv", [["a", "pos"], ["b", "neg"]]))
    with pytest.raises(DataError, match="'label' cannot be both the text and the label column"):
        classification_examples(rows, text_column="label", label_column="label")


# ---------------------------------------------------------------------------- labels
@pytest.mark.parametrize("spelling", ["1", "1.0", " 1", "01", "1.", "+1", 1, 1.0])
def test_spellings_of_one_number_are_one_class(spelling):
    assert label_name(spelling) == "1"


def test_long_integer_labels_stay_distinct_classes():
    assert label_name("12345678901234567") != label_name("12345678901234568")


def test_label_order_never_depends_on_set_order():
    rows = [{"text": str(i), "label": v} for i, v in enumerate(["nan", "2", "inf", "10", "nan", "-inf"])]
    assert classification_examples(rows).label_names == ["-inf", "10", "2", "inf", "nan"]


def test_numeric_labels_are_one_class_per_number_in_numeric_order(tmp_path):
    rows = [["a", "1"], ["b", "1.0"], ["c", " 1"], ["d", "10"], ["e", "2"], ["f", "0.50"]]
    examples = classification_examples(load_table(_csv(tmp_path / "data.csv", rows)))
    assert examples.label_names == ["0.5", "1", "2", "10"]
    assert examples.labels == [1, 1, 1, 3, 2, 0]


def test_a_run_recorded_with_other_spellings_of_its_numeric_labels_still_evaluates(tmp_path):
    rows = load_table(_csv(tmp_path / "data.csv", [["a", "1"], ["b", "2"]]))
    assert classification_examples(rows, label_names=["1.0", "2.0"]).labels == [0, 1]


def test_labels_missing_from_training_are_summarised_in_one_short_line(tmp_path):
    train = _csv(tmp_path / "train.csv", [[f"t{i}", f"known-{i % 30}"] for i in range(60)])
    held = _csv(tmp_path / "held.csv", [[f"h{i}", f"new-{i}"] for i in range(40)])
    with pytest.raises(DataError) as info:
        classification_sets(str(train), eval_data=str(held))
    message = str(info.value)
    assert "40 label(s) do not occur in the training data" in message and "(35 more)" in message
    assert "(training has 30:" in message and "(25 more)" in message and len(message) < 400


# ---------------------------------------------------------------------------- the held-out split
def test_the_held_out_split_is_stratified_so_every_label_is_trained_on(tmp_path):
    # 30 rows of 'common' and one row each of 10 rare labels: a plain shuffle holds some rare ones out.
    rows = [[f"c{i}", "common"] for i in range(30)] + [[f"r{i}", f"rare-{i}"] for i in range(10)]
    data = _csv(tmp_path / "data.csv", rows)
    for seed in range(5):
        train, held = classification_sets(str(data), eval_split=0.2, seed=seed)
        assert set(train.label_names) == {"common", *(f"rare-{i}" for i in range(10))}
        assert sorted(set(held.labels)) == [train.label_names.index("common")]
        assert len(held.texts) == 8 and len(train.texts) == 32


def test_the_stratified_split_holds_out_each_labels_share_and_is_deterministic():
    strata = ["a"] * 50 + ["b"] * 30 + ["c"] * 20
    train, held = held_out_split(100, 0.2, 7, "data.csv", strata)
    assert sorted(train + held) == list(range(100))
    assert Counter(strata[i] for i in held) == {"a": 10, "b": 6, "c": 4}
    assert (train, held) == held_out_split(100, 0.2, 7, "data.csv", strata)
    assert held != held_out_split(100, 0.2, 8, "data.csv", strata)[1]


def test_a_split_where_every_label_has_one_row_is_refused():
    with pytest.raises(ValueError, match="every label has a single row"):
        held_out_split(4, 0.5, 0, "data.csv", ["a", "b", "c", "d"])


# ---------------------------------------------------------------------------- the packaged tweets (--n-train)
def test_the_largest_n_train_the_packaged_tweets_give_is_balanced_and_one_more_pair_is_refused_naming_it():
    with pytest.raises(DataError, match=r"--n-train 100000 is above the maximum (\d+): the packaged tweets") as info:
        packaged_sentiment(n_train=100000, n_eval=None)
    largest = int(re.search(r"maximum (\d+)", str(info.value)).group(1))
    train, held = packaged_sentiment(n_train=largest, n_eval=None)
    assert Counter(train.labels) == {0: largest // 2, 1: largest // 2}
    assert set(Counter(held.labels).values()) == {len(held.labels) // 2} and len(held.labels) >= 100
    with pytest.raises(DataError, match=f"--n-train {largest + 2} is above the maximum {largest}: "):
        packaged_sentiment(n_train=largest + 2, n_eval=None)


@pytest.mark.parametrize("n_train", [0, 1])
def test_an_n_train_below_one_tweet_per_class_is_refused_naming_the_minimum(n_train):
    with pytest.raises(DataError, match=f"--n-train {n_train} is below the minimum 2: one tweet of each"):
        packaged_sentiment(n_train=n_train, n_eval=None)
    train, _ = packaged_sentiment(n_train=2, n_eval=None)
    assert sorted(train.labels) == [0, 1]


def test_an_odd_n_train_is_refused_since_the_packaged_tweets_are_half_of_each_class():
    with pytest.raises(DataError, match=r"--n-train 2001 is odd: .* give an even number \(2000 or 2002\)"):
        packaged_sentiment(n_train=2001, n_eval=None)


def test_the_packaged_dialogs_come_in_the_corpus_s_languages_and_an_unknown_one_is_refused():
    english, _ = packaged_dialogs(n_eval=10)
    italian, held = packaged_dialogs(n_eval=10, language="italian")
    assert len(held.prompts) == 10 and len(italian.prompts) > 700
    shared = set(italian.prompts) & set(english.prompts)  # a few words the languages share ("ok"), no more
    assert len(shared) < 0.05 * len(set(italian.prompts))
    with pytest.raises(DataError, match="no language 'klingon'; they have: .*italian"):
        packaged_dialogs(language="klingon")


# ---------------------------------------------------------------------------- which columns are read
def test_instruction_rows_put_their_input_in_the_prompt(tmp_path):
    """instruction / input / output rows were read as prompt = instruction, the input dropped: the model learned to
    answer 'Translate to French' with a translation of a sentence it never saw."""
    rows = [
        {"instruction": "Translate to French.", "input": "The cat sleeps.", "output": "Le chat dort."},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    ]
    pairs = causal_examples(load_table(str(_jsonl(tmp_path / "alpaca.jsonl", rows))))
    assert pairs.prompts == ["Translate to French.\n\nThe cat sleeps.", "Name a colour."]
    assert pairs.responses == ["Le chat dort.", "Blue."]


def test_an_instruction_row_without_output_is_refused_by_its_row(tmp_path):
    rows = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "input": "e", "output": " "}]
    with pytest.raises(DataError, match="row 2: no 'output' text"):
        causal_examples(load_table(str(_jsonl(tmp_path / "alpaca.jsonl", rows))))


@pytest.mark.parametrize(
    ("header", "role"),
    [(("question", "query", "answer"), "prompt"), (("question", "answer", "output"), "response")]
    + [(("text", "sentence", "label"), "text"), (("text", "label", "class"), "label")],
)
def test_two_columns_that_could_each_be_the_guessed_one_are_refused_naming_both(tmp_path, header, role):
    data = _csv(tmp_path / "data.csv", [["a", "b", "c"], ["d", "e", "f"]], header=header)
    rows = load_table(str(data))
    read = causal_examples if role in ("prompt", "response") else classification_examples
    with pytest.raises(DataError, match=f"could each be the {role} column.*--{role}-column"):
        read(rows)


def test_naming_one_of_two_candidate_columns_reads_it(tmp_path):
    data = _csv(tmp_path / "data.csv", [["q1", "x1", "a1"], ["q2", "x2", "a2"]], header=("question", "query", "answer"))
    pairs = causal_examples(load_table(str(data)), prompt_column="query")
    assert pairs.prompts == ["x1", "x2"] and pairs.responses == ["a1", "a2"]
    # a column named for one role is no candidate for the other
    pairs = causal_examples(load_table(str(data)), response_column="query", prompt_column=None)
    assert pairs.prompts == ["q1", "q2"] and pairs.responses == ["x1", "x2"]


# ---------------------------------------------------------------------------- what a text cell may hold
@pytest.mark.parametrize(("value", "kind"), [(["a", "b"], "a list"), ({"x": 1}, "an object"), (True, "true / false")])
def test_a_json_list_object_or_boolean_in_the_text_column_is_refused_naming_file_row_and_column(tmp_path, value, kind):
    """Such a cell was read as its Python spelling ("['a', 'b']") and trained on."""
    rows = [{"text": "good", "label": 1}, {"text": value, "label": 0}]
    data = _jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(DataError, match=rf"data.jsonl, row 2: the 'text' cell is {kind}, not text"):
        classification_examples(load_table(data), path=str(data))


@pytest.mark.parametrize("column", ["question", "answer"])
@pytest.mark.parametrize("value", [["a"], {"x": 1}, False])
def test_a_json_list_object_or_boolean_in_a_prompt_or_response_column_is_refused_naming_it(tmp_path, column, value):
    rows = [{"question": "hi", "answer": "hello"}, {"question": "how?", "answer": "so", column: value}]
    data = _jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataError, match=rf"pairs.jsonl, row 2: the '{column}' cell is .*, not text"):
        causal_examples(load_table(data), path=str(data))


@pytest.mark.parametrize("column", ["instruction", "input", "output"])
def test_a_json_list_in_an_instruction_row_is_refused_naming_its_column(tmp_path, column):
    row = {"instruction": "Name a colour.", "input": "", "output": "Blue.", column: ["a", "b"]}
    data = _jsonl(tmp_path / "alpaca.jsonl", [row])
    with pytest.raises(DataError, match=rf"alpaca.jsonl, row 1: the '{column}' cell is a list, not text"):
        causal_examples(load_table(data), path=str(data))


def test_a_json_number_in_a_text_cell_is_its_text(tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", [{"text": 42, "label": "a"}, {"text": 2.5, "label": "b"}])
    assert classification_examples(load_table(data)).texts == ["42", "2.5"]
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"question": 7, "answer": 49}])
    assert causal_examples(load_table(pairs)).prompts == ["7"]


def test_chat_messages_still_take_their_list_of_turns(tmp_path):
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    chats = causal_examples(load_table(_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])))
    assert chats.conversations == [turns]
