"""Stock EVA (--method eva) refuses training batches too small for its PCA instead of cycling them forever."""

from __future__ import annotations

import pytest
import torch

from dynarank.config import ConfigError
from dynarank.training.methods import _check_eva_rows, build_baseline, data_init_baseline
from tiny_models import tiny_bert


def _eva_model(r: int = 4):
    return build_baseline(tiny_bert(), "eva", r, "all-linear", total_steps=10, knobs={})


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
