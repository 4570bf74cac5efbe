"""A model's state dict says what its adapters are: any loader (a Trainer resuming, load_best_model_at_end,
plain load_state_dict) gives the layers the saved layout first, and folds in a gate the run has dropped since."""

from __future__ import annotations

import pytest
import torch

import dynarank
from dynarank import DynaRankConfig, elastic_layers
from tiny_models import tiny_bert, token_batch

TARGETS = ["query", "key", "value", "dense"]


def _run(method: str, steps: int, total: int, **options):
    """A tiny BERT trained ``steps`` of a ``total``-step rank-changing run."""
    model = tiny_bert()
    dynarank.attach(model, DynaRankConfig(method=method, r=4, target_modules=TARGETS, seed=0, **options))
    ctrl = dynarank.build_controller(model, total_steps=total)
    opt = ctrl.build_optimizer(lr=1e-2)
    ids, labels = token_batch(batch=8), torch.tensor([0, 1] * 4)
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model, ctrl, opt


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=token_batch(batch=8)).logits


OPTIONS = {"ard": {"ard_lambda": 30.0}, "elalora": {"target_rank": 2}, "adalora-physical": {}}


@pytest.mark.parametrize("method", list(OPTIONS))
def test_a_resized_models_state_dict_loads_into_a_freshly_attached_one_with_the_same_function(method):
    trained, _, _ = _run(method, 60, 60, **OPTIONS[method])
    assert any(len(set(layer.ranks)) > 1 or layer.ranks[0] != 4 for layer in elastic_layers(trained).values())
    fresh = tiny_bert()
    dynarank.attach(fresh, DynaRankConfig(method=method, r=4, target_modules=TARGETS, seed=1, **OPTIONS[method]))
    dynarank.prepare_parameters(fresh)
    state = trained.state_dict()
    fresh.load_state_dict(state, strict=False)
    assert {n: layer.slots for n, layer in elastic_layers(fresh).items()} == {
        n: layer.slots for n, layer in elastic_layers(trained).items()
    }
    torch.testing.assert_close(_logits(fresh), _logits(trained))


@pytest.mark.parametrize("method", list(OPTIONS))
def test_weights_saved_while_the_gate_was_on_load_into_a_model_that_dropped_it_with_the_saved_function(method):
    """What load_best_model_at_end does: the best checkpoint is mid-run, the model has finished its run."""
    model, ctrl, opt = _run(method, 30, 60, **OPTIONS[method])
    assert any(layer.gate() is not None for layer in elastic_layers(model).values())  # mid-run: gated
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _logits(model)
    model.train()
    ids, labels = token_batch(batch=8), torch.tensor([0, 1] * 4)
    for _ in range(30):  # to the end of the run: ARD drops its mask, the SVD methods fold E and drop it
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    ctrl.finish()
    assert all(layer.gate() is None for layer in elastic_layers(model).values())
    model.load_state_dict(saved, strict=False)
    torch.testing.assert_close(_logits(model), expected)


def test_a_state_dict_for_another_grouping_is_refused_naming_the_layer():
    per_head = tiny_bert()
    dynarank.attach(per_head, DynaRankConfig(r=2, target_modules=["query"]))
    per_matrix = tiny_bert()
    dynarank.attach(per_matrix, DynaRankConfig(r=2, target_modules=["query"], granularity="matrix"))
    with pytest.raises(RuntimeError, match=r"query\.slot_layout: the saved adapter has 1 rank groups, this layer 4"):
        per_head.load_state_dict(per_matrix.state_dict())
