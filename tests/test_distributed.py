"""Multi-process training: two gloo workers take the same rank decisions as one process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dynarank.cli import main
from tiny_models import save_tiny_model_dir

TRAIN = [
    "train",
    "--model",
    "{model}",
    "--data",
    "{data}",
    "--out",
    "{out}",
    "--method",
    "ard",
    "--max-steps",
    "16",
    "--batch-size",
    "8",
    "--r0",
    "2",
    "--max-length",
    "16",
    "--lr",
    "1e-2",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # No dropout: each worker would draw its own masks, so only the math, not the noise, can match.
    save_tiny_model_dir(root / "model", dropout=False)
    with (root / "data.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(64):  # 51 training rows: the last batch of 3 splits unevenly (2 + 1)
            writer.writerow([f"this is {'great' if i % 2 else 'awful'} number {i}", "pos" if i % 2 else "neg"])
    return root


def argv(root, out):
    return [a.format(model=root / "model", data=root / "data.csv", out=root / out) for a in TRAIN]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_two_gloo_workers_match_a_single_process_run(setup):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "-m",
        "dynarank.cli",
        *argv(setup, "ddp"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert main(argv(setup, "single")) == 0
    ddp, single = (json.loads((setup / d / "summary.json").read_text()) for d in ("ddp", "single"))
    # Every worker checks at each resize that all workers hold the same ranks (it raises otherwise);
    # here the two-worker run also ends with the single-process ranks.
    assert ddp["final_ranks"] == single["final_ranks"]
    a, b = (load_file(setup / d / "adapter" / "adapter_model.safetensors") for d in ("ddp", "single"))
    assert a.keys() == b.keys()
    for key in a:  # documented tolerance: float summation order differs across the all-reduce
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_accelerate_launch_runs_the_cli_on_two_workers_with_the_single_process_ranks(setup):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "dynarank.cli",
        *argv(setup, "accelerate"),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    if not (setup / "single" / "summary.json").is_file():
        assert main(argv(setup, "single")) == 0
    launched, single = (json.loads((setup / d / "summary.json").read_text()) for d in ("accelerate", "single"))
    assert launched["final_ranks"] == single["final_ranks"]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
@pytest.mark.parametrize("method", ["ard", "elalora"])
def test_a_trainer_under_torchrun_keeps_every_worker_identical_across_resizes(tmp_path, method):
    # The Trainer's DDP wrapper is built once; resizes create new adapter tensors that it does not know,
    # whose gradients the callback averages itself. Without that, the workers' adapters drift apart.
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        os.path.join(here, "trainer_ddp_worker.py"),
    ]
    done = subprocess.run([*cmd, str(tmp_path), method], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["resizes"] >= 2
    first, second = result["workers"]
    assert first["ranks"] == second["ranks"]
    for name, value in first["sums"].items():
        assert value == pytest.approx(second["sums"][name], abs=1e-6), name


def test_fsdp_and_deepspeed_launches_are_refused_with_a_clear_message(setup, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main(argv(setup, "fsdp")) == 2
    assert "FSDP and DeepSpeed ZeRO shard parameters" in capsys.readouterr().err
