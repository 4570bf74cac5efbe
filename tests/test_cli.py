"""The `dynarank` command end to end on a tiny model and tiny data made here."""

from __future__ import annotations

import csv
import json
import os
import stat
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel

from dynarank.cli import main
from dynarank.cli.commands import load_trained
from dynarank.defaults import default_lr, source
from dynarank.training.models import load_classifier

WORDS = {"positive": ["great", "love", "happy", "good", "wonderful"], "negative": ["bad", "hate", "sad", "awful"]}


def write_csv(path: Path, n: int = 48, labels=("positive", "negative"), header=("text", "label")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i in range(n):
            label = labels[i % len(labels)]
            words = WORDS.get(label, ["meh"])
            writer.writerow([f"this is {words[i % len(words)]} number {i}", label])
    return path


def train_args(model_dir, data, out, *extra):
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--max-steps",
        "6",
        "--r",
        "2",
        "--max-length",
        "16",
        *extra,
    ]


def kill_after(monkeypatch, step: int, before_dying=None) -> None:
    """The next CLI training run dies after ``step`` (a KeyboardInterrupt: exit code 130), as a killed process would;
    ``before_dying(kwargs)`` sees the run's train_classifier arguments at that moment. monkeypatch.undo() ends it."""
    import dynarank.cli.train as train_module

    real = train_module.train_classifier

    def killed(*args, **kwargs):
        def on_step(record, inner=kwargs["on_step"]):
            inner(record)
            if record["step"] == step:
                if before_dying is not None:
                    before_dying(kwargs)
                raise KeyboardInterrupt

        return real(*args, **{**kwargs, "on_step": on_step})

    monkeypatch.setattr(train_module, "train_classifier", killed)


