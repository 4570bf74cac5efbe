"""Specification of the fused update of a dense layer (layer_fused.py): one autograd node with the gradients autograd
gives, used exactly where it applies, and training runs that take the same decisions with it as without it."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dynarank import DynaRankConfig, ElasticLoRALinear, attach, build_controller, elastic_layers
from dynarank.layer_fused import dense_update
from tiny_models import tiny_llama, token_batch

CASES = list(itertools.product(["rows", "cols"], [1, 4]))  # split, groups


def _layer(split, groups, dtype=torch.float64, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(16, 24, dtype=dtype) if split == "rows" else nn.Linear(24, 16, dtype=dtype)
    layer = ElasticLoRALinear(base, n_groups=groups, split=split, r=r, scaling=0.7, dtype=dtype)
    with torch.no_grad():
        for p in layer.factors():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return layer


def _outputs_and_grads(layer, x, gate, fused: bool):
    layer.fused = fused
    tensors = [x, *layer.factors()] + ([gate] if gate is not None else [])
    for t in tensors:
        t.grad = None
    y = layer(x)
    (y.sin() * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    return y, [y.detach().clone()] + [t.grad.clone() for t in tensors if t.requires_grad]


@pytest.mark.parametrize("split,groups", CASES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_base", [False, True])
def test_the_fused_update_has_the_gradients_of_finite_differences(split, groups, gated, with_base):
    layer = _layer(split, groups)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, layer.in_features, generator=g, dtype=torch.float64, requires_grad=True)
    shared, group = (p.detach().clone().requires_grad_() for p in layer.factors())
    gate = torch.randn(groups, 3, generator=g, dtype=torch.float64, requires_grad=True) if gated else None
    base = torch.randn(2, 3, layer.out_features, generator=g, dtype=torch.float64, requires_grad=True)

    def update(x, shared, group, gate, base):
        return dense_update(x, shared, group, gate, 0.7, split, groups, base if with_base else None)

    assert torch.autograd.gradcheck(update, (x, shared, group, gate, base))


@pytest.mark.parametrize("split,groups", CASES)
@pytest.mark.parametrize("gated", [False, True])
def test_a_dense_layer_runs_one_node_with_the_outputs_and_gradients_of_plain_autograd(split, groups, gated):
    layer = _layer(split, groups, dtype=torch.float32)
    assert layer._dense
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    gate = torch.rand(groups, 3, requires_grad=True) if gated else None
    if gated:
        layer.set_gate(lambda _: gate)
    fused_y, fused = _outputs_and_grads(layer, x, gate, fused=True)
    plain_y, plain = _outputs_and_grads(layer, x, gate, fused=False)
    assert type(fused_y.grad_fn).__name__ == "DenseLowRankUpdateBackward"
    assert type(plain_y.grad_fn).__name__ != "DenseLowRankUpdateBackward"
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_an_input_without_gradient_and_a_non_contiguous_input_are_served():
    layer = _layer("cols", 4, dtype=torch.float32)
    x = torch.randn(5, 2, layer.in_features).transpose(0, 1)  # (2, 5, d_in), not contiguous, no gradient
    assert not x.is_contiguous()
    fused_y, fused = _outputs_and_grads(layer, x.detach(), None, fused=True)
    plain_y, plain = _outputs_and_grads(layer, x.detach(), None, fused=False)
    torch.testing.assert_close(fused_y, plain_y)
    assert len(fused) == 3  # the output and the factors' gradients (x has none)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_other_layouts_dtypes_and_autocast_keep_the_autograd_path():
    uneven = _layer("rows", 4, dtype=torch.float32)
    uneven.remove_slots({0: [0]})  # ranks 2, 3, 3, 3: gathered, not dense
    x = torch.randn(3, uneven.in_features, requires_grad=True)
    assert type(uneven(x).grad_fn).__name__ != "DenseLowRankUpdateBackward"

    bf16 = nn.Linear(16, 24).to(torch.bfloat16)  # the base's output in bf16, the adapter in fp32
    layer = ElasticLoRALinear(bf16, r=2)
    y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16  # fused update, then added in the base's dtype
    assert type(y.grad_fn).__name__ != "DenseLowRankUpdateBackward"

    dense = _layer("rows", 1, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = dense(torch.randn(3, dense.in_features, requires_grad=True))
    assert type(z.grad_fn).__name__ != "DenseLowRankUpdateBackward"


def _train_elalora(steps=24, fused=True):
    ElasticLoRALinear.fused = fused
    try:
        model = tiny_llama().double()  # float64: float32 rounding is amplified by AdamW's division
        config = DynaRankConfig(method="elalora", r=2, target_modules="all-linear", seed=0)
        attach(model, config)
        ctrl = build_controller(model, total_steps=steps)
        opt = ctrl.build_optimizer(lr=3e-2)
        for step in range(steps):
            ids = token_batch(4, 8, seed=step)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        layers = elastic_layers(model)
        return {n: layer.ranks for n, layer in layers.items()}, {
            n: layer.delta_weight().detach() for n, layer in layers.items()
        }
    finally:
        ElasticLoRALinear.fused = True


def test_elalora_on_a_tiny_decoder_takes_the_same_rank_decisions_and_weights_with_the_fused_update():
    fused_ranks, fused_weights = _train_elalora(fused=True)
    plain_ranks, plain_weights = _train_elalora(fused=False)
    assert fused_ranks == plain_ranks
    assert len({tuple(r) for r in fused_ranks.values()}) > 1  # the rounds moved ranks between modules
    for name, w in fused_weights.items():  # 24 steps on, in float64: equal up to rounding
        assert float((w - plain_weights[name]).norm()) <= 1e-10 * float(plain_weights[name].norm())
