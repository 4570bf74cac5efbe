"""The stock PEFT baselines refuse a rank their adapted matrices cannot hold, as dynarank's own methods do."""

from __future__ import annotations

import pytest
from peft.tuners.lora import LoraLayer

from dynarank.config import ConfigError
from dynarank.training.loop import BERT_ENCODER_LINEAR
from dynarank.training.methods import build_baseline
from tiny_models import tiny_bert

# The tiny encoder's query is a 32 x 32 matrix, the smallest it adapts: a rank of 32 at most; stock AdaLoRA starts
# at 1.5 r (r = 21: 32 ranks), stock EVA's PCA takes 2 r components of the query's 32 input features (r = 16).
LARGEST_R = {"lora": 32, "dora": 32, "adalora": 21, "eva": 16}


@pytest.mark.parametrize("method", LARGEST_R)
def test_a_start_rank_above_what_a_matrix_holds_is_refused_naming_its_shape_and_the_largest_r(method):
    """PEFT built the larger factors without a word: ranks past min(d_in, d_out) add parameters and nothing else."""
    model = tiny_bert()
    r = LARGEST_R[method] + 1
    with pytest.raises(ConfigError, match=r"the matrix there is 32 x 32, so its rank cannot exceed 32") as info:
        build_baseline(model, method, r, BERT_ENCODER_LINEAR, total_steps=20, knobs={})
    assert info.value.fields == ("r",) and "attention.self.query" in str(info.value)
    if method in ("adalora", "eva"):
        assert f"Lower it to {LARGEST_R[method]} at most." in str(info.value)
    # the model is left as it came: no adapter, every weight still trains
    assert not any(isinstance(m, LoraLayer) for m in model.modules()) and not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("method", LARGEST_R)
def test_the_largest_r_a_matrix_holds_is_accepted(method):
    wrapped = build_baseline(tiny_bert(), method, LARGEST_R[method], BERT_ENCODER_LINEAR, total_steps=20, knobs={})
    assert any(isinstance(m, LoraLayer) for m in wrapped.modules())


def test_the_cli_refuses_such_a_rank_in_one_line_and_leaves_no_run_folder(tiny_model_dir, tmp_path, capsys):
    from test_cli import train_args, write_csv
    from test_cli_inputs import refused

    data = write_csv(tmp_path / "data.csv")
    err = refused(train_args(tiny_model_dir, data, tmp_path / "run", "--method", "lora", "--r", "33"), capsys)
    assert "--r: 33 is larger than the model can use at" in err and "so its rank cannot exceed 32" in err
    assert not (tmp_path / "run").exists()