def test_train_eval_export_report_end_to_end(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv")
    run = tmp_path / "run"
    assert main(train_args(tiny_model_dir, data, run, "--method", "ard")) == 0
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "ranks.jsonl",
        "summary.json",
        "adapter/adapter_config.json",
        "dynarank_adapter/dynarank_adapter.json",
        "ranks_heatmap.png",
        "ranks_over_time.png",
    ):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 6 and [s["step"] for s in steps[:-1]] == list(range(1, 7))
    assert steps[-2]["trainable_parameters"] == summary["trainable_parameters"]
    assert summary["state_bytes_end"] < summary["state_bytes_start"]  # ranks fell, and memory with them
    assert steps[-1]["eval"] == summary["eval"]
    last_ranks = json.loads((run / "ranks.jsonl").read_text().splitlines()[-1])["ranks"]
    assert last_ranks == summary["final_ranks"]

    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics) == {"accuracy", "macro_f1"} and 0.0 <= metrics["accuracy"] <= 1.0

    assert main(["export", str(run), "--out", str(tmp_path / "exported")]) == 0
    umask = os.umask(0o022)
    os.umask(umask)
    for adapter in (run / "adapter", run / "dynarank_adapter", tmp_path / "exported"):  # a server may be another user
        assert stat.S_IMODE(adapter.stat().st_mode) == 0o777 & ~umask, adapter
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "exported"), "--data", str(data)]) == 0  # a bare adapter directory
    assert json.loads(capsys.readouterr().out) == metrics
    model, tokenizer, _ = load_trained(run)
    base, _ = load_classifier(tiny_model_dir, summary["label_names"])
    stock = PeftModel.from_pretrained(base, tmp_path / "exported")
    batch = tokenizer(["I love this", "this is awful"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(stock(**batch).logits, model(**batch).logits, atol=1e-4, rtol=0)

    assert main(["export", str(run), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    merged, _ = load_classifier(tmp_path / "merged", summary["label_names"])
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, atol=1e-4, rtol=0)

    (run / "ranks_heatmap.png").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "ranks_heatmap.png").stat().st_size > 1000


@pytest.mark.parametrize("method", ["lora", "full"])
def test_baselines_train_through_the_same_command(tiny_model_dir, tmp_path, method):
    data = write_csv(tmp_path / "data.csv")
    argv = train_args(tiny_model_dir, data, tmp_path / "run", "--method", method)
    if method == "full":  # no adapter: no rank to give
        del argv[argv.index("--r") : argv.index("--r") + 2]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == method and "accuracy" in summary["eval"]


def test_full_fine_tuning_refuses_adapter_options_naming_them(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv")
    argv = train_args(tiny_model_dir, data, tmp_path / "run", "--method", "full", "--target-modules", "query")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynarank train: error: --r / --target-modules: not used by method 'full'"), err
    assert not (tmp_path / "run").exists()


def test_config_file_supplies_options(tiny_model_dir, tmp_path):
    data = write_csv(tmp_path / "data.csv")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {data}\nmethod: dynarank-lora\nmax-steps: 2\nbatch-size: 4\n")
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "dynarank-lora" and summary["steps"] == 2


def _bad_inputs(tmp_path: Path, model_dir: Path) -> dict[str, tuple[list[str], str]]:
    good = write_csv(tmp_path / "good.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9 is good,positive\n".encode("latin-1"))
    other_labels = write_csv(tmp_path / "other.csv", labels=("positive", "neutral"))
    not_model = tmp_path / "not_model"
    not_model.mkdir()
    (not_model / "config.json").write_text("{not json")
    list_config = tmp_path / "list_config"
    list_config.mkdir()
    (list_config / "config.json").write_text("[]")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in model_dir.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes()[:1000] if f.name == "model.safetensors" else f.read_bytes())
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("x")
    base = ["--model", str(model_dir), "--max-steps", "2"]
    return {
        "missing file": (["train", *base, "--data", str(tmp_path / "nope.csv")], "not found"),
        "unknown column": (
            ["train", *base, "--data", str(good), "--text-column", "body"],
            "columns found: text, label",
        ),
        "empty file": (["train", *base, "--data", str(empty)], "empty"),
        "non-UTF-8": (["train", *base, "--data", str(latin)], "UTF-8"),
        "unseen eval labels": (["train", *base, "--data", str(good), "--eval-data", str(other_labels)], "neutral"),
        "broken model dir": (["train", "--model", str(not_model), "--data", str(good)], "not valid JSON"),
        "existing out dir": (["train", *base, "--data", str(good), "--out", str(taken)], "already exists"),
        "bad config key": (["train", "--config", str(_yaml(tmp_path, "colour: red\n"))], "unknown option 'colour'"),
        "run dir that is not one": (["eval", str(taken), "--data", str(good)], "not a dynarank run directory"),
        "budget larger than the model": (["train", *base, "--data", str(good), "--r0", "64"], "larger than the model"),
        "config.json not an object": (["train", "--model", str(list_config), "--data", str(good)], "JSON object"),
        "truncated weights": (["train", "--model", str(truncated), "--data", str(good)], "cannot load"),
        "badly typed config value": (
            ["train", "--config", str(_yaml(tmp_path, "batch-size: abc\n"))],
            "batch-size: 'abc' is not a positive integer",
        ),
        "config value not a choice": (
            ["train", "--config", str(_yaml(tmp_path, "method: magic\n"))],
            "'magic' is not one of",
        ),
        "parameter budget above the start": (
            ["train", *base, "--max-steps", "10", "--data", str(good), "--target-params", "10000000"],
            "must be below the adapter's size",
        ),
        "parameter budget below the smallest adapter": (  # it named the start's size and told to raise the rank
            ["train", *base, "--max-steps", "10", "--data", str(good), "--target-params", "39"],
            "--target-params: ARD's budget (39) is below",
        ),
    }


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"bad-{zlib.crc32(text.encode())}.yaml"  # one file per case: the cases are built together
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "unknown column",
        "empty file",
        "non-UTF-8",
        "unseen eval labels",
        "broken model dir",
        "existing out dir",
        "bad config key",
        "run dir that is not one",
        "budget larger than the model",
        "config.json not an object",
        "truncated weights",
        "badly typed config value",
        "config value not a choice",
        "parameter budget above the start",
        "parameter budget below the smallest adapter",
    ],
)
def test_bad_input_gets_one_line_and_exit_code_2(tiny_model_dir, tmp_path, capsys, case):
    argv, expected = _bad_inputs(tmp_path, tiny_model_dir)[case]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "taken" / "keep.txt").exists()


def test_options_typed_on_the_command_line_win_over_the_config_file_even_at_their_default(tiny_model_dir, tmp_path):
    data = write_csv(tmp_path / "data.csv")
    config = tmp_path / "run.yaml"
    config.write_text(f"method: lora\nr: 3\ndata: {data}\n")
    # --method ard is the default value: it still counts as typed.
    argv = train_args(tiny_model_dir, data, tmp_path / "run", "--config", str(config), "--method", "ard")
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "ard" and summary["r"] == 2  # --r 2 from train_args, over the file's r: 3


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory_behind(tiny_model_dir, tmp_path, capsys):
    data = write_csv(tmp_path / "data.csv")
    argv = [*train_args(tiny_model_dir, data, tmp_path / "run"), "--method", "ard", "--max-steps", "2"]
    assert main(argv) == 2  # ARD cannot calibrate lambda in a 2-step run
    assert "warm-up" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([*argv[:-4], "--method", "lora"]) == 0  # the same --out works on the next try


