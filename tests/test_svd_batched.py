"""The SVD methods' batched per-step work against straightforward references, through resizes.

The orthogonality gradient (one gather per width, indices cached per layout) against autograd of
``orthogonality_penalty``; the plan is kept across a resize, which must rebuild it. The gate (a view of E, or one
index into E, worked out once per layout) against the module's span of E gathered by ``column_index``. The rank
scores of every module at once (``TripletPlan``) against ``importance.triplet_scores`` module by module, bitwise;
ElaLoRA's candidates (two stable sorts over every rank) against each group's own stable argsort, ties included.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynarank import DynaRankConfig, attach, build_controller, elastic_layers
from dynarank.controllers.importance import triplet_scores
from dynarank.controllers.orthogonality import OrthogonalityPlan, orthogonality_gradients, orthogonality_penalty
from tiny_models import randomize_adapters, tiny_bert

TARGETS = ["query", "value", "attention.output.dense", "intermediate.dense"]  # rows and cols splits, two widths


def _model(layout: str):
    model = tiny_bert()
    config = DynaRankConfig(
        method="elalora", r=3, target_modules=TARGETS, granularity="head", head_layout=layout, seed=0
    )
    attach(model, config)
    ctrl = build_controller(model, total_steps=50)
    randomize_adapters(model, seed=1)
    return model, ctrl


def _reference(layers, weight):
    params = [p for layer in layers for p in layer.adapter_parameters()]
    for p in params:
        p.grad = None
    penalty = orthogonality_penalty(layers)
    (weight * penalty).backward()
    grads = {id(p): p.grad.clone() for p in params if p.grad is not None}  # none for a module without ranks
    for p in params:
        p.grad = None
    return penalty.detach(), grads


def _check(layers, plan, weight=0.1):
    expected_penalty, expected = _reference(layers, weight)
    penalty, updates = orthogonality_gradients(layers, weight, plan)
    torch.testing.assert_close(penalty, expected_penalty)
    assert len(updates) == 2 * sum(layer.max_rank > 0 for layer in layers)
    for p, grad in updates:
        assert grad.shape == p.shape
        torch.testing.assert_close(grad, expected[id(p)])


@pytest.mark.parametrize("layout", ["own", "shared"])
def test_the_orthogonality_gradient_is_autograd_of_the_penalty_before_and_after_resizes(layout):
    model, ctrl = _model(layout)
    layers = list(elastic_layers(model).values())
    plan = OrthogonalityPlan()
    _check(layers, plan)  # equal ranks: the dense case
    widths = plan.widths
    _check(layers, plan)
    assert plan.widths is widths  # the same layout: the gathers are reused

    # Uneven ranks (some groups down to one, others grown): every gather goes through the padded indices.
    names = list(elastic_layers(model))
    prune = {names[0]: {0: [0, 2], 1: [1]}, names[2]: {2: [0]}, names[3]: {0: [1]}}
    ctrl.resize(prune, {names[1]: {0: 2}, names[2]: {1: 1}, names[4]: {0: 1, 3: 2}})
    randomize_adapters(model, seed=2)
    layers = list(elastic_layers(model).values())
    _check(layers, plan)
    assert plan.widths is not widths  # the resize bumped the layouts: rebuilt


def _widths_equal(a, b):
    return (
        a.side == b.side
        and torch.equal(a.index, b.index)
        and torch.equal(a.eye, b.eye)
        and torch.equal(a.live, b.live)
        and len(a.params) == len(b.params)
        and all(x is y for x, y in zip(a.params, b.params))
    )


def test_a_resize_rebuilds_only_the_widths_it_touches_and_a_module_without_ranks_leaves_its_widths():
    model, ctrl = _model("own")
    names = list(elastic_layers(model))
    layers = list(elastic_layers(model).values())
    plan = OrthogonalityPlan()
    _check(layers, plan)
    before = list(plan.widths)

    ctrl.resize({names[0]: {0: [1]}}, {})  # one module: only the widths holding it are gathered again
    layers = list(elastic_layers(model).values())
    _check(layers, plan)
    touched = elastic_layers(model)[names[0]]
    for old, new in zip(before, plan.widths):
        assert (new is old) != any(layer is touched for layer in new.layers)

    # A module loses its last rank: it leaves its widths, also the ones no other change touched.
    emptied = elastic_layers(model)[names[1]]
    ctrl.resize({names[1]: {g: list(range(r)) for g, r in enumerate(emptied.ranks)}}, {})
    assert emptied.max_rank == 0
    layers = list(elastic_layers(model).values())
    _check(layers, plan)
    fresh = OrthogonalityPlan().widths_for(layers)
    assert len(plan.widths) == len(fresh)
    assert all(_widths_equal(a, b) for a, b in zip(plan.widths, fresh))
    assert not any(layer is emptied for w in plan.widths for layer in w.layers)


def test_a_move_to_another_dtype_that_keeps_the_parameters_rebuilds_the_plans():
    model, ctrl = _model("own")
    layers = list(elastic_layers(model).values())
    plan = OrthogonalityPlan()
    _check(layers, plan)
    _set_random_importance(ctrl, 0)
    _check_triplets(ctrl)
    shared = layers[0].shared_weight
    model.double()  # the same Parameter objects, their data now float64
    assert layers[0].shared_weight is shared and shared.dtype == torch.float64
    _check(layers, plan)  # gathers of float32 would not match the float64 factors
    assert all(w.eye.dtype == torch.float64 for w in plan.widths)
    _set_random_importance(ctrl, 1)
    _check_triplets(ctrl)


def _check_gates(model):
    values = model.dynarank_svd
    x = {name: torch.randn(layer.column_index.shape) for name, layer in elastic_layers(model).items()}
    values.values.grad = None
    sum((layer.gate() * x[name]).sum() for name, layer in elastic_layers(model).items()).backward()
    got = values.values.grad.clone()
    values.values.grad = None
    expected = 0
    for name, layer in elastic_layers(model).items():
        reference = F.pad(values.of(name), (0, 1))[layer.column_index]  # padded slots read a zero
        assert torch.equal(layer.gate(), reference)
        expected = expected + (reference * x[name]).sum()
    expected.backward()
    assert torch.equal(got, values.values.grad)
    values.values.grad = None


@pytest.mark.parametrize("layout", ["own", "shared"])
def test_the_gate_reads_each_module_s_span_of_e_before_and_after_resizes(layout):
    model, ctrl = _model(layout)
    with torch.no_grad():
        model.dynarank_svd.values.copy_(torch.randn(model.dynarank_svd.values.shape))
    _check_gates(model)
    names = list(elastic_layers(model))
    ctrl.resize({names[0]: {0: [0, 2], 1: [1]}, names[5]: {2: [0]}}, {names[1]: {0: 2}, names[4]: {0: 1, 3: 2}})
    with torch.no_grad():
        model.dynarank_svd.values.copy_(torch.randn(model.dynarank_svd.values.shape))
    _check_gates(model)


def _gated_loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss = 0.0
    for layer in elastic_layers(model).values():
        loss = loss + (layer(torch.randn(2, 3, layer.in_features, generator=g)) ** 2).mean()
    return loss


def _reference_e_grad(model, seed=0):
    """E's gradient with every module reading its own slice of E (no shared split)."""
    values = model.dynarank_svd
    values.pieces = lambda: {n: values.values[a:b] for n, (a, b) in values.spans.items()}
    try:
        values.values.grad = None
        _gated_loss(model, seed).backward()
        return values.values.grad.clone()
    finally:
        del values.pieces
        values.values.grad = None


