"""Every quickstart snippet of the README runs as written (tiny models stand in for the user's)."""

from __future__ import annotations

import csv
import shlex
from pathlib import Path

import pytest
from transformers import Trainer, TrainingArguments

import dynarank
from dynarank.cli import main
from tiny_models import TokenDataset, tiny_bert

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(language: str) -> dict[str, str]:
    """Code blocks of ``language`` keyed by the heading above them (the first block under each heading)."""
    found, heading, inside, lines = {}, "", False, []
    for line in README.read_text().splitlines():
        if inside:
            if line.startswith("```"):
                found.setdefault(heading, "\n".join(lines) + "\n")
                inside = False
            else:
                lines.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.strip() == "```" + language:
            inside, lines = True, []
    return found


def test_the_readme_has_the_snippets_this_file_runs():
    assert {"Plain PyTorch loop", "transformers Trainer", "Export and load with stock PEFT"} <= set(blocks("python"))
    assert "CLI on your own CSV" in blocks("bash")


def test_plain_pytorch_loop_snippet(monkeypatch):
    data = TokenDataset()
    loader = [{"input_ids": data.ids[i : i + 8], "labels": data.labels[i : i + 8]} for i in range(0, 32, 8)]
    scope = {"model": tiny_bert(), "loader": loader, "dynarank": dynarank}
    exec(blocks("python")["Plain PyTorch loop"], scope)
    assert scope["controller"].step == len(loader)


def test_trainer_snippet(tmp_path):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=8,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    scope = {"model": tiny_bert(), "args": args, "train_ds": TokenDataset(), "Trainer": Trainer, "dynarank": dynarank}
    exec(blocks("python")["transformers Trainer"], scope)
    assert scope["callback"].controller.step == 6


def test_export_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = dynarank.attach(tiny_bert(), dynarank.DynaRankConfig(r=2, target_modules="all-linear"))
    scope = {"model": model, "base_model": tiny_bert(), "dynarank": dynarank}
    exec(blocks("python")["Export and load with stock PEFT"], scope)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter-vllm" / "adapter_model.safetensors").is_file()


def test_cli_snippet(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("reviews.csv", "heldout.csv"):
        with open(name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["review", "stars"])
            for i in range(24):
                writer.writerow([f"{'loved it' if i % 2 else 'hated it'} {i}", "5" if i % 2 else "1"])
    commands = [line.split("#")[0].strip() for line in blocks("bash")["CLI on your own CSV"].splitlines()]
    commands = [c for c in commands if c.startswith("dynarank ")]
    assert len(commands) >= 5
    for command in commands:
        argv = shlex.split(command)[1:]
        if argv[0] == "train":
            argv += ["--max-steps", "6", "--batch-size", "4"]  # the snippet as written, shortened for the test
        assert main(argv) == 0, command


@pytest.mark.parametrize("line", [0, 1])
def test_first_screen_commands_are_the_setup_and_the_test_command(line):
    commands = blocks("bash")["dynarank"].strip().splitlines()  # the block under the title
    assert len(commands) == 2
    assert commands[line].endswith("dynarank demo" if line == 0 else "python -m pytest")
    assert commands[0].startswith("pip install torch==2.13.0") if line == 0 else True
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest" in ci and "torch==2.13.0" in ci
