"""A run directory stays consistent whatever happens to the process: logs match the checkpoint they resume from, a
resumed run is the run it continues, a run that cannot produce numbers says so, and a failed write names its path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dynarank
from dynarank.cli import main
from dynarank.cli.run_dir import RunDir
from dynarank.defaults import default_lr
from dynarank.files import RunFileError, read_jsonl, replace_file
from dynarank.training.loop import MAX_SKIPPED_IN_A_ROW, NonFiniteError, train_classifier
from dynarank.training.metrics_log import MetricsLog
from test_checkpoint import poison_loss_at, spec
from test_cli import kill_after, train_args, write_csv
from test_cli_inputs import refused
from tiny_models import WordTokenizer, examples, tiny_bert


@pytest.fixture
def data(tmp_path) -> Path:
    return write_csv(tmp_path / "train_ok.csv", n=40)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _killed_at(monkeypatch, step: int, on_disk: dict) -> None:
    """The next CLI run dies after ``step`` as a SIGKILL would: the metrics it had not forced to disk are lost
    (``on_disk`` gets what the file held at that moment, which the run's closing then overwrites)."""

    def lose_the_unforced_metrics(kwargs):
        on_disk["metrics"] = (kwargs["run_dir"] / "metrics.jsonl").read_bytes()

    kill_after(monkeypatch, step, lose_the_unforced_metrics)


# ---------------------------------------------------------------------------- metrics.jsonl and checkpoints
@pytest.mark.parametrize("torn", [False, True])
def test_a_killed_run_keeps_the_metrics_of_its_checkpoint_and_resumes_to_a_complete_log(
    tiny_model_dir, data, tmp_path, monkeypatch, torn
):
    run, on_disk = tmp_path / "run", {}
    argv = [*train_args(tiny_model_dir, data, run, "--method", "lora"), "--max-steps", "12", "--save-every", "4"]
    _killed_at(monkeypatch, 9, on_disk)
    assert main(argv) == 130
    monkeypatch.undo()
    (run / "metrics.jsonl").write_bytes(on_disk["metrics"])  # what the kill left on disk
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")][:8] == list(range(1, 9))  # synced at step 8
    if torn:  # the kill cut a line in the middle
        with (run / "metrics.jsonl").open("a") as f:
            f.write('{"step": 9, "loss": 0.69, "lr": 0.0')
    assert main(["train", "--resume", str(run)]) == 0
    assert _steps(run) == [*range(1, 13), 12]  # every step once, then the final evaluation


def test_a_log_line_damaged_before_the_checkpoint_blocks_resume_naming_the_line(tiny_model_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [*train_args(tiny_model_dir, data, run, "--method", "lora"), "--max-steps", "4", "--save-every", "2"]
    assert main(argv) == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], '{"step": 2, "loss":', *lines[2:]]) + "\n")
    err = refused(["train", "--resume", str(run)], capsys)
    assert "metrics.jsonl, line 2: not valid JSON" in err


