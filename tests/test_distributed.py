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
    # The logged loss is the global batch's (worker 0 logged its own shard's), the last uneven batch (2 + 1) included
    logs = [[json.loads(line) for line in (setup / d / "metrics.jsonl").open()] for d in ("ddp", "single")]
    losses = [[row["loss"] for row in log if "loss" in row] for log in logs]
    assert len(losses[0]) == len(losses[1]) == 16
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), atol=1e-5, rtol=0)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
@pytest.mark.parametrize(
    "case, extra, expected",
    [
        # worker 0 refused it while worker 1 waited for the path, and died in gloo with a traceback
        ("existing --out", ["--out", "{root}"], "already exists"),
        # 51 rows in batches of 10: an epoch's last batch holds 1 example, and worker 1 crashed on its empty shard
        # (long: its rule is checked in one process by test_the_smallest_global_batch_is_an_epochs_last_when_reached)
        pytest.param(
            "a global batch of one",
            ["--batch-size", "10", "--max-steps", "12"],
            "holds 1 example(s)",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_input_under_torchrun_is_one_line_on_every_worker(setup, case, extra, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = ["--out", str(setup / f"refused-{len(case)}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "dynarank.cli"]
    cmd += [*argv(setup, "unused"), *out, *(x.format(root=setup) for x in extra)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "dynarank train: error:" in line]
    assert len(errors) == 2 and all(expected in line for line in errors), done.stderr[-3000:]
    assert not [line for line in done.stderr.splitlines() if line.startswith("[rank") and "Traceback" in line]
    assert not (setup / "refused-14").exists() and not (setup / "refused-20").exists()  # nothing left behind


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


def torchrun(script: str, *args: str) -> dict:
    """Run a worker script of tests/ on two gloo workers; the RESULT json worker 0 prints."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = here + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", os.path.join(here, script), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])


def biggest_difference(a: dict[str, list[float]], b: dict[str, list[float]]) -> float:
    assert a.keys() == b.keys()
    return max(max((abs(x - y) for x, y in zip(a[k], b[k])), default=0.0) for k in a)


needs_torchrun = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")


@needs_torchrun
@pytest.mark.parametrize("method", ["ard", "elalora"])
def test_a_trainer_under_torchrun_takes_the_single_process_rank_decisions_at_every_resize(tmp_path, method):
    # The Trainer's DDP wrapper is built once; resizes create new adapter tensors that it does not know,
    # whose gradients the callback averages itself. Without that, the workers' adapters drift apart.
    import trainer_ddp_worker

    first, second = torchrun("trainer_ddp_worker.py", str(tmp_path / "ddp"), method)["workers"]
    assert first["resizes"] >= 2
    assert first["history"] == second["history"]  # the same ranks on both workers at every resize
    assert first["sums"] == second["sums"]  # the same bits: every gradient is all-reduced before it is used
    single = trainer_ddp_worker.train(str(tmp_path / "single"), method, batch_size=8)  # the same global batch
    assert first["history"] == single["history"]
    # The function agrees to float32 rounding (measured: 4.5e-8 ARD, 3.0e-8 ElaLoRA).
    assert biggest_difference({"": first["logits"]}, {"": single["logits"]}) < 1e-6


@needs_torchrun
def test_a_nan_on_one_worker_at_a_resize_step_skips_it_everywhere_and_keeps_the_workers_together():
    # Step 5 is an AdaLoRA pruning step: the skipped step still resizes, so the DDP wrapper must be rebuilt
    # there too (a stale one leaves the new tensors' gradients per worker: 1.5e-4 apart at the end).
    import loop_ddp_worker

    first, second = torchrun("loop_ddp_worker.py", "adalora-physical", "5")["workers"]
    assert first["skipped"] == second["skipped"] == 1 and 5 in first["resized"]
    assert first["history"] == second["history"]
    assert biggest_difference(first["tensors"], second["tensors"]) == 0.0  # the all-reduce gives both the same bits
    single = loop_ddp_worker.run("adalora-physical", nan_step=5, nan_worker=0)
    assert first["history"] == [list(h) for h in single["history"]]
    assert biggest_difference(first["tensors"], single["tensors"]) < 1e-5  # measured 1.0e-7


@needs_torchrun
def test_elalora_on_two_workers_takes_the_single_process_decisions_and_computes_the_same_function():
    import loop_ddp_worker

    first, second = torchrun("loop_ddp_worker.py", "elalora", "0")["workers"]
    assert first["history"] == second["history"] and biggest_difference(first["tensors"], second["tensors"]) == 0.0
    single = loop_ddp_worker.run("elalora")
    assert len(single["resized"]) >= 20  # a prune-and-grow round at every step from 9 to 32
    assert first["history"] == [list(h) for h in single["history"]]
    # Same rank decisions, same function: logits to float32 rounding (measured 2e-8), each adapter's
    # scaling * B diag(E) A to 1e-4 (measured 2.4e-5). The factors themselves may differ by up to
    # ~lr/3 (3.3e-3 measured) in a rank grown late: it starts exactly orthogonal to its group with
    # E = 1e-13, so its first gradients are float rounding of the orthogonality penalty, and AdamW,
    # being scale-free, turns that rounding (which the all-reduce's summation order changes) into
    # steps of ~lr/10 whose direction is noise. Its E is still small, hence the small delta.
    assert biggest_difference({"": first["logits"]}, {"": single["logits"]}) < 1e-6
    assert biggest_difference(first["deltas"], single["deltas"]) < 1e-4


@needs_torchrun
def test_lr_auto_on_two_workers_chooses_one_rate_everywhere_the_one_a_single_process_chooses():
    import loop_ddp_worker

    first, second = torchrun("loop_ddp_worker.py", "ard-auto", "0")["workers"]
    assert first["lr_search"] == {**second["lr_search"], "seconds": first["lr_search"]["seconds"]}
    assert first["history"] == second["history"] and biggest_difference(first["tensors"], second["tensors"]) == 0.0
    single = loop_ddp_worker.run("ard-auto")["lr_search"]
    assert first["lr_search"]["chosen"] == single["chosen"]
    assert first["lr_search"]["held_out_loss"] == pytest.approx(single["held_out_loss"], rel=1e-4)


def test_fsdp_and_deepspeed_launches_are_refused_with_a_clear_message(setup, monkeypatch, capsys):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main(argv(setup, "fsdp")) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed ZeRO shard them into buffers that a resize cannot edit" in err and "--fsdp" in err


# ---------------------------------------------------------------- the Trainer path's sync of resized tensors


def _same_place_as(freed: int, make):
    """A new object from ``make()`` that the allocator put where the freed object ``freed`` (an id) lived,
    or None if it never did so in 1000 tries."""
    return next((obj for obj in (make() for _ in range(1000)) if id(obj) == freed), None)


def test_a_tensor_a_resize_creates_is_unknown_to_the_wrapper_even_where_a_freed_known_one_lived():
    from torch import nn

    from dynarank.distributed import ResizedGradientSync

    model = nn.Sequential(nn.Linear(4, 4))
    sync = ResizedGradientSync(model)
    freed = id(model[0].weight)
    model[0].weight = nn.Parameter(torch.zeros(4, 4))  # a resize: the tensor the wrapper knew is released
    newcomer = _same_place_as(freed, lambda: nn.Parameter(torch.zeros(4, 4)))
    if newcomer is None:
        pytest.skip("the allocator never reused the freed tensor's memory")
    model[0].bias = newcomer  # another resize, whose new tensor took the freed one's memory
    assert [p is newcomer or p is model[0].weight for p in sync.unknown()] == [True, True]


def test_the_model_is_walked_for_resized_tensors_only_when_the_layout_changed(monkeypatch):
    from torch import nn

    from dynarank.distributed import ResizedGradientSync

    model, layout = nn.Sequential(nn.Linear(4, 4)), {"version": 0}
    sync = ResizedGradientSync(model, layout_version=lambda: layout["version"])
    walks, parameters = [], model.parameters
    monkeypatch.setattr(model, "parameters", lambda *a, **k: walks.append(1) or parameters(*a, **k))
    for _ in range(5):
        assert sync.unknown() == []
    assert len(walks) == 1
    model[0].weight = nn.Parameter(torch.zeros(4, 4))
    layout["version"] += 1  # what the controller reports at a resize
    for _ in range(5):
        assert [p is model[0].weight for p in sync.unknown()] == [True]
    assert len(walks) == 2


@pytest.mark.parametrize(
    ("n_examples", "batch_size", "total_steps", "smallest"),
    [
        (51, 10, 12, 1),  # 6 batches an epoch, the sixth holds 1, reached
        (51, 10, 5, 10),  # the run ends before the epoch's last batch
        (50, 10, 12, 10),  # no remainder
        (3, 8, 4, 3),  # a batch larger than the data: every batch holds all of it
    ],
)
def test_the_smallest_global_batch_is_an_epochs_last_when_reached(n_examples, batch_size, total_steps, smallest):
    """The rule behind refusing a run whose global batch would leave a worker an empty shard."""
    from dynarank.training.loop import smallest_global_batch

    assert smallest_global_batch(n_examples, batch_size, total_steps) == smallest
