"""Stock EVA (--method eva) refuses training batches too small for its PCA instead of cycling them forever."""

from __future__ import annotations

import pytest
import torch

from dynarank.config import ConfigError
from dynarank.training.loop import BERT_ENCODER_LINEAR
from dynarank.training.methods import _check_eva_rows, build_baseline, data_init_baseline
from tiny_models import tiny_bert


def _eva_model(r: int = 4, targets: str = BERT_ENCODER_LINEAR):
    """Tiny BERT under stock EVA: by default its encoder's modules, each reading a row per token."""
    return build_baseline(tiny_bert(), "eva", r, targets, total_steps=10, knobs={})


def _batch(examples: int, length: int, counted: int) -> dict:
    """``examples`` rows of ``length`` token ids, the first ``counted`` of each row unmasked."""
    mask = torch.zeros(examples, length, dtype=torch.long)
    mask[:, :counted] = 1
    return {
        "input_ids": torch.randint(5, 50, (examples, length)),
        "attention_mask": mask,
    }


def test_batches_with_fewer_token_rows_than_evas_components_are_refused_naming_what_to_change():
    model = _eva_model(r=4)  # EVA fits rho x r = 8 components per module
    with pytest.raises(
        ConfigError, match="needs a batch of at least 8 token rows .* largest training batch gives 6"
    ) as info:
        data_init_baseline(model, "eva", [_batch(2, 8, counted=3)] * 3)  # padding is not counted: 2 x 3 rows
    assert info.value.fields == ("batch_size", "max_length", "r") and "lower r to 3" in str(info.value)


def test_one_batch_with_enough_token_rows_is_enough():
    model = _eva_model(r=4)
    _check_eva_rows(model, [_batch(2, 8, counted=3), _batch(2, 8, counted=4)])  # 8 rows in the second


def test_the_cli_refuses_such_a_run_in_one_line_and_leaves_no_run_folder(tiny_model_dir, tmp_path, capsys):
    from test_cli import train_args, write_csv
    from test_cli_inputs import refused

    data = write_csv(tmp_path / "data.csv")
    argv = train_args(tiny_model_dir, data, tmp_path / "run", "--method", "eva", "--r", "8")
    err = refused([*argv, "--batch-size", "2", "--max-length", "4", "--max-steps", "2"], capsys)
    assert "--batch-size / --max-length / --r: stock EVA needs a batch of at least 16 token rows" in err
    assert not (tmp_path / "run").exists()


def test_a_module_reading_one_row_per_example_is_refused_when_no_batch_has_evas_components_of_examples():
    """BERT's pooler reads the [CLS] row of each example: 2 examples give its PCA 2 rows, though they give each
    encoder module 16 token rows. PEFT skips the pooler's PCA on every batch and cycles the batches forever."""
    model = _eva_model(r=4, targets="all-linear")  # rho x r = 8 components per module
    with pytest.raises(ConfigError) as info:
        _check_eva_rows(model, [_batch(2, 8, counted=8)] * 3)
    assert info.value.fields == ("batch_size", "r", "target_modules")
    assert info.value.problem == (
        "stock EVA's PCA at bert.pooler.dense reads one row per example (not per token) and needs at least 8 (2 x r, "
        "r = 4: its components); the largest training batch gives it 2: raise the batch size to 8, lower r to 1, or "
        "leave that module out of the target modules."
    )


@pytest.mark.parametrize(
    ("targets", "examples", "counted"),
    [
        ("all-linear", 8, 1),  # the pooler's 8 rows, and 8 token rows for the encoder's modules
        (BERT_ENCODER_LINEAR, 2, 4),  # no pooler: the 8 token rows are enough
    ],
)
def test_a_batch_giving_every_module_evas_components_of_rows_is_enough(targets, examples, counted):
    _check_eva_rows(_eva_model(r=4, targets=targets), [_batch(2, 8, counted=1), _batch(examples, 8, counted)])


def _check_on_a_shard(rank: int, store: str, results) -> None:
    """One of two gloo workers: EVA's row check on this worker's shards of two runs, 4 and 2 examples per step."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        model = _eva_model(r=4, targets="all-linear")
        for examples in (4, 2):
            try:
                _check_eva_rows(model, [_batch(examples, 8, counted=8)] * 3)
                results.put((rank, examples, "accepted"))
            except Exception as exc:  # reported to the test, which names it
                results.put((rank, examples, str(exc)))
    finally:
        dist.destroy_process_group()


def test_under_torchrun_a_per_example_modules_rows_are_the_global_batchs_examples(tmp_path):
    """PEFT gathers every worker's pooler rows of a step: 2 x 4 examples give its PCA 8 rows, enough; 2 x 2 give 4."""
    import torch.multiprocessing as mp

    context = mp.get_context("fork")
    results = context.Queue()
    mp.start_processes(_check_on_a_shard, args=(str(tmp_path / "store"), results), nprocs=2, start_method="fork")
    outcomes = {(rank, examples): outcome for rank, examples, outcome in (results.get(timeout=60) for _ in range(4))}
    refused = "the largest global training batch (its shards on 2 workers) gives it 4: raise the batch size to 8"
    assert [outcomes[rank, 4] for rank in (0, 1)] == ["accepted", "accepted"]
    assert all(refused in outcomes[rank, 2] for rank in (0, 1)), outcomes


def _eva_on_a_shard(rank: int, store: str, results) -> None:
    """One of two gloo workers: stock EVA on this worker's shards (one example of 5 counted tokens per step)."""
    from datetime import timedelta

    import torch.distributed as dist

    # a worker that refused alone would leave the other waiting in a collective: a minute, then an error
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        torch.manual_seed(rank)
        model = build_baseline(tiny_bert(), "eva", 4, BERT_ENCODER_LINEAR, total_steps=10, knobs={})
        data_init_baseline(model, "eva", [_batch(1, 8, counted=5)] * 3)
        results.put((rank, "initialised"))
    except Exception as exc:  # reported to the test, which names it
        results.put((rank, f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def test_under_torchrun_evas_batch_check_counts_the_global_batch_whose_shards_peft_gathers(tmp_path):
    """Each worker's shard gives 5 token rows, fewer than EVA's 8 components, but PEFT's PCA gathers every worker's
    inputs of a step: 10 rows, enough. The check counted one worker's shard and refused the run."""
    import torch.multiprocessing as mp

    context = mp.get_context("fork")
    results = context.Queue()
    mp.start_processes(
        _eva_on_a_shard, args=(str(tmp_path / "store"), results), nprocs=2, start_method="fork", join=True
    )
    assert dict(results.get(timeout=60) for _ in range(2)) == {0: "initialised", 1: "initialised"}
