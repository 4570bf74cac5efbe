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


SFT = "TRL SFTTrainer on chat data, 4-bit base (QLoRA with learned per-head ranks)"


def test_the_readme_has_the_snippets_this_file_runs():
    assert {"Plain PyTorch loop", "transformers Trainer", "Export and load with stock PEFT", SFT} <= set(
        blocks("python")
    )
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


def run_sft_snippet(tmp_path, monkeypatch, steps: int, model_dir=None) -> dict:
    """The SFTTrainer snippet as written, with ``steps`` optimizer steps (on ``model_dir`` instead of SmolLM2);
    checks that the stock PEFT model it ends with gives the trained model's logits."""
    pytest.importorskip("trl")
    pytest.importorskip("bitsandbytes")
    import torch

    import dynarank.training.models as models

    if model_dir is not None:
        monkeypatch.setattr(models, "packaged_smollm2_path", lambda: model_dir)
    monkeypatch.chdir(tmp_path)
    code = blocks("python")[SFT]
    assert "max_steps=60" in code
    scope: dict = {}
    exec(code.replace("max_steps=60", f"max_steps={steps}"), scope)
    assert scope["trainer"].dynarank.controller.step == steps
    model, stock = scope["model"], scope["stock"]
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    model.eval(), stock.eval()
    with torch.no_grad():
        trained, loaded = model(input_ids=ids).logits, stock(input_ids=ids).logits
        with stock.disable_adapter():
            base = stock(input_ids=ids).logits
    # float32 rounding: stock PEFT adds its update in another order than the trained layers (on SmolLM2's 30 layers
    # 3e-4 at logits of ~12, a relative 3e-5); a missing or mis-scaled module would move them by what the update does
    torch.testing.assert_close(loaded, trained, atol=1e-4, rtol=1e-4)
    assert float((trained - base).abs().max()) > 100 * (1e-4 + 1e-4 * float(trained.abs().max()))
    return scope


def test_sft_snippet_on_a_tiny_llama(tmp_path, monkeypatch):
    from tiny_models import save_tiny_model_dir

    tiny = save_tiny_model_dir(tmp_path / "tiny", kind="llama", chat=True)
    scope = run_sft_snippet(tmp_path, monkeypatch, steps=10, model_dir=tiny)
    assert (tmp_path / "sft-adapter" / "adapter_model.safetensors").is_file()
    assert (
        scope["trainer"].dynarank.controller.history[-1]["total_rank"]
        < scope["trainer"].dynarank.controller.history[0]["total_rank"]
    )


@pytest.mark.slow
def test_sft_snippet_on_the_packaged_smollm2(tmp_path, monkeypatch):
    run_sft_snippet(tmp_path, monkeypatch, steps=10)


@pytest.mark.parametrize("line", [0, 1])
def test_first_screen_commands_are_the_setup_and_the_test_command(line):
    commands = blocks("bash")["dynarank"].strip().splitlines()  # the block under the title
    assert len(commands) == 2
    assert commands[line].endswith("dynarank demo" if line == 0 else "python -m pytest")
    assert commands[0].startswith("pip install torch==2.13.0") if line == 0 else True
    ci = (README.parent / ".ci" / "run").read_text()
    assert "python -m pytest" in ci and "torch==2.13.0" in ci


def test_every_figure_the_readme_quotes_from_the_benchmarks_is_the_records():
    import sys

    sys.path.insert(0, str(README.parent / "benchmarks"))
    import claims

    text = README.read_text()
    section = text[text.index("## What the benchmarks show") : text.index("## Developers")]
    section = " ".join(section.split())  # the prose wraps lines anywhere
    figures = claims.figures()
    missing = {name: value for name, value in figures.items() if value not in section}
    assert len(figures) > 20 and not missing, f"README figures that differ from the records: {missing}"