def test_a_run_with_listed_target_modules_resumes(tiny_model_dir, tmp_path):
    data = write_csv(tmp_path / "data.csv")
    argv = [*train_args(tiny_model_dir, data, tmp_path / "run"), "--target-modules", "query,value", "--save-every", "3"]
    assert main(argv) == 0
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0  # config.yaml records the list


# At r=2 ARD starts at 1,696 parameters on this model and the SVD methods at 1,792: ARD and AdaLoRA-style prune into
# their budgets (below the start), ElaLoRA holds a budget above its start as a ceiling.
@pytest.mark.parametrize("method, budget", [("ard", 1500), ("elalora", 2000), ("adalora-physical", 1500)])
def test_a_parameter_budget_is_honoured_from_the_command_line(tiny_model_dir, tmp_path, method, budget):
    data = write_csv(tmp_path / "data.csv", n=96)
    argv = train_args(tiny_model_dir, data, tmp_path / "run", "--method", method, "--target-params", str(budget))
    argv[argv.index("--max-steps") + 1] = "24"
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["adapter_parameters"] <= budget


# ARD's case is long (its start at this budget is the 8 it had before; the demo's test runs ARD from a budget alone)
@pytest.mark.parametrize(
    "method, start", [("elalora", 2), ("adalora-physical", 3), pytest.param("ard", 8, marks=pytest.mark.slow)]
)
def test_a_budget_without_r_starts_at_the_rank_the_study_gave_the_method_there_and_resumes_at_it(
    tiny_model_dir, tmp_path, method, start
):
    data = write_csv(tmp_path / "data.csv", n=96)
    argv = train_args(tiny_model_dir, data, tmp_path / "run", "--method", method, "--target-params", "1800")
    del argv[argv.index("--r") : argv.index("--r") + 2]
    argv += ["--save-every", "3"]
    assert main(argv) == 0
    # 1,800 parameters are 2.01 plain LoRA ranks on this model's targets (896 a rank): the study ran ElaLoRA at r=2,
    # AdaLoRA-style at stock AdaLoRA's 1.5x (3) and ARD at max(8, 2 x 2)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        summary["r"] == start and "defaults study's start at this budget (2.01 plain LoRA ranks" in summary["r_source"]
    )
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (recorded["r"], recorded["r_source"]) == (start, summary["r_source"])
    # the resume trains the start it recorded, to the same end as the run itself
    (tmp_path / "run" / "summary.json").unlink()
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    resumed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert resumed["r"] == start and resumed["eval"] == summary["eval"]
    given = train_args(tiny_model_dir, data, tmp_path / "run2", "--method", method, "--target-params", "1800")
    given[given.index("--r") + 1] = "4"
    assert main(given) == 0
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["r"] == 4  # a given --r is used as given


