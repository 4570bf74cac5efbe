"""How a fresh adapter of an SVD method (ElaLoRA, AdaLoRA-style) starts: ``svd_init``.

'adalora' (the papers): P, Q ~ N(0, 0.02) and E = 0, so at first only E learns. 'lora': the factors as plain LoRA
draws them (A kaiming-uniform, B = 0) and E = 1, so the update and its first steps are plain LoRA's.
"""

from __future__ import annotations

import pytest
import torch

import dynarank
from dynarank import DynaRankConfig, attach, elastic_layers
from dynarank.config import ConfigError
from dynarank.controllers.svd_values import INIT_STD
from dynarank.defaults import SOURCE, default_svd_init
from tiny_models import tiny_llama, token_batch

TARGETS = ["q_proj", "v_proj"]


def _attached(method: str, **knobs):
    model = attach(tiny_llama(), DynaRankConfig(method=method, r=2, target_modules=TARGETS, seed=0, **knobs))
    controller = dynarank.build_controller(model, total_steps=40)
    return model, controller


def _factors(model) -> dict[str, list[torch.Tensor]]:
    return {
        name: [p.detach().clone() for p in layer.adapter_parameters()] for name, layer in elastic_layers(model).items()
    }


@pytest.mark.parametrize("method", ["elalora", "adalora-physical"])
def test_the_lora_start_is_plain_lora_s_draw_with_every_singular_value_one(method):
    model, controller = _attached(method, svd_init="lora", ortho_weight=0.0)
    lora, _ = _attached("dynarank-lora", granularity="matrix")  # one group per matrix, as the SVD methods
    assert torch.equal(model.dynarank_svd.values.detach(), torch.ones_like(model.dynarank_svd.values))
    ours, plain = _factors(model), _factors(lora)
    assert ours.keys() == plain.keys()
    for name in ours:
        assert all(torch.equal(a, b) for a, b in zip(ours[name], plain[name], strict=True)), name
        layer = elastic_layers(model)[name]
        b_side = layer.group_weight if layer.split == "rows" else layer.shared_weight
        assert not b_side.any(), name  # B = 0: the model is the base model's function
    settings = controller.settings_used()
    assert settings["svd_init"] == "lora" and settings["svd_init_source"] == "config"


def test_from_the_lora_start_an_svd_method_s_first_step_is_plain_lora_s():
    ids = token_batch()
    runs = {}
    for method, knobs in (
        ("elalora", {"svd_init": "lora", "ortho_weight": 0.0, "values_lr_ratio": 1.0}),
        ("dynarank-lora", {"granularity": "matrix"}),
    ):
        model, controller = _attached(method, **knobs)
        model.train()
        optimizer = controller.build_optimizer(lr=1e-2)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        runs[method] = _factors(model)
    for name, factors in runs["dynarank-lora"].items():
        for ours, plain in zip(runs["elalora"][name], factors, strict=True):
            torch.testing.assert_close(ours, plain, rtol=0, atol=0)  # bitwise
        assert factors[1].any(), name  # B moved off zero: the step did something to compare


@pytest.mark.parametrize("method", ["elalora", "adalora-physical"])
def test_the_papers_start_draws_both_factors_small_with_every_singular_value_zero(method):
    model, controller = _attached(method, svd_init="adalora")
    assert not model.dynarank_svd.values.any()
    for name, (a, b) in _factors(model).items():
        for factor in (a, b):
            assert factor.any() and factor.std().item() == pytest.approx(INIT_STD, rel=0.3), name


@pytest.mark.parametrize("method", ["elalora", "adalora-physical"])
def test_without_a_start_the_method_takes_the_study_s_for_its_kind_and_records_where_it_came_from(method):
    model, controller = _attached(method)
    settings = controller.settings_used()
    assert settings["svd_init"] == default_svd_init(method, "causal-lm")
    assert settings["svd_init_source"] == f"{SOURCE}, causal-lm"
    assert settings["config"]["svd_init"] is None
    started_at_one = bool((model.dynarank_svd.values == 1).all())
    assert started_at_one is (settings["svd_init"] == "lora")


@pytest.mark.parametrize("bad", ["LoRA", "pissa", 1, True])
def test_a_start_that_is_not_one_of_the_two_is_refused(bad):
    with pytest.raises(ConfigError, match="svd_init"):
        DynaRankConfig(method="elalora", r=2, svd_init=bad)
