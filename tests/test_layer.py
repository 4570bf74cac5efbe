"""Specification of ElasticLoRALinear: forward, factors, gates, gradients, merge/unmerge, dtypes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dynarank
from dynarank import DynaRankConfig, ElasticLoRALinear
from tiny_models import randomize_adapters, tiny_bert, token_batch

HETEROGENEOUS = {0: [0], 1: [0, 2], 3: [1]}  # r=3, G=4 -> ranks [2, 1, 3, 2]


def _x(layer, n=5, seed=3):
    return torch.randn(n, layer.in_features, generator=torch.Generator().manual_seed(seed))


def _column(layer, g, j):
    return sum(layer.ranks[:g]) + j


# ---------------------------------------------------------------- forward and factors


def test_a_fresh_layer_is_exactly_the_base_layer(make_layer, split, layout):
    layer = make_layer(split, layout, randomize=False)
    x = _x(layer)
    assert torch.equal(layer(x), layer.base(x))
    a_side, b_side = (layer.shared_weight, layer.group_weight)[:: 1 if split == "rows" else -1]
    assert torch.count_nonzero(b_side) == 0  # B starts at zero ...
    assert torch.count_nonzero(a_side) == a_side.numel()  # ... and A is random, so B gets gradient


def test_forward_equals_base_plus_delta_weight_for_heterogeneous_ranks(make_layer, reference_delta, split, layout):
    layer = make_layer(split, layout)
    layer.remove_slots(HETEROGENEOUS)
    assert layer.ranks == [2, 1, 3, 2]
    x = _x(layer)
    delta = layer.delta_weight()
    torch.testing.assert_close(delta, reference_delta(layer), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ delta.T, atol=1e-5, rtol=1e-5)
    assert (layer(x) - layer.base(x)).abs().max() > 0.1


def test_lora_factors_reproduce_delta_weight(make_layer, split, layout):
    layer = make_layer(split, layout)
    layer.remove_slots(HETEROGENEOUS)
    layer.set_gate(lambda l: torch.linspace(0.1, 1.3, l.n_groups * l.max_rank).view(l.n_groups, l.max_rank))
    a, b = layer.lora_factors()
    assert a.shape == (layer.n_slots, layer.in_features)
    assert b.shape == (layer.out_features, layer.n_slots)
    expected_slots = 8 if layout == "own" else 3  # own: sum of ranks; shared: slots any group still uses
    assert layer.n_slots == expected_slots
    torch.testing.assert_close(b @ a * layer.scaling, layer.delta_weight(), atol=1e-6, rtol=1e-6)


def test_a_group_at_rank_zero_contributes_nothing(make_layer, reference_delta, split, layout):
    layer = make_layer(split, layout)
    layer.remove_slots({2: [0, 1, 2], 0: [1]})
    assert layer.ranks == [2, 3, 0, 3]
    x = _x(layer)
    delta = layer.delta_weight()
    block = slice(2 * layer.group_size, 3 * layer.group_size)
    assert torch.count_nonzero(delta[block] if split == "rows" else delta[:, block]) == 0
    torch.testing.assert_close(delta, reference_delta(layer), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ delta.T, atol=1e-5, rtol=1e-5)


def test_a_layer_at_rank_zero_returns_the_base_output(make_layer, split, layout):
    layer = make_layer(split, layout)
    layer.remove_slots({g: [0, 1, 2] for g in range(4)})
    assert layer.ranks == [0, 0, 0, 0] and layer.n_slots == 0
    assert layer.num_adapter_parameters() == 0
    x = _x(layer)
    assert torch.equal(layer(x), layer.base(x))
    assert torch.count_nonzero(layer.delta_weight()) == 0


def test_a_gate_that_zeroes_a_slot_equals_removing_that_slot(make_layer, split, layout):
    gated = make_layer(split, layout)
    removed = copy.deepcopy(gated)
    mask = torch.ones(4, 3)
    mask[1, 2] = 0.0
    mask[3, 0] = 0.0
    gated.set_gate(lambda layer: mask)
    removed.remove_slots({1: [2], 3: [0]})
    x = _x(gated)
    torch.testing.assert_close(gated(x), removed(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gated.delta_weight(), removed.delta_weight(), atol=1e-6, rtol=1e-6)
    gated.set_gate(None)
    assert (gated(x) - removed(x)).abs().max() > 1e-2  # the gate was doing the work


def test_a_fractional_gate_scales_its_slots(make_layer, reference_delta, split, layout):
    layer = make_layer(split, layout)
    layer.remove_slots({1: [0]})
    gate = torch.rand(4, layer.max_rank, generator=torch.Generator().manual_seed(7))
    layer.set_gate(lambda l: gate)
    x = _x(layer)
    delta = reference_delta(layer)
    torch.testing.assert_close(layer.delta_weight(), delta, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ delta.T, atol=1e-5, rtol=1e-5)


def test_a_masked_slot_receives_zero_gradient_on_its_b_column(make_layer, split, layout):
    layer = make_layer(split, layout)
    masked_slot = layer.slots[1][1]
    mask = torch.ones(4, 3)
    masked = [(g, j) for g, slots in enumerate(layer.slots) for j, s in enumerate(slots) if s == masked_slot]
    for g, j in masked:
        mask[g, j] = 0.0
    layer.set_gate(lambda l: mask)
    x = _x(layer, n=9)
    (layer(x) ** 2).sum().backward()
    if split == "rows":  # B is the group side: one column per (group, position)
        grad = layer.group_weight.grad
        masked_cols = [_column(layer, g, j) for g, j in masked]
        kept_cols = [c for c in range(grad.shape[1]) if c not in masked_cols]
        assert torch.count_nonzero(grad[:, masked_cols]) == 0
        assert (grad[:, kept_cols].abs().sum(0) > 0).all()
    else:  # B^T is the shared side: one row per slot
        grad = layer.shared_weight.grad
        kept = [s for s in range(layer.n_slots) if s != masked_slot]
        assert torch.count_nonzero(grad[masked_slot]) == 0
        assert (grad[kept].abs().sum(1) > 0).all()


def test_input_with_batch_and_sequence_dimensions(make_layer, split, layout):
    layer = make_layer(split, layout)
    layer.remove_slots(HETEROGENEOUS)
    x = torch.randn(2, 5, layer.in_features)
    y = layer(x)
    assert y.shape == (2, 5, layer.out_features)
    torch.testing.assert_close(y, layer(x.reshape(10, -1)).reshape(2, 5, -1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y, layer.base(x) + x @ layer.delta_weight().T, atol=1e-5, rtol=1e-5)


def test_equal_ranks_in_own_layout_take_the_dense_path_with_the_same_result(make_layer, reference_delta, split):
    dense = make_layer(split, "own")
    assert dense._dense
    # Same ranks (3 everywhere) but non-contiguous slots: position 0 moved to the end of each group.
    gathered = copy.deepcopy(dense)
    gathered.remove_slots({g: [0] for g in range(4)})
    gathered.add_slots({g: 1 for g in range(4)})
    assert gathered.ranks == [3, 3, 3, 3] and not gathered._dense
    with torch.no_grad():
        for g in range(4):
            gathered.shared_weight[gathered.slots[g][2]] = dense.shared_weight[dense.slots[g][0]]
            gathered.group_weight[:, _column(gathered, g, 2)] = dense.group_weight[:, _column(dense, g, 0)]
    x = torch.randn(2, 5, dense.in_features)
    torch.testing.assert_close(dense(x), gathered(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dense.delta_weight(), gathered.delta_weight(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dense.delta_weight(), reference_delta(dense), atol=1e-5, rtol=1e-5)
    gate = torch.rand(4, 3)
    dense.set_gate(lambda l: gate)
    gathered.set_gate(lambda l: gate[:, [1, 2, 0]])  # the gate follows the moved position
    torch.testing.assert_close(dense(x), gathered(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("gated", [False, True])
def test_uneven_ranks_take_rank_buckets_with_the_padded_outputs_and_gradients(
    make_layer, split, layout, gated, monkeypatch
):
    monkeypatch.setattr(dynarank.layer_buckets, "BUCKET_MIN_WASTE", 0)  # tiny layers: buckets whenever cheaper
    bucketed = make_layer(split, layout)
    bucketed.remove_slots({0: [0, 1, 2], 1: [1, 2], 3: [2]})  # ranks [0, 1, 3, 2]: T = 6 of G * r_max = 12
    assert [b.rank for b in bucketed._buckets.buckets] == [1, 2, 3]
    padded = copy.deepcopy(bucketed)
    padded._buckets = None  # force the padded product
    gate = torch.rand(4, 3, generator=torch.Generator().manual_seed(5), requires_grad=True)
    if gated:
        for layer in (bucketed, padded):
            layer.set_gate(lambda l: gate)
    x = torch.randn(2, 5, bucketed.in_features)
    y_b, y_p = bucketed(x), padded(x)
    torch.testing.assert_close(y_b, y_p, atol=1e-6, rtol=1e-6)
    assert (y_b - bucketed.base(x)).abs().max() > 0.1
    grads = []
    for layer in (bucketed, padded):
        gate.grad = None
        (layer(x) ** 2).sum().backward()
        grads.append([layer.shared_weight.grad, layer.group_weight.grad, gate.grad if gated else None])
    for g_b, g_p in zip(*grads):
        if g_b is not None:
            torch.testing.assert_close(g_b, g_p, atol=1e-5, rtol=1e-5)


def _backward_ops(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``t``."""
    names, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("buckets", [False, True])
