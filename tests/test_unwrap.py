"""Specification of unwrap (the model attach was given, back) and of the model-level calls on a model attach never
saw (merge, unmerge)."""

from __future__ import annotations

import warnings

import pytest
import torch

import dynarank
from dynarank import DynaRankConfig
from dynarank.attach import unwrap
from tiny_models import tiny_llama, token_batch

HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def _hooks(model) -> dict[str, int]:
    return {attr: sum(len(getattr(m, attr)) for m in model.modules()) for attr in HOOKS}


def _train_step(model) -> list[str]:
    """One training forward and backward; the dynarank warnings it raised."""
    model.train()
    ids = token_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids, labels=ids).loss.backward()
    return [str(w.message) for w in caught if "dynarank" in str(w.message)]


def _controlled(method="ard"):
    """A tiny Llama attached for ``method``, its controller built and stepped once."""
    model = dynarank.attach(tiny_llama(), DynaRankConfig(method=method, r=2, target_modules="all-linear", seed=0))
    controller = dynarank.build_controller(model, total_steps=20)
    optimizer = controller.build_optimizer(lr=1e-2)
    _train_step(model)
    optimizer.step()
    return model


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("method", ["ard", "elalora"])
def test_unwrap_leaves_no_dynarank_attribute_module_or_hook_on_the_model(method, merge):
    """Before, the controller's marker and load hooks and the gate folding's hook stayed on the model."""
    fresh = _hooks(tiny_llama())
    model = unwrap(_controlled(method), merge=merge)
    for module in model.modules():
        assert not [a for a in vars(module) if "dynarank" in a], type(module).__name__
    assert not any("dynarank" in name for name, _ in model.named_modules())
    assert _hooks(model) == fresh


def test_unwrap_gives_back_every_parameters_requires_grad_as_it_was_before_attach():
    """Before, the whole base stayed frozen after unwrap (0 of 21 parameters trainable; all were before attach)."""
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen by the user before attach: stays frozen
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    dynarank.attach(model, DynaRankConfig(r=2, target_modules="all-linear", modules_to_save=["lm_head"]))
    assert {name: p.requires_grad for name, p in unwrap(model).named_parameters()} == before


def test_after_unwrap_a_fresh_attach_warns_again_when_it_trains_without_a_controller():
    """A model that once had a controller forgot nothing before: a second attach for a rank method trained fixed
    ranks without the warning."""
    model = unwrap(_controlled("ard"))
    dynarank.attach(model, DynaRankConfig(method="elalora", r=2, target_modules=["q_proj"]))
    assert any("trains without a rank controller" in w for w in _train_step(model))


def test_unwrap_without_merge_gives_back_the_base_models_outputs():
    model = tiny_llama()
    ids = token_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    unwrapped = unwrap(_controlled("ard"), merge=False).eval()
    unwrapped.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(unwrapped(input_ids=ids).logits, expected)


@pytest.mark.parametrize("call", [dynarank.merge, dynarank.unmerge], ids=["merge", "unmerge"])
def test_merge_and_unmerge_refuse_a_model_attach_never_saw(call):
    """Before, both did nothing without a word (a merge the caller believed done)."""
    with pytest.raises(ValueError, match=r"needs a model returned by dynarank.attach\(\)"):
        call(tiny_llama())
    assert dynarank.adapter_parameter_count(tiny_llama()) == 0  # a count: nothing to refuse
