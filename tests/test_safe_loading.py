"""What dynarank loads from folders it is handed: never a pickle, exactly the safetensors file it checked, and weights
verified against the checksum recorded when dynarank wrote them."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import peft
import pytest
import torch
from peft import PeftModel

import dynarank
from dynarank import AdapterFormatError
from dynarank.cli import main
from dynarank.safe_load import UnsafeFolderError, load_peft_adapter
from dynarank.training.estimate import adapter_parameter_estimate
from dynarank.training.loop import TrainSpec, prepare_model
from dynarank.training.models import load_classifier
from test_cli import train_args, write_csv
from test_cli_inputs import refused
from tiny_models import tiny_bert, token_batch

LABELS = "negative,positive"


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """A stock LoRA run and a dynarank run (native adapter), with their training CSV ('data')."""
    root = tmp_path_factory.mktemp("runs")
    made = {"data": write_csv(root / "train_ok.csv", n=40)}
    for method in ("lora", "dynarank-lora"):
        argv = train_args(tiny_model_dir, made["data"], root / method, "--method", method)
        assert main([*argv, "--max-steps", "2", "--batch-size", "4"]) == 0
        made[method] = root / method
    return made


def _tripwire_pickle(path: Path) -> None:
    """A pickle that would record it was loaded (the `unpickled` fixture records torch.load calls anyway)."""
    torch.save({"base_model.model.classifier.weight": torch.zeros(2, 32)}, path)


def _bare_adapter(runs, tmp_path: Path, keep_info: bool = False) -> Path:
    """A copy of the LoRA run's PEFT adapter as anyone's adapter folder (without dynarank_run.json)."""
    adapter = shutil.copytree(runs["lora"] / "adapter", tmp_path / "adapter")
    if not keep_info:
        (adapter / "dynarank_run.json").unlink()
    return adapter


def _flip_a_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------- pickles are never read
def test_a_pickle_in_an_adapter_folder_with_a_decoy_safetensors_is_refused_unread(runs, tmp_path, capsys, unpickled):
    adapter = _bare_adapter(runs, tmp_path)
    (adapter / "adapter_model.safetensors").rename(adapter / "decoy.safetensors")
    _tripwire_pickle(adapter / "adapter_model.bin")
    err = refused(["eval", str(adapter), "--data", str(runs["data"]), "--labels", LABELS], capsys)
    assert "adapter_model.bin, a pickle, which dynarank never loads" in err
    assert unpickled == []


@pytest.mark.parametrize("name", ["adapter_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth"])
def test_a_pickle_beside_an_adapters_safetensors_weights_is_refused(runs, tmp_path, capsys, unpickled, name):
    adapter = _bare_adapter(runs, tmp_path)
    _tripwire_pickle(adapter / name)
    err = refused(["eval", str(adapter), "--data", str(runs["data"]), "--labels", LABELS], capsys)
    assert f"holds {name}, a pickle, beside its adapter_model.safetensors" in err
    assert unpickled == []


def test_a_pickle_beside_a_models_safetensors_weights_is_refused(tiny_model_dir, runs, tmp_path, capsys, unpickled):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    _tripwire_pickle(model / "pytorch_model.bin")
    err = refused(train_args(model, runs["data"], tmp_path / "run", "--method", "lora"), capsys)
    assert "pytorch_model.bin, a pickle, beside its model.safetensors" in err
    assert unpickled == [] and not (tmp_path / "run").exists()


def test_a_model_folder_whose_only_safetensors_is_a_decoy_is_refused(tiny_model_dir, runs, tmp_path, capsys):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (model / "model.safetensors").rename(model / "decoy.safetensors")
    err = refused(train_args(model, runs["data"], tmp_path / "run", "--method", "lora"), capsys)
    assert "holds no model.safetensors" in err


def test_an_adapter_is_loaded_from_its_safetensors_file_without_peft_s_loader(runs, tmp_path, monkeypatch, unpickled):
    def never(*args, **kwargs):
        raise AssertionError("PEFT's weight loader picks adapter_model.bin when it finds one")

    monkeypatch.setattr(peft.peft_model, "load_peft_weights", never)
    adapter = _bare_adapter(runs, tmp_path)
    assert main(["eval", str(adapter), "--data", str(runs["data"]), "--labels", LABELS]) == 0
    assert unpickled == []


def test_the_safe_loader_gives_the_logits_of_stock_peft(tiny_model_dir, runs):
    labels = LABELS.split(",")
    stock = PeftModel.from_pretrained(load_classifier(tiny_model_dir, labels)[0], runs["lora"] / "adapter").eval()
    ours = load_peft_adapter(load_classifier(tiny_model_dir, labels)[0], runs["lora"] / "adapter")
    assert type(ours) is type(stock) and not ours.training
    ids = token_batch()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, stock(input_ids=ids).logits)


# ---------------------------------------------------------------------------- damaged weights files
@pytest.mark.parametrize("damage", ["truncated", "symlink to a CSV file", "symlink to a directory"])
def test_a_damaged_peft_weights_file_is_one_line(runs, tmp_path, capsys, damage):
    adapter = _bare_adapter(runs, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()
        weights.symlink_to(runs["data"] if damage == "symlink to a CSV file" else tmp_path)
    err = refused(["eval", str(adapter), "--data", str(runs["data"]), "--labels", LABELS], capsys)
    assert "adapter_model.safetensors" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "method, weights",
    [("lora", "adapter/adapter_model.safetensors"), ("dynarank-lora", "dynarank_adapter/dynarank_adapter.safetensors")],
)
@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_bit_flip_in_a_runs_weights_is_refused(runs, tmp_path, capsys, method, weights, command):
    run = shutil.copytree(runs[method], tmp_path / "run")
    _flip_a_byte(run / weights)
    argv = [
        command,
        str(run),
        *(["--data", str(runs["data"])] if command == "eval" else ["--out", str(tmp_path / "x")]),
    ]
    err = refused(argv, capsys)
    assert f"{Path(weights).name} does not match its recorded checksum" in err
    assert not (tmp_path / "x").exists()


def test_a_bit_flip_in_a_bare_adapter_that_records_its_checksum_is_refused(runs, tmp_path, capsys):
    adapter = _bare_adapter(runs, tmp_path, keep_info=True)
    _flip_a_byte(adapter / "adapter_model.safetensors")
    assert "does not match its recorded checksum" in refused(
        ["eval", str(adapter), "--data", str(runs["data"])], capsys
    )


# ---------------------------------------------------------------------------- damaged adapter configurations
# Fields of the right JSON shape but the wrong type or value, which PEFT checks only while it builds the layers
# (a TypeError or AttributeError from deep inside) or never: edit -> what the one line names.
DAMAGED_CONFIGS = {
    "r as text, nothing else": (lambda c: {"peft_type": "LORA", "r": "x"}, "its r is 'x', not a positive integer"),
    "rank_pattern a list": (lambda c: {**c, "rank_pattern": [1, 2]}, "its rank_pattern is [1, 2], not an object"),
    "rank_pattern with a text rank": (
        lambda c: {**c, "rank_pattern": {"query": "y"}},
        "its rank_pattern['query'] is 'y', not a positive integer",
    ),
    "target_modules a number": (lambda c: {**c, "target_modules": 5}, "its target_modules is 5, not a pattern"),
    "lora_dropout as text": (lambda c: {**c, "lora_dropout": "x"}, "its lora_dropout is 'x', not a number from 0 to 1"),
    "another PEFT method's type": (
        lambda c: {**c, "peft_type": "PREFIX_TUNING"},
        "adapter_config.json: PEFT cannot build this adapter on",
    ),
}


@pytest.mark.parametrize("damage", DAMAGED_CONFIGS)
def test_a_damaged_adapter_config_is_one_line_naming_the_file_and_field(tiny_model_dir, runs, tmp_path, capsys, damage):
    edit, named = DAMAGED_CONFIGS[damage]
    adapter = _bare_adapter(runs, tmp_path)
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps(edit(json.loads(config.read_text()))))
    err = refused(["eval", str(adapter), "--data", str(runs["data"]), "--labels", LABELS], capsys)
    assert str(config) in err and named in err and "Traceback" not in err
    with pytest.raises(AdapterFormatError, match=re.escape(named)):  # the library's own error for Python callers
        load_peft_adapter(load_classifier(tiny_model_dir, LABELS.split(","))[0], adapter)


def _native(tmp_path: Path) -> Path:
    model = tiny_bert()
    dynarank.attach(model, dynarank.DynaRankConfig(r=2, target_modules=["query", "value"]))
    return dynarank.save_adapter(model, tmp_path / "native")


@pytest.mark.parametrize("name", ["adapter_model.bin", "dynarank_adapter.pt", "rng_state.pth"])
def test_a_pickle_beside_a_native_adapters_weights_is_refused_unread(tmp_path, unpickled, name):
    path = _native(tmp_path)
    _tripwire_pickle(path / name)
    with pytest.raises(UnsafeFolderError, match=f"holds {re.escape(name)}, a pickle, beside its dynarank_adapter"):
        dynarank.load_adapter(tiny_bert(), path)
    assert unpickled == []


def test_a_native_adapter_whose_weights_are_a_pickle_is_refused_naming_it(tmp_path, unpickled):
    path = _native(tmp_path)
    (path / "dynarank_adapter.safetensors").unlink()
    _tripwire_pickle(path / "dynarank_adapter.bin")
    with pytest.raises(
        UnsafeFolderError, match="weights as dynarank_adapter.bin, a pickle, which dynarank never loads"
    ):
        dynarank.load_adapter(tiny_bert(), path)
    assert unpickled == []


@pytest.mark.parametrize("command", ["eval", "export"])
def test_a_pickle_in_a_runs_native_adapter_is_refused(runs, tmp_path, capsys, unpickled, command):
    run = shutil.copytree(runs["dynarank-lora"], tmp_path / "run")
    _tripwire_pickle(run / "dynarank_adapter" / "adapter_model.bin")
    argv = [
        command,
        str(run),
        *(["--data", str(runs["data"])] if command == "eval" else ["--out", str(tmp_path / "x")]),
    ]
    assert "adapter_model.bin, a pickle, beside its dynarank_adapter.safetensors" in refused(argv, capsys)
    assert unpickled == [] and not (tmp_path / "x").exists()


def test_a_native_adapter_records_the_checksums_of_its_weights_and_layout(tmp_path):
    import hashlib

    path = _native(tmp_path)
    layout = json.loads((path / "dynarank_adapter.json").read_text())
    weights = (path / "dynarank_adapter.safetensors").read_bytes()
    assert layout["weights_sha256"] == hashlib.sha256(weights).hexdigest() and len(layout["layout_sha256"]) == 64
    _flip_a_byte(path / "dynarank_adapter.safetensors")
    with pytest.raises(AdapterFormatError, match="does not match its recorded checksum"):
        dynarank.load_adapter(tiny_bert(), path)


def test_an_edited_native_layout_is_refused(tmp_path):
    path = _native(tmp_path)
    layout = json.loads((path / "dynarank_adapter.json").read_text())
    layout["layers"][next(iter(layout["layers"]))]["scaling"] *= 2  # a plausible value: only the checksum tells
    (path / "dynarank_adapter.json").write_text(json.dumps(layout))
    with pytest.raises(AdapterFormatError, match="dynarank_adapter.json does not match its checksum"):
        dynarank.load_adapter(tiny_bert(), path)


def test_a_native_adapter_saved_before_checksums_loads_with_a_warning(tmp_path, caplog):
    path = _native(tmp_path)
    layout = json.loads((path / "dynarank_adapter.json").read_text())
    for key in ("weights_sha256", "layout_sha256"):
        del layout[key]
    (path / "dynarank_adapter.json").write_text(json.dumps(layout))
    with caplog.at_level(logging.WARNING):
        dynarank.load_adapter(tiny_bert(), path)
    assert "records no checksum" in caplog.text


# ---------------------------------------------------------------------------- the size of an adapter, up front
@pytest.mark.parametrize(
    "method, knobs",
    [
        ("lora", {}),
        ("dora", {}),
        ("adalora", {}),
        ("ard", {}),
        ("ard", {"head_layout": "shared"}),
        ("ard", {"granularity": "matrix"}),
        ("dynarank-lora", {}),
        ("elalora", {}),
        ("adalora-physical", {}),
    ],
)
def test_the_adapter_size_is_known_before_it_is_allocated(method, knobs):
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    spec = TrainSpec(method=method, r=4, target_modules=targets, max_steps=20, dynarank=knobs)
    estimate = adapter_parameter_estimate(tiny_bert(), spec)
    model, _ = prepare_model(tiny_bert(), spec, total_steps=20)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) - head
    assert estimate == trainable


def test_an_adapter_larger_than_the_memory_is_refused_before_it_is_allocated(
    tiny_model_dir, runs, tmp_path, capsys, monkeypatch
):
    import dynarank.training.estimate as estimate

    monkeypatch.setattr(estimate, "memory_limit_bytes", lambda: 10**6)  # a machine with 1 MB
    argv = train_args(tiny_model_dir, runs["data"], tmp_path / "run", "--method", "lora", "--r", "100")
    err = refused(argv, capsys)  # 100 x 896 (d_in + d_out of the 12 targets) parameters, 16 bytes each
    assert "--r: 100 with method 'lora' needs about 1.4 MB for the adapter alone (89,600 parameters" in err
    assert "more than this machine's 1.0 MB of memory: lower it, or adapt fewer modules" in err
    assert not (tmp_path / "run").exists()