def test_the_metrics_log_is_forced_to_disk_before_every_checkpoint(tiny_model_dir, data, tmp_path, monkeypatch):
    events = []
    monkeypatch.setattr(MetricsLog, "sync", lambda self, real=MetricsLog.sync: (events.append("sync"), real(self)))
    real_save = dynarank.checkpoint.save
    monkeypatch.setattr(dynarank.checkpoint, "save", lambda *a, **k: (events.append("save"), real_save(*a, **k))[1])
    argv = [*train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora"), "--max-steps", "6"]
    assert main([*argv, "--save-every", "2"]) == 0
    assert events == ["sync", "save"] * 3


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_run_killed_with_sigkill_resumes_with_every_steps_metrics(tiny_model_dir, data, tmp_path):
    import dynarank as package

    run = tmp_path / "run"
    argv = [*train_args(tiny_model_dir, data, run, "--method", "lora"), "--max-steps", "40", "--save-every", "1"]
    env = {**os.environ, "PYTHONPATH": str(Path(package.__file__).parents[1])}
    child = subprocess.Popen([sys.executable, "-m", "dynarank.cli", *argv], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "step-3").is_dir() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    if child.returncode != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed")
    assert main(["train", "--resume", str(run)]) == 0
    assert _steps(run) == [*range(1, 41), 40]


def test_a_unit_log_cuts_back_to_the_checkpoint_atomically(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 1.0} for s in range(1, 6)] + [{"step": 5, "eval": {"accuracy": 0.5}}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 6, "lo')
    log = MetricsLog(path)
    log.resume_at(3)
    assert read_jsonl(path) == lines[:3] and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_every_metrics_line_reaches_the_file_as_it_is_written(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (1, 2):  # read back while the log is open, as a killed process would leave it
        log.write({"step": step, "loss": 1.0})
        assert [r["step"] for r in read_jsonl(path)] == list(range(1, step + 1))
    log.close()


# ---------------------------------------------------------------------------- --resume takes the run's options
def test_resume_refuses_options_that_differ_from_the_runs_naming_each(tiny_model_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    argv = [*train_args(tiny_model_dir, data, run, "--method", "lora"), "--save-every", "2"]
    assert main(argv) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    err = refused(["train", "--resume", str(run), "--r", "4", "--max-steps", "12", "--lr", "0.5"], capsys)
    assert (
        "--r 4 (the run's: 2)" in err
        and "--max-steps 12 (the run's: 6)" in err
        and f"--lr 0.5 (the run's: {default_lr('lora'):g})" in err
    )
    assert "drop them, or start a new run" in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing touched


def test_resume_accepts_options_equal_to_the_runs(tiny_model_dir, data, tmp_path):
    run = tmp_path / "run"
    argv = [*train_args(tiny_model_dir, data, run, "--method", "lora"), "--save-every", "2"]
    assert main(argv) == 0
    assert main(["train", "--resume", str(run), *argv[1:]]) == 0  # the very same command, with --resume


def test_resume_refuses_a_config_file_that_changes_an_option(tiny_model_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*train_args(tiny_model_dir, data, run, "--method", "lora"), "--save-every", "2"]) == 0
    (tmp_path / "more.yaml").write_text("batch-size: 4\n")
    err = refused(["train", "--resume", str(run), "--config", str(tmp_path / "more.yaml")], capsys)
    assert "--batch-size 4 (the run's: 8)" in err and "--config" in err


def test_resuming_a_run_without_a_checkpoint_says_so_naming_its_folder(tmp_path, caplog):
    from dynarank.cli.train import _resume_step

    (tmp_path / "k2").mkdir()
    with caplog.at_level("WARNING"):
        assert _resume_step(RunDir(tmp_path / "k2")) is None
    assert f"dynarank: {tmp_path / 'k2'} has no checkpoint (stopped before its first save)" in caplog.text
    assert "RunDir(" not in caplog.text


def test_a_run_stopped_before_its_first_checkpoint_is_not_reused_but_resumes_from_the_start(
    tiny_model_dir, data, tmp_path, capsys
):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    argv = [*train_args(tiny_model_dir, data, full, "--method", "lora", "--seed", "4")]
    assert main(argv) == 0
    stopped.mkdir()  # what a SIGKILL before the first checkpoint leaves: the options and a partial log
    (stopped / "config.yaml").write_text((full / "config.yaml").read_text().replace(str(full), str(stopped)))
    (stopped / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    err = refused(train_args(tiny_model_dir, data, stopped, "--method", "lora", "--seed", "4"), capsys)
    assert "holds a run that stopped before it finished: `dynarank train --resume" in err
    assert main(["train", "--resume", str(stopped)]) == 0
    for name in ("metrics.jsonl", "adapter/adapter_model.safetensors"):
        assert (stopped / name).read_bytes() == (full / name).read_bytes(), name


def test_a_run_killed_after_writing_its_adapter_resumes_and_writes_it_again(tiny_model_dir, data, tmp_path):
    run = tmp_path / "run"
    assert main([*train_args(tiny_model_dir, data, run, "--method", "ard"), "--save-every", "3"]) == 0
    (run / "summary.json").unlink()  # killed after the adapter and its dynarank_run.json, before the summary
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"torn")
    assert main(["train", "--resume", str(run)]) == 0  # the adapter directory and its companion file are replaced
    assert json.loads((run / "adapter" / "dynarank_run.json").read_text())["method"] == "ard"
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 100 and (run / "summary.json").is_file()


# ---------------------------------------------------------------------------- runs that cannot produce numbers
def test_training_stops_after_ten_skipped_steps_in_a_row():
    model = tiny_bert()
    forward = model.forward

    def always_nan(*args, **kwargs):
        out = forward(*args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    model.forward = always_nan
    with pytest.raises(NonFiniteError, match=f"{MAX_SKIPPED_IN_A_ROW} steps in a row .* learning rate"):
        train_classifier(model, WordTokenizer(), examples(), spec("lora", steps=40))


def test_occasional_skipped_steps_do_not_stop_training():
    model = poison_loss_at(tiny_bert(), 3)
    metrics = train_classifier(model, WordTokenizer(), examples(), spec("lora", steps=12), eval_set=examples(8)).metrics
    assert metrics["skipped_steps"] == 1 and metrics["steps"] == 12 and 0 <= metrics["eval"]["accuracy"] <= 1


@pytest.mark.parametrize("steps, expected", [("30", "10 steps in a row"), ("2", "no metric is reported")])
def test_a_diverging_learning_rate_ends_in_one_line_and_no_metric(
    tiny_model_dir, data, tmp_path, capsys, steps, expected
):
    argv = train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora", "--lr", "1e30", "--max-steps", steps)
    err = refused(argv, capsys)
    assert expected in err and "learning rate" in err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- option values the model cannot take
def test_a_max_length_above_the_models_positions_is_refused_in_train_and_eval(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv", n=40)
    with data.open("a") as f:
        f.write('"' + "great " * 300 + '",positive\n')  # far longer than the 64 positions of the tiny model
    err = refused(train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora", "--max-length", "65"), capsys)
    assert "--max-length 65 is more than" in err and "at most 64 tokens" in err
    assert not (tmp_path / "run").exists()
    assert main(train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora", "--max-length", "64")) == 0
    err = refused(["eval", str(tmp_path / "run"), "--data", str(data), "--max-length", "513"], capsys)
    assert "at most 64 tokens" in err


@pytest.mark.parametrize("pattern", ["(", "query[", "*value"])
def test_a_target_modules_pattern_that_is_not_a_regex_is_refused_naming_it(
    tiny_model_dir, data, tmp_path, capsys, pattern
):
    err = refused(train_args(tiny_model_dir, data, tmp_path / "run", "--target-modules", pattern), capsys)
    assert f"--target-modules {pattern!r} is not a valid regular expression" in err
    assert f"{pattern!r} is not a valid regular expression" in refused(["inspect", "--target-modules", pattern], capsys)


# ---------------------------------------------------------------------------- failed writes name their path
def test_a_write_the_disk_refuses_names_the_file_and_leaves_the_previous_content(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    path.write_text("previous")

    def full(fd):
        raise OSError(28, "No space left on device")  # as write()/fsync() report it: no file name

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        replace_file(path, b"new")
    assert info.value.filename == str(path) and info.value.strerror == "No space left on device"
    assert path.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_full_disk_while_writing_a_lora_adapter_names_the_path_and_leaves_nothing(
    tiny_model_dir, data, tmp_path, capsys, monkeypatch
):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No s" })')

    monkeypatch.setattr(safetensors.torch, "serialize_file", full)
    err = refused(train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora"), capsys)
    assert err.endswith(f"{tmp_path / 'run' / 'adapter'}: No space left on device")
    assert not (tmp_path / "run").exists()


def test_damaged_json_names_its_file(tmp_path):
    (tmp_path / "summary.json").write_text("{\n")
    with pytest.raises(RunFileError, match=r"summary.json is not valid JSON \(Expecting property name"):
        RunDir(tmp_path).read_summary()
    (tmp_path / "summary.json").write_text("[1, 2]")
    with pytest.raises(RunFileError, match="summary.json must hold a JSON object, not a list"):
        RunDir(tmp_path).read_summary()
