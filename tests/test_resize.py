"""Specification of resizing: remove_slots / add_slots, optimizer state, schedulers, and gate equivalence."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import dynarank
from dynarank import DynaRankConfig
from dynarank.optim_state import reindex_parameter
from tiny_models import randomize_adapters, tiny_bert, token_batch

REMOVE = {0: [1], 2: [0, 2]}  # r=3, G=4 -> ranks [2, 3, 1, 3]


def _x(layer, n=6, seed=3):
    return torch.randn(n, layer.in_features, generator=torch.Generator().manual_seed(seed))


def _kept_indices(layer, positions):
    """(kept shared rows, kept packed columns) of ``layer`` after removing ``positions``."""
    columns, used, offset = [], set(), 0
    for g, slots in enumerate(layer.slots):
        for j, s in enumerate(slots):
            if j not in positions.get(g, ()):
                columns.append(offset + j)
                used.add(s)
        offset += len(slots)
    return sorted(used), columns


def _mask(layer, positions):
    mask = torch.ones(layer.n_groups, layer.max_rank)
    for g, ps in positions.items():
        mask[g, ps] = 0.0
    return mask


def _fixed_gate(mask):
    return lambda layer: mask


def _adamw_steps(layer, opt, x, y, steps):
    losses, outputs = [], []
    for _ in range(steps):
        opt.zero_grad()
        out = layer(x)
        loss = F.mse_loss(out, y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        outputs.append(out.detach())
    return torch.stack(losses), outputs


# ---------------------------------------------------------------- function preserved / equivalent


def test_growing_a_rank_leaves_outputs_unchanged(make_layer, split, layout):
    layer = make_layer(split, layout)
    layer.remove_slots({0: [1]})  # in the shared layout group 0 can now re-use slot 1
    x = torch.randn(2, 5, layer.in_features)
    before = layer(x)
    added = layer.add_slots({0: 2, 1: 1, 3: 4})
    assert layer.ranks == [4, 4, 3, 7]
    assert added > 0
    assert (layer(x) - before).abs().max() <= 1e-6


def test_grown_ranks_receive_gradient(make_layer, split, layout):
    layer = make_layer(split, layout)
    layer.remove_slots({0: [1]})
    old_ranks = layer.ranks
    layer.add_slots({0: 2, 2: 1})
    (layer(_x(layer)) ** 2).sum().backward()
    for g, r_old in enumerate(old_ranks):
        for j in range(r_old, layer.ranks[g]):
            column = sum(layer.ranks[:g]) + j
            slot = layer.slots[g][j]
            signal = layer.group_weight.grad[:, column].abs().sum() + layer.shared_weight.grad[slot].abs().sum()
            assert signal > 0, (g, j)


def test_shrinking_equals_masking_those_slots(make_layer, split, layout):
    masked = make_layer(split, layout)
    shrunk = copy.deepcopy(masked)
    positions = {0: [1], 1: [0, 1, 2], 3: [2]}  # includes a whole group
    masked.set_gate(_fixed_gate(_mask(masked, positions)))
    shrunk.remove_slots(positions)
    assert shrunk.ranks == [2, 0, 3, 2]
    x = torch.randn(2, 5, masked.in_features)
    torch.testing.assert_close(shrunk(x), masked(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(shrunk.delta_weight(), masked.delta_weight(), atol=1e-6, rtol=1e-6)


def test_the_optimizer_holds_the_resized_parameters(make_layer, split, layout):
    layer = make_layer(split, layout)
    opt = torch.optim.AdamW(layer.adapter_parameters(), lr=1e-2)
    _train_some(layer, opt)
    layer.remove_slots(REMOVE, optimizer=opt)
    layer.add_slots({1: 2}, optimizer=opt)
    held = opt.param_groups[0]["params"]
    assert len(held) == 2 and all(a is b for a, b in zip(held, layer.adapter_parameters(), strict=True))
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in layer.adapter_parameters())
    assert all(p.requires_grad and p.grad is None for p in layer.adapter_parameters())
    assert dict(layer.named_parameters())["shared_weight"] is layer.shared_weight


def test_training_continues_after_a_resize_while_the_previous_loss_is_still_referenced(make_layer, split, layout):
    layer = make_layer(split, layout)
    opt = torch.optim.AdamW(layer.adapter_parameters(), lr=1e-2)
    x = _x(layer)
    for step in range(4):  # the usual loop: `loss` of the previous step is alive during the resize
        if step == 2:
            layer.remove_slots(REMOVE, optimizer=opt)
        if step == 3:
            layer.add_slots({2: 2}, optimizer=opt)
        opt.zero_grad()
        loss = (layer(x) ** 2).mean()
        loss.backward()
        opt.step()
    assert layer.ranks == [2, 3, 3, 3]
    assert all(p.grad is not None and p.grad.shape == p.shape for p in layer.adapter_parameters())
    assert loss.item() > 0


# ---------------------------------------------------------------- parameter counts


def test_removing_ranks_in_the_own_layout_frees_slot_and_column(make_layer, split):
    layer = make_layer(split, "own")
    before = layer.num_adapter_parameters()
    freed = layer.remove_slots(REMOVE)
    per_rank = layer.other_dim + layer.group_size  # rows: d_in + d_g; cols: d_out + d_g
    assert freed == 3 * per_rank
    assert layer.num_adapter_parameters() == before - 3 * per_rank
    assert layer.add_slots({1: 2}) == 2 * per_rank
    assert layer.num_adapter_parameters() == before - per_rank


def test_removing_ranks_in_the_shared_layout_frees_a_slot_only_when_no_group_uses_it(make_layer, split):
    layer = make_layer(split, "shared")
    d_g, other = layer.group_size, layer.other_dim
    before = layer.num_adapter_parameters()
    assert before == 3 * other + 4 * 3 * d_g
    assert layer.remove_slots({0: [0]}) == d_g  # slot 0 still used by groups 1..3
    assert layer.n_slots == 3
    assert layer.remove_slots({1: [0], 2: [0]}) == 2 * d_g
    assert layer.n_slots == 3
    assert layer.remove_slots({3: [0]}) == d_g + other  # last user gone: the shared row goes too
    assert layer.n_slots == 2
    assert layer.num_adapter_parameters() == before - 4 * d_g - other
    assert layer.slots == [[0, 1]] * 4


@pytest.mark.parametrize("ranks", [[3, 3, 3, 3], [2, 3, 1, 3], [0, 1, 0, 2], [0, 0, 0, 0]])
def test_parameter_count_of_a_prefix_cut_equals_the_count_after_removing_it(make_layer, split, layout, ranks):
    layer = make_layer(split, layout)
    predicted = layer.num_adapter_parameters_at(ranks)
    layer.remove_slots({g: list(range(k, r)) for g, (k, r) in enumerate(zip(ranks, layer.ranks)) if k < r})
    assert predicted == layer.num_adapter_parameters()
    with pytest.raises(ValueError, match="do not fit"):
        layer.num_adapter_parameters_at([4] * layer.n_groups)


def test_out_of_range_positions_raise_index_error(make_layer, split, layout):
    layer = make_layer(split, layout)
    x = _x(layer)
    before = layer(x)
    for bad in ({0: [3]}, {1: [-1]}, {4: [0]}, {-1: [0]}):
        with pytest.raises(IndexError):
            layer.remove_slots(bad)
    with pytest.raises(IndexError):
        layer.add_slots({4: 1})
    with pytest.raises(IndexError):
        layer.add_slots({0: -1})
    assert layer.ranks == [3, 3, 3, 3]
    assert torch.equal(layer(x), before)


def test_resizing_a_merged_layer_raises(make_layer, split, layout):
    layer = make_layer(split, layout)
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.remove_slots({0: [0]})
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.add_slots({0: 1})
    assert layer.ranks == [3, 3, 3, 3]
    layer.unmerge()
    assert layer.remove_slots({0: [0]}) > 0


# ---------------------------------------------------------------- optimizer state and schedulers


def _train_some(layer, opt, steps=3):
    x, y = _x(layer), torch.randn(6, layer.out_features)
    _adamw_steps(layer, opt, x, y, steps)


def _moments(layer, opt):
    return {
        name: {k: v.clone() for k, v in opt.state[p].items()} for name, p in layer.named_parameters() if p.requires_grad
    }


def test_adamw_moments_of_kept_slots_are_carried_over_exactly(make_layer, split, layout):
    layer = make_layer(split, layout)
    opt = torch.optim.AdamW(layer.adapter_parameters(), lr=1e-2, weight_decay=0.1)
    _train_some(layer, opt)
    old = _moments(layer, opt)
    kept_slots, kept_columns = _kept_indices(layer, REMOVE)
    assert len(kept_slots) == (9 if layout == "own" else 3) and len(kept_columns) == 9
    layer.remove_slots(REMOVE, optimizer=opt)
    new = _moments(layer, opt)
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.count_nonzero(old["group_weight"][key]) > 0
        assert new["shared_weight"][key].shape == layer.shared_weight.shape
        assert new["group_weight"][key].shape == layer.group_weight.shape
        assert torch.equal(new["shared_weight"][key], old["shared_weight"][key][kept_slots])
        assert torch.equal(new["group_weight"][key], old["group_weight"][key][:, kept_columns])
    assert torch.equal(new["shared_weight"]["step"], old["shared_weight"]["step"])
    assert float(new["group_weight"]["step"]) == 3.0


@pytest.mark.parametrize("steps", [1, 50, 1000, 5000])
def test_an_appended_entrys_first_adamw_update_is_the_learning_rate_however_long_the_run(steps):
    # Appended entries share the tensor's step count: with zero moments their first update would be 2.5x the rate
    # after 1,000 steps (3.2x in the limit), against a fresh parameter's exactly-the-rate first step.
    p = torch.nn.Parameter(torch.zeros(4, 8))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    g = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)).sign() * 0.5  # a steady gradient, |g| = 0.5
    for _ in range(steps):
        p.grad = g.clone()
        opt.step()
    grown = reindex_parameter(p, 0, torch.arange(6), appended=torch.zeros(2, 8), optimizer=opt)
    before = grown.detach().clone()
    grown.grad = torch.cat([g, g[:2]])
    opt.step()
    first = (grown.detach() - before)[4:].abs()
    if steps < 100:  # early in a run zeros give no more than the rate (and are what the entries start with)
        assert float(first.max()) <= 1e-3 * (1 + 1e-5)
    else:
        torch.testing.assert_close(first, torch.full_like(first, 1e-3), rtol=1e-4, atol=0.0)


def test_new_slots_start_with_zero_moments_early_in_a_run(make_layer, split, layout):
    layer = make_layer(split, layout)
    opt = torch.optim.AdamW(layer.adapter_parameters(), lr=1e-2, weight_decay=0.1)
    layer.remove_slots({0: [1]}, optimizer=opt)
    _train_some(layer, opt)
    old_ranks, old_slots = layer.ranks, layer.n_slots
    old = _moments(layer, opt)
    old_group, old_shared = old["group_weight"], old["shared_weight"]
    counts = {0: 2, 2: 1}
    layer.add_slots(counts, optimizer=opt)
    group, shared = opt.state[layer.group_weight], opt.state[layer.shared_weight]
    old_offsets = [sum(old_ranks[:g]) for g in range(4)]
    new_offsets = [sum(layer.ranks[:g]) for g in range(4)]
    for key in ("exp_avg", "exp_avg_sq"):
        for g in range(4):
            kept = group[key][:, new_offsets[g] : new_offsets[g] + old_ranks[g]]
            assert torch.equal(kept, old_group[key][:, old_offsets[g] : old_offsets[g] + old_ranks[g]])
            new = group[key][:, new_offsets[g] + old_ranks[g] : new_offsets[g] + layer.ranks[g]]
            assert new.shape[1] == counts.get(g, 0)
            assert torch.count_nonzero(new) == 0
        assert torch.equal(shared[key][:old_slots], old_shared[key])
        assert torch.count_nonzero(shared[key][old_slots:]) == 0
    assert float(group["step"]) == 3.0 and float(shared["step"]) == 3.0
    # shared: group 0 re-uses slot 1 (freed by it, still used by others), then creates slot 3; group 2 re-uses slot 3
    fresh = 3 if layout == "own" else 1
    assert layer.n_slots == old_slots + fresh


@pytest.mark.parametrize(
    "make_scheduler, expected_lr",
    [
        (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s), lambda s: 0.1 * 0.5**s),
        (
            lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8),
            lambda s: 0.1 * (1 + torch.cos(torch.tensor(s * torch.pi / 8)).item()) / 2,
        ),
    ],
    ids=["LambdaLR", "CosineAnnealingLR"],
)
def test_lr_scheduler_keeps_working_after_a_resize(make_layer, split, layout, make_scheduler, expected_lr):
    layer = make_layer(split, layout)
    opt = torch.optim.AdamW(layer.adapter_parameters(), lr=0.1, weight_decay=0.01)
    scheduler = make_scheduler(opt)
    x, y = _x(layer), torch.randn(6, layer.out_features)
    for step in range(1, 7):
        if step == 3:
            layer.remove_slots(REMOVE, optimizer=opt)
        if step == 5:
            layer.add_slots({1: 1, 2: 2}, optimizer=opt)
        before = [p.detach().clone() for p in layer.adapter_parameters()]
        _adamw_steps(layer, opt, x, y, 1)
        scheduler.step()
        assert all((p - b).abs().max() > 0 for p, b in zip(layer.adapter_parameters(), before, strict=True))
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lr(step), rel=1e-6)
    assert layer.ranks == [2, 4, 3, 3]


# ---------------------------------------------------------------- the key equivalence: remove == gate


def test_training_after_removal_equals_training_with_those_slots_gated_off(make_layer, split, layout):
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(11))
    y = torch.randn(16, 32, generator=torch.Generator().manual_seed(12))
    layer_a = make_layer(split, layout, scaling=2.0)
    layer_b = copy.deepcopy(layer_a)
    opt_a = torch.optim.AdamW(layer_a.adapter_parameters(), lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(layer_b.adapter_parameters(), lr=1e-2, weight_decay=0.1)
    positions = {0: [1], 1: [0, 2], 3: [0, 1, 2]}
    k_a, _ = _adamw_steps(layer_a, opt_a, x, y, 4)
    k_b, _ = _adamw_steps(layer_b, opt_b, x, y, 4)
    assert torch.equal(k_a, k_b) and k_a[-1] < k_a[0]
    kept_slots, kept_columns = _kept_indices(layer_b, positions)
    layer_a.remove_slots(positions, optimizer=opt_a)
    layer_b.set_gate(_fixed_gate(_mask(layer_b, positions)))
    m_a, out_a = _adamw_steps(layer_a, opt_a, x, y, 6)
    m_b, out_b = _adamw_steps(layer_b, opt_b, x, y, 6)
    torch.testing.assert_close(m_a, m_b, atol=1e-5, rtol=1e-5)
    for oa, ob in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(oa, ob, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer_a.shared_weight, layer_b.shared_weight[kept_slots], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer_a.group_weight, layer_b.group_weight[:, kept_columns], atol=1e-5, rtol=1e-5)
    assert (m_a[-1] - k_a[-1]).abs() > 1e-4  # the m steps did train


def _bert_setup(layout):
    model = tiny_bert()
    dynarank.attach(
        model,
        DynaRankConfig(
            target_modules=["query", "value", "attention.output.dense", "intermediate.dense"],
            r=3,
            lora_alpha=6,
            head_layout=layout,
        ),
    )
    randomize_adapters(model, scale=0.1)
    return model


def _bert_steps(model, opt, ids, labels, steps):
    losses, logits = [], []
    for _ in range(steps):
        opt.zero_grad()
        out = model(ids).logits
        loss = F.cross_entropy(out, labels)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        logits.append(out.detach())
    return torch.stack(losses), logits


def test_on_a_tiny_model_removal_and_gating_train_identically(layout):
    model_a = _bert_setup(layout)
    model_b = copy.deepcopy(model_a)
    ids, labels = token_batch(batch=4), torch.tensor([0, 1, 1, 0])
    opt_a = torch.optim.AdamW([p for p in model_a.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.05)
    opt_b = torch.optim.AdamW([p for p in model_b.parameters() if p.requires_grad], lr=5e-3, weight_decay=0.05)
    _bert_steps(model_a, opt_a, ids, labels, 3)
    _bert_steps(model_b, opt_b, ids, labels, 3)
    layers_a, layers_b = dynarank.elastic_layers(model_a), dynarank.elastic_layers(model_b)
    kept = {}
    for i, (name, layer_b) in enumerate(layers_b.items()):
        positions = {g: list(range((g + i) % 3)) for g in range(layer_b.n_groups)}
        kept[name] = _kept_indices(layer_b, positions)
        layers_a[name].remove_slots(positions, optimizer=opt_a)
        layer_b.set_gate(_fixed_gate(_mask(layer_b, positions)))
    before = dynarank.adapter_parameter_count(model_a)
    assert before < dynarank.adapter_parameter_count(model_b)
    loss_a, logits_a = _bert_steps(model_a, opt_a, ids, labels, 4)
    loss_b, logits_b = _bert_steps(model_b, opt_b, ids, labels, 4)
    torch.testing.assert_close(loss_a, loss_b, atol=1e-5, rtol=1e-5)
    for la, lb in zip(logits_a, logits_b, strict=True):
        torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    for name, (slots, columns) in kept.items():
        torch.testing.assert_close(
            layers_a[name].shared_weight, layers_b[name].shared_weight[slots], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            layers_a[name].group_weight, layers_b[name].group_weight[:, columns], atol=1e-5, rtol=1e-5
        )
    torch.testing.assert_close(model_a.classifier.weight, model_b.classifier.weight, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- optim_state.reindex_parameter


def _reindexed(param, *args, **kwargs):
    """The resized parameter: the returned one, or ``param`` itself if resized in place."""
    result = reindex_parameter(param, *args, **kwargs)
    return param if result is None else result


def test_reindex_parameter_reorders_drops_and_appends_with_the_optimizer_state():
    p = torch.nn.Parameter(torch.arange(6.0).view(2, 3))
    other = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.Adam([p, other], lr=0.1, amsgrad=True)
    p.grad, other.grad = torch.arange(1.0, 7.0).view(2, 3), torch.ones(4)
    opt.step()
    old = {k: v.clone() for k, v in opt.state[p].items()}
    other_state = {k: v.clone() for k, v in opt.state[other].items()}
    values = p.detach().clone()
    p = _reindexed(p, 1, torch.tensor([2, 0, 3]), torch.tensor([[10.0], [11.0]]), optimizer=[opt])
    assert p.grad is None and p.requires_grad
    assert opt.param_groups[0]["params"][0] is p and opt.param_groups[0]["params"][1] is other
    assert torch.equal(p.detach(), torch.stack([values[:, 2], values[:, 0], torch.tensor([10.0, 11.0])], 1))
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        expected = torch.stack([old[key][:, 2], old[key][:, 0], torch.zeros(2)], 1)
        assert torch.equal(opt.state[p][key], expected), key
    assert torch.equal(opt.state[p]["step"], old["step"])
    assert all(torch.equal(opt.state[other][k], v) for k, v in other_state.items())
    p = _reindexed(p, 0, torch.tensor([1]), optimizer=opt)
    assert torch.equal(p.detach(), torch.tensor([[values[1, 2], values[1, 0], 11.0]]))
    assert torch.equal(opt.state[p]["exp_avg"], torch.tensor([[old["exp_avg"][1, 2], old["exp_avg"][1, 0], 0.0]]))
    p.grad = torch.ones_like(p)
    opt.step()  # the optimizer keeps working on the resized parameter
    assert float(opt.state[p]["step"]) == 2.0
    fresh = _reindexed(torch.nn.Parameter(torch.arange(6.0).view(3, 2)), 0, torch.tensor([2, 2]))
    assert torch.equal(fresh.detach(), torch.tensor([[4.0, 5.0], [4.0, 5.0]]))