def test_the_gradient_adds_a_shared_slot_s_repeats_in_a_fixed_order(make_layer, split, layout, buckets, monkeypatch):
    """Advanced indexing's backward is an accumulating index_put, which on a CPU with several threads adds the
    repeats of a slot read by every group with atomic adds in a racing order (4-bit SmolLM2 + ARD, the same seed:
    different gradients from the second step on). The layer reads slots and columns with index_select, whose
    backward (index_add) adds them in index order; the fused update (layer_fused.py) scatters its gradients with
    index_add itself."""
    if buckets:
        monkeypatch.setattr(dynarank.layer_buckets, "BUCKET_MIN_WASTE", 0)
    layer = make_layer(split, layout)
    layer.remove_slots({0: [0, 1], 1: [1], 3: [2]})  # uneven ranks [1, 2, 3, 2]: the gathered (not dense) path
    assert (layer._buckets is not None) == buckets
    ops = _backward_ops(layer(_x(layer)))
    assert "IndexBackward0" not in ops
    assert ("IndexSelectBackward0" if buckets else "LowRankUpdateBackward") in ops


def test_a_layer_with_even_ranks_keeps_one_padded_product(make_layer, split, layout, monkeypatch):
    monkeypatch.setattr(dynarank.layer_buckets, "BUCKET_MIN_WASTE", 0)
    layer = make_layer(split, layout)
    layer.remove_slots({g: [2] for g in range(4)})  # ranks [2, 2, 2, 2]
    assert layer._buckets is None
    layer.remove_slots({0: [1]})  # [1, 2, 2, 2]: T = 7 > 3/4 of 8, too little to gain
    assert layer._buckets is None


