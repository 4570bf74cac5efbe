"""The input contract, case by case (issue 17 and the cases before it).

Whatever a user hands dynarank that it cannot use ends with exit code 2 and one short line on stderr naming the
problem: never a traceback, never a pickle loaded, and nothing left behind (no new directory, no file changed).
A few cases run through a real ``python -m dynarank.cli`` process, so that anything printed at import time counts.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest

import dynarank
from dynarank.cli import main
from dynarank.defaults import default_lr
from test_cli import write_csv
from tiny_models import save_tiny_model_dir

LABELS = "negative,positive"
QUICK = ["--method", "lora", "--max-steps", "2", "--batch-size", "4", "--max-length", "16"]  # the issue's commands


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    """What the cases start from: the tiny model, a 40-row CSV, a stock LoRA run with checkpoints and a dynarank
    run with a native adapter. No case may change any of it."""
    root = tmp_path_factory.mktemp("world")
    w = SimpleNamespace(root=root, model=save_tiny_model_dir(root / "tiny"), data=write_csv(root / "train_ok.csv", 40))
    w.llama = save_tiny_model_dir(root / "llama", kind="llama")  # a causal LM without a chat template
    w.chat = save_tiny_model_dir(root / "chat", kind="llama", chat=True)
    w.lora, w.native = root / "lora", root / "native"
    assert main(_train(w, w.lora, "--save-every", "1")) == 0
    assert main(_train(w, w.native, "--method", "dynarank-lora")) == 0
    return w


def _train(w, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(w.model), "--data", str(w.data), "--out", str(out), *QUICK, *extra]


def _copy_run(run: Path, d: Path) -> Path:
    return shutil.copytree(run, d / "run")


def _bare_adapter(w, d: Path, info: bool = False) -> Path:
    """The LoRA run's PEFT adapter as anyone's adapter folder (dynarank_run.json only with ``info``)."""
    adapter = shutil.copytree(w.lora / "adapter", d / "adapter")
    if not info:
        (adapter / "dynarank_run.json").unlink()
    return adapter


def _pickle(path: Path) -> Path:
    import torch

    torch.save({"base_model.model.classifier.weight": torch.zeros(2, 32)}, path)
    return path


def _eval(target: Path, w, *extra: str) -> list[str]:
    return ["eval", str(target), "--data", str(w.data), *extra]


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- the cases
def _decoy(w, d, mp):
    adapter = _bare_adapter(w, d)
    (adapter / "adapter_model.safetensors").rename(adapter / "decoy.safetensors")
    _pickle(adapter / "adapter_model.bin")
    return _eval(adapter, w, "--labels", LABELS)


def _pickle_beside_adapter(w, d, mp):
    _pickle(_bare_adapter(w, d) / "training_args.bin")
    return _eval(d / "adapter", w, "--labels", LABELS)


def _pickle_beside_model(w, d, mp):
    model = shutil.copytree(w.model, d / "model")
    _pickle(model / "pytorch_model.bin")
    return [*_train(w, d / "run"), "--model", str(model)]


def _pickle_in_a_run(w, d, mp):
    _pickle(_copy_run(w.lora, d) / "adapter" / "adapter_model.bin")
    return _eval(d / "run", w)


def _damaged_log_line(w, d, mp):
    run = _copy_run(w.lora, d)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    _write(run / "metrics.jsonl", "\n".join(['{"step": 1, "loss": ', *lines[1:]]) + "\n")
    return ["train", "--resume", str(run)]


def _truncated(w, d, mp):
    weights = _bare_adapter(w, d) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return _eval(d / "adapter", w, "--labels", LABELS)


def _truncated_in_a_run(w, d, mp):
    weights = _copy_run(w.lora, d) / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return ["export", str(d / "run"), "--out", str(d / "exported")]


def _symlinked(w, d, mp):
    weights = _bare_adapter(w, d) / "adapter_model.safetensors"
    weights.unlink()
    weights.symlink_to(w.data)
    return _eval(d / "adapter", w, "--labels", LABELS)


def _full_disk(w, d, mp):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No" })')

    mp.setattr(safetensors.torch, "serialize_file", full)
    return _train(w, d / "run")


def _summary(content: str, command: str):
    def case(w, d, mp):
        run = _copy_run(w.lora, d)
        _write(run / "summary.json", content)
        extra = {"eval": ["--data", str(w.data)], "export": ["--out", str(d / "exported")], "report": []}[command]
        return [command, str(run), *extra]

    return case


def _info_list(w, d, mp):
    _write(_bare_adapter(w, d, info=True) / "dynarank_run.json", "[]")
    return _eval(d / "adapter", w)


def _bad_yaml(command: str):
    def case(w, d, mp):
        run = _copy_run(w.lora, d)
        _write(run / "config.yaml", "method: [lora\nr: 2\n")
        if command == "resume":
            return ["train", "--resume", str(run)]
        summary = (run / "summary.json").read_text().replace('"max_length": 16', '"max_length": null')
        _write(run / "summary.json", summary)  # a run from before summary.json recorded it: config.yaml says
        return _eval(run, w) if command == "eval" else ["export", str(run), "--out", str(d / "exported")]

    return case


def _mistyped_yaml(w, d, mp):
    run = _copy_run(w.lora, d)
    _write(run / "config.yaml", (run / "config.yaml").read_text().replace(f"lr: {default_lr('lora')}", "lr: fast"))
    return ["train", "--resume", str(run)]


def _bad_log(run_name: str, log: str):
    def case(w, d, mp):
        run = _copy_run(getattr(w, run_name), d)
        _write(run / log, "garbage\n" + (run / log).read_text())
        return ["report", str(run)]

    return case


def _bad_adapter_config(w, d, mp):
    _write(_bare_adapter(w, d) / "adapter_config.json", "{\n")
    return _eval(d / "adapter", w, "--labels", LABELS, "--model", str(w.model))


def _bit_flip(run_name: str, weights: str):
    def case(w, d, mp):
        _flip_a_byte(_copy_run(getattr(w, run_name), d) / weights)
        return _eval(d / "run", w)

    return case


def _repeated_column(w, d, mp):
    _write(d / "data.csv", "text,label,text\n" + "".join(f"t{i},{('a', 'b')[i % 2]},x\n" for i in range(20)))
    return [*_train(w, d / "run"), "--data", str(d / "data.csv")]


def _unseen_labels(w, d, mp):
    held = write_csv(d / "held.csv", 40, labels=tuple(f"new-{i}" for i in range(40)))
    return [*_train(w, d / "run"), "--eval-data", str(held)]


def _empty_out(command: str):
    def case(w, d, mp):
        (d / "empty").mkdir()
        return _train(w, d / "empty") if command == "train" else ["export", str(w.lora), "--out", str(d / "empty")]

    return case


def _too_large(w, d, mp):
    import dynarank.training.estimate

    mp.setattr(
        dynarank.training.estimate, "memory_limit_bytes", lambda: 10**9
    )  # were it allocated, 1.4 GB: no harm done
    return [*_train(w, d / "run"), "--r", "100000"]


def _stopped_run_as_out(w, d, mp):
    (d / "stopped").mkdir()
    shutil.copy(w.lora / "config.yaml", d / "stopped" / "config.yaml")
    return _train(w, d / "stopped")


def _chat(rows: list, model: str = "chat", *extra: str):
    """A causal-LM run on a JSON Lines file of ``rows`` (20 good conversations, then ``rows``)."""

    def case(w, d, mp):
        good = [_turns(("user", f"q{i}"), ("assistant", f"a{i}")) for i in range(20)]
        lines = [json.dumps(row) for row in good + rows]
        data = _write(d / "chat.jsonl", "\n".join(lines) + "\n")
        argv = ["train", "--model", str(getattr(w, model)), "--data", str(data), "--out", str(d / "run"), *QUICK]
        return [*argv, *extra]

    return case


def _turns(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def _mixed_prompt_completion(w, d, mp):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": [{"role": "user", "content": "a"}], "completion": "b"}]
    data = _write(d / "pc.jsonl", "".join(json.dumps(row) + "\n" for row in rows * 10))
    return ["train", "--model", str(w.chat), "--data", str(data), "--out", str(d / "run"), *QUICK]


def _without_bitsandbytes(w, d, mp):
    mp.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails, as where it is not installed
    return _chat([], "chat", "--quantize", "nf4")(w, d, mp)


Case = Callable[[SimpleNamespace, Path, pytest.MonkeyPatch], list[str]]
CASES: dict[str, tuple[Case, str]] = {
    "1 pickle and a decoy .safetensors in an adapter folder": (_decoy, "adapter_model.bin, a pickle"),
    "1 pickle beside an adapter's weights": (_pickle_beside_adapter, "training_args.bin, a pickle, beside"),
    "1 pickle beside a model's weights": (_pickle_beside_model, "pytorch_model.bin, a pickle, beside"),
    "1 pickle in a run's adapter": (_pickle_in_a_run, "adapter_model.bin, a pickle, beside"),
    "2 damaged metrics line before the checkpoint": (_damaged_log_line, "metrics.jsonl, line 1: not valid JSON"),
    "5 --max-length above the positions (train)": (
        lambda w, d, mp: [*_train(w, d / "r"), "--max-length", "65"],
        "at most 64 tokens",
    ),
    "5 --max-length above the positions (eval)": (
        lambda w, d, mp: _eval(w.lora, w, "--max-length", "513"),
        "at most 64 tokens",
    ),
    "6 --target-modules '('": (
        lambda w, d, mp: [*_train(w, d / "run"), "--target-modules", "("],
        "--target-modules '(' is not a valid regular expression",
    ),
    "7 truncated PEFT adapter (eval)": (_truncated, "adapter_model.safetensors is not a readable safetensors file"),
    "7 truncated PEFT adapter of a run (export)": (_truncated_in_a_run, "does not match its recorded checksum"),
    "7 adapter weights symlinked to a CSV file": (_symlinked, "is not a readable safetensors file"),
    "7 train --out on a full filesystem (lora)": (_full_disk, "run/adapter: No space left on device"),
    "8 --resume with options that differ": (
        lambda w, d, mp: ["train", "--resume", str(w.lora), "--r", "4", "--max-steps", "12", "--lr", "0.5"],
        f"--lr 0.5 (the run's: {default_lr('lora'):g}); --max-steps 12 (the run's: 2); --r 4 (the run's: 8) differ",
    ),
    "9 summary.json holding a list (eval)": (_summary("[]", "eval"), "summary.json must hold a JSON object"),
    "9 summary.json holding a list (export)": (_summary("[]", "export"), "summary.json must hold a JSON object"),
    "9 summary.json holding a list (report)": (_summary("[]", "report"), "summary.json must hold a JSON object"),
    "9 damaged summary.json": (_summary("{\n", "eval"), "summary.json is not valid JSON"),
    "9 summary.json naming no method": (_summary('{"method": 5}', "eval"), "summary.json is damaged: its method"),
    "9 dynarank_run.json holding a list": (_info_list, "dynarank_run.json must hold a JSON object"),
    "9 config.yaml that does not parse (--resume)": (_bad_yaml("resume"), "config.yaml is not valid YAML"),
    "9 config.yaml with a value of the wrong type (--resume)": (
        _mistyped_yaml,
        "config.yaml: lr: 'fast' is not a positive number",
    ),
    "9 config.yaml that does not parse (eval)": (_bad_yaml("eval"), "config.yaml is not valid YAML"),
    "9 config.yaml that does not parse (export)": (_bad_yaml("export"), "config.yaml is not valid YAML"),
    "9 damaged metrics.jsonl (report)": (_bad_log("lora", "metrics.jsonl"), "metrics.jsonl, line 1: not valid JSON"),
    "9 damaged ranks.jsonl (report)": (_bad_log("native", "ranks.jsonl"), "ranks.jsonl, line 1: not valid JSON"),
    "9 damaged adapter_config.json": (_bad_adapter_config, "adapter_config.json is not valid JSON"),
    "bit flip in a native adapter": (
        _bit_flip("native", "dynarank_adapter/dynarank_adapter.safetensors"),
        "dynarank_adapter.safetensors does not match its recorded checksum",
    ),
    "bit flip in a LoRA run's adapter": (
        _bit_flip("lora", "adapter/adapter_model.safetensors"),
        "adapter_model.safetensors does not match its recorded checksum",
    ),
    "a column named twice": (_repeated_column, "the header names the column 'text' 2 times"),
    "text column == label column": (
        lambda w, d, mp: [*_train(w, d / "run"), "--text-column", "label", "--label-column", "label"],
        "'label' cannot be both the text and the label column",
    ),
    "eval labels missing from training, summarised": (_unseen_labels, "40 label(s) do not occur"),
    "--lr 1e30 (2 steps)": (lambda w, d, mp: [*_train(w, d / "run"), "--lr", "1e30"], "no metric is reported"),
    "--lr 1e30 (30 steps)": (
        lambda w, d, mp: [*_train(w, d / "run"), "--lr", "1e30", "--max-steps", "30"],
        "10 steps in a row were non-finite",
    ),
    "an existing empty --out (train)": (_empty_out("train"), "empty already exists"),
    "an existing empty --out (export)": (_empty_out("export"), "empty already exists"),
    "a run stopped before its first checkpoint as --out": (_stopped_run_as_out, "dynarank train --resume"),
    "chat: a turn with an unknown role": (
        _chat([_turns(("user", "hi"), ("bot", "hello"))]),
        "chat.jsonl, row 21, turn 2: unknown role 'bot'; the roles are system, user, assistant",
    ),
    "chat: a turn with empty content": (
        _chat([_turns(("user", "hi"), ("assistant", "  "))]),
        "chat.jsonl, row 21, turn 2 (assistant): empty content",
    ),
    "chat: a conversation that ends without an assistant turn": (
        _chat([_turns(("user", "hi"), ("assistant", "hello"), ("user", "and?"))]),
        "chat.jsonl, row 21: the conversation ends with a user turn; it must end with the assistant's",
    ),
    "chat: the assistant speaks first": (
        _chat([_turns(("system", "be kind"), ("assistant", "hello"))]),
        "chat.jsonl, row 21: the conversation has no user turn before the assistant's first",
    ),
    "chat: a turn whose content is not text": (
        _chat([{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "hi"}]}]),
        "chat.jsonl, row 21, turn 1 (user): the content must be text, got int",
    ),
    "chat: a conversation of system turns only": (
        _chat([_turns(("system", "be kind"))]),
        "chat.jsonl, row 21: the conversation holds system turns only",
    ),
    "chat: a turn that is not an object": (
        _chat([{"messages": ["hello"]}]),
        "chat.jsonl, row 21, turn 1: a turn is an object with a 'role' and a 'content'",
    ),
    "chat: a model without a chat template": (_chat([], "llama"), "has no chat template"),
    "prompt / completion rows of both forms": (
        _mixed_prompt_completion,
        "pc.jsonl, row 2: 'prompt' and 'completion' are text in row 1 and not here",
    ),
    "--quantize where bitsandbytes is not installed": (
        _without_bitsandbytes,
        "--quantize nf4 needs bitsandbytes, which is not installed: pip install 'dynarank[quant]'",
    ),
    "--quantize with full fine-tuning": (
        lambda w, d, mp: [*_chat([], "chat")(w, d, mp), "--quantize", "nf4", "--method", "full"],
        "full fine-tuning trains every weight, and quantized weights cannot be trained",
    ),
    "--quantize on a classifier": (
        lambda w, d, mp: [*_train(w, d / "run"), "--quantize", "int8"],
        "--quantize int8 is for causal LMs (--task causal-lm)",
    ),
    "--r 100000 on stock LoRA, on a machine with 1 GB": (
        _too_large,
        "--r: 100000 with method 'lora' needs about 1.4 GB for the adapter alone (89,600,000 parameters",
    ),
}
IN_A_PROCESS = {  # run through `python -m dynarank.cli`: whatever the process prints counts
    "1 pickle and a decoy .safetensors in an adapter folder",
    "6 --target-modules '('",
    "7 truncated PEFT adapter (eval)",  # fails after PEFT (and what it imports) is loaded
    "8 --resume with options that differ",
    "9 summary.json holding a list (eval)",
    "--lr 1e30 (2 steps)",  # fails after training ran
}
# A run that fails because training went wrong has logged, while it trained, the steps it skipped: those warning
# lines come before the one error line.
WARNED_WHILE_TRAINING = {"--lr 1e30 (2 steps)": "dynarank: non-finite values at step "}


def _snapshot(*roots: Path) -> dict[str, tuple[int, int] | str]:
    """Every path under ``roots``: files (and symlinks, not followed) with their size and modification time,
    directories by name (a directory made and removed again changes its parent's time, not its content)."""
    found: dict[str, tuple[int, int] | str] = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            stat = path.lstat()
            found[str(path)] = (
                "directory" if path.is_dir() and not path.is_symlink() else (stat.st_size, stat.st_mtime_ns)
            )
    return found


def _run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    src = Path(dynarank.__file__).resolve().parents[1]  # the checkout these tests run from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "dynarank.cli", *argv], cwd=cwd, env=env, capture_output=True)
    return done.returncode, done.stderr.decode()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_code_2_and_leaves_nothing_behind(world, tmp_path, monkeypatch, capsys, case):
    build, expected = CASES[case]
    work = tmp_path / "case"
    work.mkdir()
    argv = build(world, work, monkeypatch)
    monkeypatch.chdir(work)  # a default output directory would appear here
    before = _snapshot(world.root, work)
    capsys.readouterr()
    if case in IN_A_PROCESS:
        code, err = _run_cli(argv, work)
    else:
        code, err = main(argv), capsys.readouterr().err
    lines = err.strip().splitlines()
    if case in WARNED_WHILE_TRAINING:
        assert all(line.startswith(WARNED_WHILE_TRAINING[case]) for line in lines[:-1]), err
        lines = lines[-1:]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"dynarank {argv[0]}: error: ") and expected in lines[0], lines[0]
    assert len(lines[0]) < 600, lines[0]  # one short line, whatever the data holds
    assert _snapshot(world.root, work) == before  # nothing created, changed or removed