def test_eval_every_logs_held_out_metrics_while_training(tiny_model_dir, tmp_path):
    data = write_csv(tmp_path / "data.csv")
    assert main([*train_args(tiny_model_dir, data, tmp_path / "run"), "--eval-every", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [2, 4, 6]  # 2 and 4 while training, 6 at the end
    assert all("accuracy" in r["eval"] for r in records if "eval" in r)


def test_demo_fast_path_compares_ard_with_lora_at_equal_parameters(tmp_path, capsys):
    assert main(["demo", "--max-steps", "5", "--n-train", "64", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "ARD-LoRA vs plain LoRA" in out and "LoRA r=" in out
    ard = json.loads((tmp_path / "demo" / "ard" / "summary.json").read_text())
    assert ard["rank_init"]["start_params"] < ard["trainable_parameters_start"]  # the default start: from data
    used = ard["settings"]  # every setting the run used, defaults included, and what ARD resolved from them
    assert used["start"] == "data" and used["config"]["init_rho"] == 1.5
    assert used["resolved"]["schedule"]["t_init"] >= 1 and used["resolved"]["lr_alpha"] > 0
    assert "ARD-LoRA (data start)" in " ".join(out.split())
    for method, folder in (("ard", "ard"), ("lora", "lora-r2")):  # each at its own default rate, none hand-picked
        record = yaml.safe_load((tmp_path / "demo" / folder / "config.yaml").read_text())
        assert (record["lr"], record["lr_source"]) == (default_lr(method), source("classify"))


# What a summary measures of the process rather than of the run: how long it took, and its memory
PROCESS_FIGURES = ("seconds", "seconds_per_step", "init_seconds", "wall_seconds", "peak_rss_mb")


def assert_same_run(full: Path, resumed: Path) -> None:
    """The resumed run's summary (all of it but the process's timings and memory: final ranks, evaluation, the sizes
    over the run, warnings, where its rate and start came from), its adapter's run record and its PEFT adapter equal
    the uninterrupted run's, bitwise."""
    from safetensors.torch import load_file

    a_summary, b_summary = (json.loads((run / "summary.json").read_text()) for run in (full, resumed))
    for figure in PROCESS_FIGURES:
        a_summary.pop(figure), b_summary.pop(figure)
    assert b_summary == a_summary
    a_info, b_info = (json.loads((run / "adapter" / "dynarank_run.json").read_text()) for run in (full, resumed))
    assert b_info == a_info
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ARD's case is long: it holds nothing apart at the end (the SVD methods' E is what the test is about)
@pytest.mark.parametrize("method", ["elalora", "adalora-physical", pytest.param("ard", marks=pytest.mark.slow)])
def test_a_run_killed_after_its_last_checkpoint_resumes_to_the_same_outputs(
    tiny_model_dir, tmp_path, monkeypatch, method
):
    """The last step is checkpointed (6 of 6, --save-every 3) and the process dies before writing its outputs (in
    the final evaluation, say). The SVD methods fold E into the adapters after the last step: their checkpoint there
    must still resume (it failed with 'trainable parameters differ' while the fold came before that checkpoint)."""
    import dynarank.cli.train as train_module

    data = write_csv(tmp_path / "data.csv")
    argv = ["--method", method, "--save-every", "3"]
    assert main([*train_args(tiny_model_dir, data, tmp_path / "full"), *argv]) == 0

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_write_outputs", killed)
    assert main([*train_args(tiny_model_dir, data, tmp_path / "killed"), *argv]) == 130
    monkeypatch.undo()
    killed_run = tmp_path / "killed"
    assert (killed_run / "checkpoints" / "step-6").is_dir() and not (killed_run / "summary.json").exists()
    assert main(["train", "--resume", str(killed_run)]) == 0
    assert_same_run(tmp_path / "full", tmp_path / "killed")


def test_a_killed_cli_run_resumes_to_the_same_adapter(tiny_model_dir, tmp_path, monkeypatch):
    data = write_csv(tmp_path / "data.csv")
    argv = ["--method", "ard", "--max-steps", "12", "--save-every", "4"]
    assert main([*train_args(tiny_model_dir, data, tmp_path / "full"), *argv]) == 0
    kill_after(monkeypatch, 9)  # the process dies after step 9 (checkpoint at 8)
    assert main([*train_args(tiny_model_dir, data, tmp_path / "killed"), *argv]) == 130
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "killed")]) == 0
    assert_same_run(tmp_path / "full", tmp_path / "killed")
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)) + [12]


@pytest.mark.parametrize("module", ["dynarank", "dynarank.cli"])
def test_python_dash_m_runs_the_dynarank_command(module):
    """`python -m dynarank` (what `torchrun -m dynarank` runs too) is the `dynarank` command, as `-m dynarank.cli`."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", module, "train", "--help"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: dynarank train"), done.stdout[:200]


def test_a_resume_on_a_data_file_changed_since_the_run_started_is_refused(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    """A run trained on two data sets would be neither run: the run records its data files' sha256, and a resume
    holds them to it (it resumed on the changed file, or blamed the checkpoint for a changed label set)."""
    data = write_csv(tmp_path / "data.csv")
    run = tmp_path / "run"
    kill_after(monkeypatch, 3)
    assert main([*train_args(tiny_model_dir, data, run), "--method", "ard", "--save-every", "2"]) == 130
    monkeypatch.undo()
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert set(recorded) >= {"data_sha256"} and "eval_data_sha256" not in recorded
    original = data.read_bytes()
    write_csv(data, n=40)  # another data set under the same name
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(data) in err and "has changed since" in err
    assert not (run / "summary.json").exists() and (run / "checkpoints" / "step-2").is_dir()
    data.write_bytes(original)  # put back: the run resumes
    assert main(["train", "--resume", str(run)]) == 0
