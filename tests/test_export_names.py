"""Specification of the PEFT export of modules whose names end one another ('fc' and 'head.fc'): stock PEFT reads
rank_pattern / alpha_pattern keys and exclude_modules names as name endings, and still loads every module with the
rank, scale and weights it was exported with."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from torch import nn

import dynarank
from dynarank import DynaRankConfig
from tiny_models import randomize_adapters, tiny_llama

R = 4


class Chain(nn.Module):
    """Linear layers (16 -> 16) at the dotted ``names``, applied one after the other."""

    def __init__(self, names: list[str]):
        super().__init__()
        self.order = list(names)
        for name in names:
            *path, last = name.split(".")
            parent = self
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(last, nn.Linear(16, 16))

    def forward(self, x):
        for name in self.order:
            x = torch.tanh(self.get_submodule(name)(x))
        return x


def _chain(names):
    torch.manual_seed(0)
    return Chain(names).eval()


def _adapted_chain(ranks: dict[str, int]):
    """A Chain of the modules of ``ranks``, each adapted (r = R, non-zero adapters) and cut to its rank there."""
    model = _chain(list(ranks))
    targets = sorted({name.rsplit(".", 1)[-1] for name in ranks} | {name for name in ranks if "." not in name})
    dynarank.attach(model, DynaRankConfig(method="dynarank-lora", r=R, lora_alpha=2 * R, target_modules=targets))
    randomize_adapters(model, scale=0.5)
    layers = dynarank.elastic_layers(model)
    assert set(layers) == set(ranks)
    for name, rank in ranks.items():
        layers[name].remove_slots({0: list(range(R - rank))})
        assert layers[name].n_slots == rank, name
    return model


CASES = {
    "fc below head.fc": {"fc": 2, "head.fc": 4},
    "fc above head.fc": {"fc": 4, "head.fc": 1},
    "fc at rank 0": {"fc": 0, "head.fc": 3},
    "head.fc at rank 0": {"fc": 3, "head.fc": 0},
    "three levels, the middle one at rank 0": {"fc": 1, "head.fc": 0, "model.head.fc": 3, "other.fc": 2},
    "a dot PEFT reads as any character": {"layer.fc": 2, "layer_fc": 4},
}


@pytest.mark.parametrize("ranks", CASES.values(), ids=CASES.keys())
def test_modules_whose_names_end_one_another_load_in_stock_peft_at_their_own_ranks(tmp_path, ranks):
    """Stock PEFT gives a module the value of the first rank_pattern key that ends its name: with 'fc' and 'head.fc'
    at different ranks, 'head.fc' got the rank of 'fc' (a size mismatch on load); and exclude_modules=['fc'] for a
    rank-0 'fc' left out 'head.fc' too (NoMatchingPeftModuleError)."""
    model = _adapted_chain(ranks).eval()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
        assert (expected - _chain(list(ranks))(x)).abs().max() > 1e-2  # the adapters matter
    dynarank.export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(_chain(list(ranks)), str(tmp_path / "peft")).eval()
    for name, rank in ranks.items():
        module = loaded.base_model.model.get_submodule(name)
        if rank == 0:
            assert type(module) is nn.Linear, name
        else:
            assert module.r["default"] == rank, name
            assert module.scaling["default"] == pytest.approx(2.0), name  # lora_alpha / r of the attach
    with torch.no_grad():
        assert (loaded(x) - expected).abs().max() <= 1e-5


def test_an_export_without_such_names_keeps_its_plain_form(tmp_path):
    # The common case is written as it always was: rank_pattern / alpha_pattern in sorted order, exclude_modules a
    # sorted list of full names.
    model = dynarank.attach(tiny_llama(), DynaRankConfig(target_modules="all-linear", r=3))
    randomize_adapters(model, scale=0.2)
    layers = dynarank.elastic_layers(model)
    for i, layer in enumerate(layers.values()):
        layer.remove_slots({g: list(range((g + i) % 3)) for g in range(layer.n_groups)})
    gone = layers["model.layers.1.mlp.down_proj"]
    gone.remove_slots({g: list(range(r)) for g, r in enumerate(gone.ranks)})
    dynarank.export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["exclude_modules"] == ["model.layers.1.mlp.down_proj"]
    assert list(config["rank_pattern"]) == list(config["alpha_pattern"]) == sorted(config["target_modules"])