def test_no_case_unpickles_anything(world, tmp_path, monkeypatch, capsys, unpickled):
    """Every case that puts a pickle where a loader could pick it, run in this process with torch.load watched."""
    for case in [c for c in CASES if c.startswith("1 ")]:
        work = tmp_path / str(len(os.listdir(tmp_path)))
        work.mkdir()
        assert main(CASES[case][0](world, work, monkeypatch)) == 2, case
    assert unpickled == []


# ---------------------------------------------------------------------------- where each case of issue 17 is tested
COVERED_BY = {
    "1 a pickle beside a decoy, refused; exactly the checked safetensors file loaded": [
        "test_safe_loading.test_a_pickle_in_an_adapter_folder_with_a_decoy_safetensors_is_refused_unread",
        "test_safe_loading.test_an_adapter_is_loaded_from_its_safetensors_file_without_peft_s_loader",
        "test_safe_loading.test_the_safe_loader_gives_the_logits_of_stock_peft",
    ],
    "2 metrics consistent with the checkpoint, a torn last line tolerated": [
        "test_run_files.test_a_killed_run_keeps_the_metrics_of_its_checkpoint_and_resumes_to_a_complete_log",
        "test_run_files.test_a_run_killed_with_sigkill_resumes_with_every_steps_metrics",
        "test_run_files.test_the_metrics_log_is_forced_to_disk_before_every_checkpoint",
    ],
    "3 line breaks inside quoted CSV fields kept": [
        "test_data_readers.test_a_newline_inside_a_quoted_csv_field_is_kept",
        "test_data_readers.test_any_unicode_in_quoted_csv_fields_round_trips_exactly",
    ],
    "4 U+2028, U+0085, form feed inside rows": [
        "test_data_readers.test_a_csv_row_with_a_unicode_line_separator_in_an_unquoted_field_is_one_row",
        "test_data_readers.test_a_json_lines_string_holding_a_unicode_line_separator_is_one_line",
        "test_data_readers.test_any_unicode_in_json_lines_strings_round_trips_exactly",
    ],
    "5 --max-length above the position limit": [
        "test_run_files.test_a_max_length_above_the_models_positions_is_refused_in_train_and_eval"
    ],
    "6 a --target-modules pattern that does not compile": [
        "test_run_files.test_a_target_modules_pattern_that_is_not_a_regex_is_refused_naming_it"
    ],
    "7 damaged or unwritable safetensors files": [
        "test_safe_loading.test_a_damaged_peft_weights_file_is_one_line",
        "test_run_files.test_a_full_disk_while_writing_a_lora_adapter_names_the_path_and_leaves_nothing",
    ],
    "8 --resume with other options": [
        "test_run_files.test_resume_refuses_options_that_differ_from_the_runs_naming_each",
        "test_run_files.test_resume_accepts_options_equal_to_the_runs",
    ],
    "9 damaged run files named": ["test_run_files.test_damaged_json_names_its_file"],
    "10 --seed reproduces a classification run with a new task head": [
        "test_cli_runs.test_two_runs_of_the_same_command_are_bitwise_equal_even_with_a_new_task_head",
        "test_cli_runs.test_a_killed_five_label_run_resumed_equals_a_separately_launched_uninterrupted_run",
    ],
}


@pytest.mark.parametrize("item", list(COVERED_BY))
def test_every_case_of_the_issue_has_its_tests_in_the_suite(item):
    for name in COVERED_BY[item]:
        module, function = name.split(".")
        assert callable(getattr(importlib.import_module(module), function, None)), name