def _lopsided(split, layout):
    """A 256-wide layer whose heads hold ranks [64, 4, 4, 0]: padding 46 ranks per feature, so buckets by default."""
    torch.manual_seed(0)
    layer = ElasticLoRALinear(nn.Linear(256, 256), n_groups=4, split=split, layout=layout, r=64)
    with torch.no_grad():
        layer.shared_weight.normal_()
        layer.group_weight.normal_()
    layer.remove_slots({1: list(range(4, 64)), 2: list(range(4, 64)), 3: list(range(64))})
    padded = copy.deepcopy(layer)
    padded._buckets = None
    return layer, padded


def test_a_lopsided_layer_takes_buckets_at_the_default_threshold_and_matches_the_padded_product(split, layout):
    layer, padded = _lopsided(split, layout)
    assert layer._buckets is not None and [b.rank for b in layer._buckets.buckets] == [4, 64]
    x = torch.randn(5, 256)
    torch.testing.assert_close(layer(x), padded(x), atol=1e-3, rtol=1e-4)


def test_buckets_run_under_bf16_autocast_like_the_padded_product(split, layout):
    layer, padded = _lopsided(split, layout)
    x = torch.randn(5, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_padded = layer(x), padded(x)
    assert y.dtype == y_padded.dtype
    torch.testing.assert_close(y.float(), y_padded.float(), atol=2.0, rtol=5e-2)  # bf16 sums of 64 ranks


def test_buckets_follow_the_module_to_another_device():
    layer, _ = _lopsided("rows", "shared")
    moved = copy.deepcopy(layer).to("meta")
    y = moved(torch.randn(5, 256, device="meta"))
    assert y.device.type == "meta" and moved._buckets.device.type == "meta"


def test_buckets_are_taken_only_when_the_padding_is_large():
    from dynarank.layer_buckets import worth_bucketing

    assert not worth_bucketing([8] + [1] * 11)  # MiniLM-sized: the padded product is faster
    assert worth_bucketing([64] + [4] * 15)  # one head far above the rest: buckets save 56 ranks per feature
    assert not worth_bucketing([64] * 16) and not worth_bucketing([0, 0])


def test_invalid_construction_is_rejected():
    with pytest.raises(ValueError, match="divide"):
        ElasticLoRALinear(nn.Linear(24, 32), n_groups=5)
    with pytest.raises(ValueError, match="split"):
        ElasticLoRALinear(nn.Linear(24, 32), split="diag")
    with pytest.raises(ValueError, match="layout"):
        ElasticLoRALinear(nn.Linear(24, 32), layout="mixed")
    with pytest.raises(ValueError, match="rank"):
        ElasticLoRALinear(nn.Linear(24, 32), r=-1)


def test_the_base_is_frozen_and_the_adapter_trainable(make_layer, split, layout):
    layer = make_layer(split, layout)
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert all(p.requires_grad for p in layer.adapter_parameters())
    own = layout == "own"
    d_g, other = layer.group_size, layer.other_dim
    expected = 4 * 3 * (other + d_g) if own else 3 * other + 4 * 3 * d_g
    assert layer.num_adapter_parameters() == expected


# ---------------------------------------------------------------- merge / unmerge


def test_merged_forward_equals_unmerged_forward(make_layer, split, layout):
    layer = make_layer(split, layout)
    layer.remove_slots(HETEROGENEOUS)
    x = _x(layer)
    before = layer(x)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base(x), before, atol=1e-5, rtol=1e-5)  # the update is in the base now
    assert (layer.base.weight - w0).abs().max() > 1e-2