def test_the_split_serves_micro_batches_and_is_cut_anew_after_a_step_an_eval_or_a_resize():
    model, ctrl = _model("shared")
    values = model.dynarank_svd
    e = values.values
    first = values.pieces()
    assert values.pieces() is first  # one split per version of E
    _gated_loss(model, 0).backward()  # two micro-batches of one step: the second backward goes through the same split
    _gated_loss(model, 1).backward()
    accumulated = e.grad.clone()
    e.grad = None
    expected = _reference_e_grad(model, 0) + _reference_e_grad(model, 1)
    assert torch.equal(accumulated, expected)
    with torch.no_grad():
        evaluated = values.pieces()
        e.add_(0.1)  # an optimizer step
    assert evaluated is not first  # cut under no_grad: its own pieces
    stepped = values.pieces()
    assert stepped is not first and stepped is not evaluated
    _gated_loss(model).backward()  # after a forward under no_grad, E still gets its gradient
    assert e.grad is not None and bool(e.grad.any())
    names = list(elastic_layers(model))
    ctrl.resize({names[0]: {0: [0]}}, {})
    resized = values.pieces()
    assert (
        values.values is not e and resized[names[0]].shape[0] == elastic_layers(model)[names[0]].group_weight.shape[1]
    )


def _set_random_importance(ctrl, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ctrl._scored_parameters():
        ctrl.importance.set_state(p, torch.rand(p.shape, generator=g), torch.rand(p.shape, generator=g))


def _check_triplets(ctrl):
    got = ctrl.triplet_scores()
    score = ctrl.importance.score
    values = ctrl.values.split(score(ctrl.values.values))
    for name, layer in ctrl.layers.items():
        expected = triplet_scores(layer, score(layer.shared_weight), score(layer.group_weight), values[name])
        assert len(got[name]) == len(expected)
        for a, b in zip(got[name], expected):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("layout", ["own", "shared"])
def test_the_batched_rank_scores_are_bitwise_the_module_by_module_ones_before_and_after_resizes(layout):
    model, ctrl = _model(layout)
    _set_random_importance(ctrl, 0)
    _check_triplets(ctrl)
    gathers = ctrl._triplets.row_gather
    _check_triplets(ctrl)
    assert ctrl._triplets.row_gather is gathers  # the same layout: the gathers are reused, not built again
    names = list(elastic_layers(model))
    ctrl.resize({names[0]: {0: [0, 2], 1: [1]}, names[3]: {0: [1]}}, {names[2]: {1: 1}, names[4]: {0: 1, 3: 2}})
    _set_random_importance(ctrl, 1)
    _check_triplets(ctrl)
    assert ctrl._triplets.row_gather is not gathers  # the resize bumped the layouts: built again
    # the packed path: every parameter has EMAs in the flat buffers, the scores are views of one product
    for p in ctrl._scored_parameters():
        p.grad = torch.randn(p.shape)
    ctrl.importance.update()
    _check_triplets(ctrl)
    # a module without ranks (its A and B empty) leaves the others' scores on the packed path, bitwise the same
    emptied = elastic_layers(model)[names[1]]
    ctrl.resize({names[1]: {g: list(range(r)) for g, r in enumerate(emptied.ranks)}}, {})
    for p in ctrl._scored_parameters():
        p.grad = torch.randn(p.shape)
    ctrl.importance.update()
    packed = ctrl.importance._packed
    _check_triplets(ctrl)
    assert packed is not None and ctrl.importance._packed is packed  # read from the packed EMAs, not rebuilt


def test_elalora_candidates_are_each_group_s_lowest_by_a_stable_argsort_ties_included():
    model, ctrl = _model("own")
    names = list(elastic_layers(model))
    ctrl.resize({names[0]: {0: [0, 1, 2]}}, {names[2]: {1: 2}}, None)  # a group at 1 rank, one at 5
    g = torch.Generator().manual_seed(3)
    scores = {
        name: [torch.randint(0, 4, (r,), generator=g).float() for r in layer.ranks]  # many ties
        for name, layer in elastic_layers(model).items()
    }
    order = {name: i for i, name in enumerate(scores)}
    expected = []
    for name, groups in scores.items():
        for group, s in enumerate(groups):
            k = min(ctrl.config.k_candidates, len(s) - ctrl.group_floor())
            for j in torch.argsort(s, stable=True)[: max(k, 0)].tolist():
                expected.append((float(s[j]), order[name], group, j))
    got = [(c.score, order[c.module], c.group, c.position) for c in ctrl.candidates(scores)]
    assert got == sorted(expected)


def test_the_views_follow_a_move_of_the_flat_tensor_to_another_dtype():
    model, _ = _model("shared")
    values = model.dynarank_svd
    before = values.pieces()
    model.to(torch.float64)
    after = values.pieces()
    assert after is not before and all(v.dtype == torch.float64 for v in after.values())
    name = next(iter(after))
    assert after[name].data_ptr() == values.values.data_ptr()


def test_a_resize_keeps_e_in_its_own_group_at_its_rate():
    model = tiny_bert()
    attach(model, DynaRankConfig(method="elalora", r=3, target_modules=TARGETS, values_lr_ratio=30.0, seed=0))
    ctrl = build_controller(model, total_steps=50)
    optimizer = ctrl.build_optimizer(lr=1e-3)
    names = list(elastic_layers(model))
    ctrl.resize({names[0]: {0: [0]}}, {names[1]: {0: 1}})
    e = model.dynarank_svd.values
    adapters, values = optimizer.param_groups
    assert (
        values["name"] == "E"
        and len(values["params"]) == 1
        and values["params"][0] is e
        and values["lr"] == pytest.approx(3e-2)
    )
    assert not any(p is e for p in adapters["params"]) and adapters["lr"] == 1e-3
