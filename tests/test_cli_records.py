"""What a run's records (config.yaml, summary.json) hold, and what they are good for: passed back with --config a
record trains the same run again; --resume takes options equal to the run's; a stopped run's advice can be followed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dynarank.cli import main
from test_cli import train_args, write_csv
from test_cli_inputs import refused


@pytest.fixture
def data(tmp_path) -> Path:
    return write_csv(tmp_path / "data.csv", n=40)


def _config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# ---------------------------------------------------------------------------- --config RUN/config.yaml
def test_a_runs_config_yaml_passed_back_with_config_trains_the_same_run_again(tiny_model_dir, data, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(train_args(tiny_model_dir, data, first, "--method", "ard")) == 0
    assert main(["train", "--config", str(first / "config.yaml"), "--out", str(again)]) == 0
    assert _summary(again)["eval"] == _summary(first)["eval"]
    assert (again / "dynarank_adapter").is_dir()
    recorded, redone = _config(first), _config(again)
    assert redone["config"] == str(first / "config.yaml")  # where its options came from
    same = set(recorded) - {"out", "config", "lr_source", "r_source"}  # the file gave the rate and rank: 'given'
    assert {k: redone[k] for k in same} == {k: recorded[k] for k in same}


def test_a_record_whose_data_file_changed_since_is_refused_naming_the_file(tiny_model_dir, data, tmp_path, capsys):
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(train_args(tiny_model_dir, data, first, "--method", "lora")) == 0
    with data.open("a") as f:
        f.write("this is great number 99,positive\n")
    err = refused(["train", "--config", str(first / "config.yaml"), "--out", str(again)], capsys)
    assert f"--data {data}" in err and "changed since" in err and "data_sha256" in err
    assert not again.exists()
    # Given on the command line, the file is what the user chose: trained on as it is now
    assert main(["train", "--config", str(first / "config.yaml"), "--data", str(data), "--out", str(again)]) == 0


@pytest.mark.parametrize(
    "key, value, named",
    [("colour", "red", "unknown option 'colour'"), ("weight_decay", 0.1, "weight_decay 0.1 is not what")],
)
def test_a_record_with_an_unknown_key_or_another_optimizer_is_refused_naming_the_key(
    tiny_model_dir, data, tmp_path, capsys, key, value, named
):
    first = tmp_path / "first"
    assert main(train_args(tiny_model_dir, data, first, "--method", "lora")) == 0
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump({**_config(first), key: value}))
    err = refused(["train", "--config", str(edited), "--out", str(tmp_path / "again")], capsys)
    assert named in err
    assert not (tmp_path / "again").exists()


# ---------------------------------------------------------------------------- a run stopped on NaN/inf
def test_the_stop_message_of_a_non_finite_run_gives_advice_that_can_be_followed(tiny_model_dir, data, tmp_path, capsys):
    run, again = tmp_path / "run", tmp_path / "again"
    argv = train_args(tiny_model_dir, data, run, "--method", "lora", "--lr", "1e30")
    err = refused([*argv, "--save-every", "1", "--on-nonfinite", "stop"], capsys)
    assert "resume from it" not in err  # --resume refuses every changed option: it cannot be the advice
    advice = f"dynarank train --config {run / 'config.yaml'} --out NEW_DIR --lr RATE"
    assert advice in err and "a lower --lr (this run's: 1e+30)" in err
    followed = advice.replace("NEW_DIR", str(again)).replace("RATE", "1e-3").split()[1:]
    assert main(followed) == 0
    assert _config(again)["lr"] == 1e-3 and _summary(again)["skipped_steps"] == 0


def test_a_stopped_run_that_left_nothing_says_to_run_the_command_again(tiny_model_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = train_args(tiny_model_dir, data, run, "--method", "lora", "--lr", "1e30", "--on-nonfinite", "stop")
    err = refused(argv, capsys)
    assert "Nothing was kept: run the command again with other options, e.g. a lower --lr" in err
    assert "resume" not in err and not run.exists()


# ---------------------------------------------------------------------------- --resume with the run's own values
def test_resume_accepts_a_value_equal_to_the_one_the_run_resolved_and_refuses_another(
    tiny_model_dir, data, tmp_path, capsys
):
    run = tmp_path / "run"
    assert main([*train_args(tiny_model_dir, data, run, "--method", "ard"), "--save-every", "3"]) == 0
    assert "ard_lambda" not in _config(run)  # not given: ARD resolves it (relative mode: 1.0)
    assert main(["train", "--resume", str(run), "--ard-lambda", "1.0"]) == 0
    err = refused(["train", "--resume", str(run), "--ard-lambda", "2.0"], capsys)
    assert "--ard-lambda 2.0 (the run's: 1.0) differs" in err


# ---------------------------------------------------------------------------- what the records hold
def test_a_full_fine_tuning_run_records_no_rank(tiny_model_dir, data, tmp_path):
    run = tmp_path / "run"
    argv = train_args(tiny_model_dir, data, run, "--method", "full")
    at = argv.index("--r")
    assert main(argv[:at] + argv[at + 2 :]) == 0  # full fine-tuning takes no --r
    config, summary = _config(run), _summary(run)
    assert "r" not in config and "r_source" not in config and "target_modules" not in config
    assert summary["r"] is None and summary["r_source"] is None and summary["final_ranks"] is None


def test_both_records_hold_the_schedule_and_weight_decay_the_loop_used(tiny_model_dir, data, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, run, "--method", "lora", "--max-steps", "20")) == 0
    config, summary = _config(run), _summary(run)
    assert config["weight_decay"] == summary["weight_decay"] == 0.0
    schedule = config["lr_schedule"]
    assert schedule == summary["lr_schedule"] and schedule["name"] == "linear" and schedule["warmup_ratio"] == 0.06
    # The rates the loop logged follow the recorded warm-up: min((t + 1) / W, (T - t) / (T - W)) after step t
    total, warm, lr = 20, schedule["warmup_steps"], summary["lr"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for line in (x for x in logged if "lr" in x):
        t = line["step"]
        assert line["lr"] == pytest.approx(lr * min((t + 1) / warm, (total - t) / (total - warm)))


# ---------------------------------------------------------------------------- empty paths
@pytest.mark.parametrize("flag", ["--out", "--resume", "--eval-data", "--config"])
def test_an_empty_path_option_is_refused_not_taken_as_its_default(
    tiny_model_dir, data, tmp_path, monkeypatch, capsys, flag
):
    monkeypatch.chdir(tmp_path)  # where the default runs/<method>-<time> would go
    argv = [*train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora"), flag, ""]
    err = refused(argv, capsys)
    assert f"{flag} is empty" in err
    assert not (tmp_path / "run").exists() and not Path("runs").exists()