def test_merging_twice_equals_merging_once(make_layer, split, layout):
    layer = make_layer(split, layout)
    layer.merge()
    once = layer.base.weight.detach().clone()
    layer.merge()
    assert torch.equal(layer.base.weight, once)


def test_unmerge_restores_the_base_weight(make_layer, split, layout):
    layer = make_layer(split, layout)
    x = _x(layer)
    before = layer(x)
    w0 = layer.base.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    layer.unmerge()  # idempotent
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=0)


def test_a_merged_layer_refuses_a_new_gate_and_a_resize(make_layer):
    layer = make_layer()
    w0 = layer.base.weight.clone()
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.set_gate(lambda l: torch.zeros(l.n_groups, l.max_rank))
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.remove_slots({0: [0]})
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, atol=1e-6, rtol=1e-6)


def test_train_and_eval_never_merge():
    model = tiny_bert()
    dynarank.attach(model, DynaRankConfig(target_modules=["query", "value", "attention.output.dense"], r=2))
    randomize_adapters(model)
    layers = dynarank.elastic_layers(model)
    weights = {n: layer.base.weight.detach().clone() for n, layer in layers.items()}
    ids = token_batch()
    logits = model(ids).logits
    for mode in (model.train, model.eval, model.train, model.eval):
        mode()
        assert not any(layer.merged for layer in layers.values())
        assert all(torch.equal(layer.base.weight, weights[n]) for n, layer in layers.items())
    torch.testing.assert_close(model(ids).logits, logits, atol=1e-6, rtol=1e-6)


