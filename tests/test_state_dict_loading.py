"""A model's state dict says what its adapters are: any loader (a Trainer resuming, load_best_model_at_end,
plain load_state_dict) gives the layers the saved layout first, and folds in a gate the run has dropped since."""

from __future__ import annotations

import pytest
import torch

import dynarank
from dynarank import DynaRankConfig, elastic_layers
from tiny_models import randomize_adapters, tiny_bert, token_batch

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


def _mid_run(method: str):
    """(the state dict, the logits) of a run halfway: its adapters compute with the controller's gate."""
    model, _, _ = _run(method, 30, 60, **OPTIONS[method])
    layers = elastic_layers(model).values()
    assert any(not torch.equal(layer.gated_group_weight(), layer.group_weight) for layer in layers)  # the gate counts
    return {k: v.clone() for k, v in model.state_dict().items()}, _logits(model)


def _attached(method: str):
    model = tiny_bert()
    return dynarank.attach(model, DynaRankConfig(method=method, r=4, target_modules=TARGETS, seed=1, **OPTIONS[method]))


@pytest.mark.parametrize("method", list(OPTIONS))
def test_weights_saved_while_the_gate_was_on_are_refused_by_a_model_with_no_place_for_the_gate(method):
    """strict=False dropped ARD's alphas or E without a word, and the loaded adapters computed something else."""
    saved, _ = _mid_run(method)
    fresh = _attached(method)
    before = {n: [p.clone() for p in layer.factors()] for n, layer in elastic_layers(fresh).items()}
    with pytest.raises(RuntimeError, match=r"no place for them.*save_adapter.*checkpoint.*build_controller") as caught:
        fresh.load_state_dict(saved, strict=False)
    assert str(caught.value).count("no place for them") == 1  # one error, not one per layer
    for name, layer in elastic_layers(fresh).items():  # the adapters are left as they were
        assert all(torch.equal(p, q) for p, q in zip(layer.factors(), before[name]))


@pytest.mark.parametrize("method", list(OPTIONS))
def test_weights_saved_while_the_gate_was_on_load_with_their_function_into_a_model_whose_controller_comes_later(method):
    """What a Trainer resuming does: prepare_parameters (DynaRankCallback), the load, then the controller. The gate
    was loaded into E or the alphas, but the layers applied none until the controller was built."""
    saved, expected = _mid_run(method)
    fresh = _attached(method)
    dynarank.prepare_parameters(fresh)
    fresh.load_state_dict(saved, strict=False)
    torch.testing.assert_close(_logits(fresh), expected)
    dynarank.build_controller(fresh, total_steps=60, restoring=True)  # sets the same gate
    torch.testing.assert_close(_logits(fresh), expected)


def test_a_state_dict_for_another_grouping_is_refused_naming_the_layer():
    per_head = tiny_bert()
    dynarank.attach(per_head, DynaRankConfig(r=2, target_modules=["query"]))
    per_matrix = tiny_bert()
    dynarank.attach(per_matrix, DynaRankConfig(r=2, target_modules=["query"], granularity="matrix"))
    with pytest.raises(RuntimeError, match=r"query\.slot_layout: the saved adapter has 1 rank groups, this layer 4"):
        per_head.load_state_dict(per_matrix.state_dict())


def _built_on_the_meta_device(method: str, **options):
    """A tiny BERT made on the meta device (no memory, no values) and attached there: how a large model is set up
    before its weights are read (or before a sharded run fills them)."""
    from transformers import BertConfig, BertForSequenceClassification

    from tiny_models import TINY_ENCODER

    with torch.device("meta"):
        model = BertForSequenceClassification(BertConfig(**TINY_ENCODER, num_labels=2))
    dynarank.attach(model, DynaRankConfig(method=method, r=4, target_modules=TARGETS, seed=1, **options))
    assert all(layer.shared_weight.is_meta for layer in elastic_layers(model).values())
    return model.eval()


def _take_transformers_buffers(model, real) -> None:
    """BERT's own unsaved buffers (position and token type ids), which no state dict carries, from a real model."""
    saved = real.state_dict().keys()
    for name, buffer in real.named_buffers():
        if name not in saved and not name.endswith(("slot_index", "column_index")):
            module, _, leaf = name.rpartition(".")
            model.get_submodule(module)._buffers[leaf] = buffer.clone()


@pytest.mark.parametrize("method, options", [("ard", OPTIONS["ard"]), ("dynarank-lora", {"head_layout": "shared"})])
@pytest.mark.parametrize("assign", [True, False])
def test_a_model_built_on_the_meta_device_takes_a_saved_state_with_its_function_and_export(method, options, assign):
    """Loaded with ``assign=True`` (the tensors are taken as they are) or after ``to_empty()`` (uninitialised
    memory, then copied into): the layers' gather indices, which no state dict holds, are made again from the loaded
    layout. Before, they stayed on the meta device or held whatever the memory held: the forward pass failed, or ran
    while the exported B read garbage."""
    if method == "ard":
        trained, _, _ = _run(method, 60, 60, **options)  # uneven ranks: the saved layout differs from the start's
    else:
        trained = dynarank.attach(tiny_bert(), DynaRankConfig(method=method, r=4, target_modules=TARGETS, **options))
        randomize_adapters(trained)
    model = _built_on_the_meta_device(method, **options)
    if method == "ard":
        dynarank.prepare_parameters(model)
    if not assign:
        model.to_empty(device="cpu")
    model.load_state_dict(trained.state_dict(), assign=assign)
    _take_transformers_buffers(model, trained)
    torch.testing.assert_close(_logits(model), _logits(trained), rtol=0, atol=0)
    for name, layer in elastic_layers(model).items():
        for ours, theirs in zip(layer.lora_factors(), elastic_layers(trained)[name].lora_factors()):
            assert torch.equal(ours, theirs), name


@pytest.mark.parametrize("head_layout", ["own", "shared"])
def test_a_model_built_on_the_meta_device_starts_its_adapters_afresh_with_reset_parameters(head_layout):
    """``to_empty()`` then every module's ``reset_parameters()`` (the usual start of a model made on the meta device)
    gives the adapters PEFT's start: B zero, so the adapted model computes the base model; A drawn within
    +-1/sqrt(d_in)."""
    real = tiny_bert()
    model = _built_on_the_meta_device("dynarank-lora", head_layout=head_layout)
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    base_weights = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    model.load_state_dict(  # the base's weights, under the names the adapted modules give them
        {k: real.state_dict()[k2] for k, k2 in zip(model.state_dict(), base_weights) if k2 in real.state_dict()},
        strict=False,
    )
    _take_transformers_buffers(model, real)
    for layer in elastic_layers(model).values():
        a, b = layer.lora_factors()
        assert not b.any() and a.abs().max() <= 1 / layer.in_features**0.5 and a.abs().max() > 0
    torch.testing.assert_close(_logits(model), _logits(real), rtol=0, atol=0)