def test_model_level_merge_and_unmerge():
    model = tiny_bert()
    dynarank.attach(model, DynaRankConfig(target_modules=["query", "key", "value", "attention.output.dense"], r=2))
    randomize_adapters(model, scale=0.1)
    ids = token_batch()
    logits = model(ids).logits
    dynarank.merge(model)
    assert all(layer.merged for layer in dynarank.elastic_layers(model).values())
    torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=1e-5)
    dynarank.unmerge(model)
    assert not any(layer.merged for layer in dynarank.elastic_layers(model).values())
    torch.testing.assert_close(model(ids).logits, logits, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- half-precision base


def test_a_bf16_linear_keeps_fp32_adapters_and_bf16_output(split, layout):
    base = nn.Linear(24, 32).to(torch.bfloat16)
    layer = ElasticLoRALinear(base, n_groups=4, split=split, layout=layout, r=3)
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_(0, 0.3)
    assert layer.shared_weight.dtype == torch.float32 and layer.group_weight.dtype == torch.float32
    assert layer.base.weight.dtype == torch.bfloat16
    x = torch.randn(5, 24).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = layer.base(x).float() + x.float() @ layer.delta_weight().T
    torch.testing.assert_close(y.float(), expected, atol=5e-2, rtol=2e-2)
    layer.merge()
    assert layer.base.weight.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x).float(), expected, atol=1e-1, rtol=5e-2)


def test_an_fp16_linear_keeps_fp32_adapters_and_merges_without_drift(split, layout):
    base = nn.Linear(16, 16).half()
    layer = ElasticLoRALinear(base, n_groups=4, split=split, layout=layout, r=2)
    with torch.no_grad():
        layer.group_weight.normal_()
        layer.shared_weight.normal_()
    assert base.weight.dtype == torch.float16 and layer.shared_weight.dtype == torch.float32
    x = torch.randn(3, 16).half()
    y = layer(x)
    assert y.dtype == torch.float16
    w0 = base.weight.clone()
    for _ in range(5):
        layer.merge()
        torch.testing.assert_close(layer(x), y, atol=2e-2, rtol=2e-2)
        layer.unmerge()
    assert (base.weight.float() - w0.float()).abs().max() < 1e-2


def test_a_bf16_model_keeps_fp32_adapters_and_a_bf16_base(layout):
    model = tiny_bert().to(torch.bfloat16)
    dynarank.attach(
        model, DynaRankConfig(target_modules=["query", "value", "attention.output.dense"], head_layout=layout)
    )
    layers = dynarank.elastic_layers(model)
    assert len(layers) == 6
    for layer in layers.values():
        assert layer.shared_weight.dtype == torch.float32 and layer.group_weight.dtype == torch.float32
        assert layer.base.weight.dtype == torch.bfloat16
    logits = model(token_batch()).logits
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("slots", [[[0, 1, 2], [3], [], [4, 5]], [[2, 0], [1, 2, 0], [0]], [], [[], []]])
def test_the_padded_gather_indices_point_past_each_group_s_rank_at_the_padding(slots):
    n_slots, n_cols = 6, sum(len(s) for s in slots)
    slot_index, column_index = dynarank.slot_layout.gather_indices(slots, n_slots, n_cols)
    r_max = max((len(s) for s in slots), default=0)
    assert slot_index.shape == column_index.shape == (len(slots), r_max)
    assert slot_index.dtype == column_index.dtype == torch.long
    offset = 0
    for g, group in enumerate(slots):
        pad = r_max - len(group)
        assert slot_index[g].tolist() == group + [n_slots] * pad  # group g's slots, then the zero row S
        assert column_index[g].tolist() == list(range(offset, offset + len(group))) + [n_cols] * pad
        offset += len(group)
