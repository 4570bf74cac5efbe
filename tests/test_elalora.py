"""ElaLoRA controller: importance scores, prune-and-expand rounds, near-no-op orthogonal growth, carried moments."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from torch import nn

import dynarank
from dynarank import DynaRankConfig, attach, build_controller, elastic_layers
from dynarank.controllers.schedules import BudgetSchedule
from planted_task import make_planted_task, train_planted
from tiny_models import tiny_bert, train_on_one_batch


def planted(r=3, steps=40, **config):
    """The planted-rank student (one 'query' projection, 8 heads of 16, d_in 64) with ElaLoRA attached."""
    task = make_planted_task(seed=0)
    model = task.student()
    config = {"granularity": "head", **config}  # one group per head of the planted projection
    attach(model, DynaRankConfig(method="elalora", r=r, target_modules=["query"], seed=0, **config))
    return task, model, build_controller(model, total_steps=steps)


def train(model, task, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g)
        ((model(x) - task.targets(x)) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


class TwoLayer(nn.Module):
    """x -> first (4 -> 6) -> second (6 -> 3): two adapted matrices."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 6, bias=False)
        self.second = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.second(self.first(x))


# ---------------------------------------------------------------- importance


def test_importance_scores_match_a_hand_computation_on_a_two_layer_toy():
    model = TwoLayer()
    attach(model, DynaRankConfig(method="elalora", r=2, granularity="matrix", target_modules=["first", "second"]))
    ctrl = build_controller(model, total_steps=20)
    layers = elastic_layers(model)
    g = torch.Generator().manual_seed(0)
    tracked = {}  # (module, factor) -> parameter;  rows split: A = shared (r, d_in), B = group (d_out, r)
    for name, layer in layers.items():
        tracked[name, "A"], tracked[name, "B"] = layer.shared_weight, layer.group_weight
        tracked[name, "E"] = model.dynarank_svd.of(name)
    with torch.no_grad():
        for p in tracked.values():
            p.copy_(torch.randn(p.shape, generator=g))
    grads = [{k: torch.randn(p.shape, generator=g) for k, p in tracked.items()} for _ in range(2)]
    values = model.dynarank_svd  # E of every module is one vector: its gradient is set as one
    for step_grads in grads:  # two steps with known gradients
        for k, p in tracked.items():
            if k[1] != "E":
                p.grad = step_grads[k].clone()
        values.values.grad = torch.cat([step_grads[name, "E"] for name in values.spans])
        ctrl.importance.update()

    def element_score(key, index):
        w = float(tracked[key].detach()[index])
        ibar = ubar = 0.0
        for step_grads in grads:
            i = abs(w * float(step_grads[key][index]))
            ibar = 0.85 * ibar + 0.15 * i
            ubar = 0.85 * ubar + 0.15 * abs(i - ibar)
        return ibar * ubar

    scores = ctrl.triplet_scores()
    for name, layer in layers.items():
        d_out, d_in = layer.out_features, layer.in_features
        for i in range(2):  # rank i: s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)
            expected = (
                element_score((name, "E"), (i,))
                + sum(element_score((name, "A"), (i, j)) for j in range(d_in)) / d_in
                + sum(element_score((name, "B"), (j, i)) for j in range(d_out)) / d_out
            )
            assert scores[name][0][i].item() == pytest.approx(expected, rel=1e-5)


def test_scores_are_updated_after_every_step_until_t_final_and_then_freed():
    task, model, ctrl = planted(steps=20, t_init_steps=4, t_final_steps=6, resize_every=5)
    opt = ctrl.build_optimizer(lr=1e-2)
    layer = elastic_layers(model)["query"]
    train(model, task, opt, 3)
    assert ctrl.importance.score(layer.group_weight).sum() > 0
    train(model, task, opt, 11)  # t = 14 = T - t_final
    assert ctrl.importance.carrier.state == {}


# ---------------------------------------------------------------- one round


def test_a_round_prunes_the_lowest_candidates_and_grows_the_groups_of_the_highest():
    task, model, ctrl = planted(r=3, k_candidates=2)
    layer = elastic_layers(model)["query"]
    rows_before = layer.shared_weight.detach().clone()  # (24, 64): head h owns rows 3h..3h+2
    scores = [
        [0.5, 0.1, 0.9],  # candidates (k=2): 0.1, 0.5
        [0.2, 0.8, 0.7],  # 0.2, 0.7
        [5.0, 6.0, 7.0],  # 5, 6
        [3.0, 0.05, 4.0],  # 0.05, 3
        [1.1, 1.2, 9.0],
        [2.1, 2.2, 9.0],
        [8.0, 8.5, 9.5],  # 8, 8.5: the two highest candidates
        [4.1, 4.2, 9.0],
    ]
    record = ctrl.reallocate({"query": [torch.tensor(s) for s in scores]}, b=3)
    # pruned: 0.05 (head 3, pos 1), 0.1 (head 0, pos 1), 0.2 (head 1, pos 0);
    # grown: head 6 (8.5 and 8.0) twice, head 2 (6.0) once. Excluded from growth: 9.x are not candidates.
    assert layer.ranks == [2, 2, 4, 2, 3, 3, 5, 3]
    assert sum(layer.ranks) == 24 and (record.pruned, record.expanded) == (3, 3)  # total rank conserved
    kept_rows = {0: [0, 2], 1: [4, 5], 3: [9, 11]}
    for head, rows in kept_rows.items():
        assert torch.equal(layer.shared_weight[layer.slots[head]].detach(), rows_before[rows])
    assert [h["total_rank"] for h in ctrl.history] == [24] * len(ctrl.history)


def test_candidates_are_capped_at_rank_minus_one_and_rank_one_groups_offer_none():
    task, model, ctrl = planted(r=3, k_candidates=5)
    layer = elastic_layers(model)["query"]
    layer.remove_slots({0: [1, 2], 1: [2]})  # ranks [1, 2, 3, ...]; E is re-cut by the controller only
    ctrl.values.match_layout(ctrl.layers)
    scores = {"query": [torch.arange(r, dtype=torch.float32) for r in layer.ranks]}
    offered = {}
    for c in ctrl.candidates(scores):
        offered[c.group] = offered.get(c.group, 0) + 1
    assert 0 not in offered and offered[1] == 1 and offered[2] == 2


def test_with_switch_off_a_rank_one_group_offers_its_last_rank_and_can_end_at_zero():
    task, model, ctrl = planted(r=1, k_candidates=2, switch_off=True)
    layer = elastic_layers(model)["query"]
    record = ctrl.reallocate({"query": [torch.tensor([float(g)]) for g in range(8)]}, b=2)
    # heads 0 and 1 (the lowest) are switched off; heads 7 and 6 (the highest) gain a rank each
    assert layer.ranks == [0, 0, 1, 1, 1, 1, 2, 2] and (record.pruned, record.expanded) == (2, 2)
    assert {c.group for c in ctrl.candidates(ctrl.triplet_scores())} == set(range(2, 8))  # 0 offers nothing
    opt = ctrl.build_optimizer(lr=1e-2)
    train(model, task, opt, 5)  # training goes on with two heads at rank 0
    assert layer.ranks[:2] == [0, 0] and sum(layer.ranks) == 8


def test_switch_off_takes_a_whole_matrix_to_zero_and_the_export_still_reloads(tmp_path):
    model = tiny_bert()
    config = DynaRankConfig(
        method="elalora", r=1, granularity="matrix", switch_off=True, target_modules=["query", "key"]
    )
    attach(model, config)
    ctrl = build_controller(model, total_steps=40)
    names = list(elastic_layers(model))
    ctrl.reallocate({name: [torch.tensor([float(i)])] for i, name in enumerate(names)}, b=1)
    assert [sum(elastic_layers(model)[n].ranks) for n in names] == [0, 1, 1, 2]  # 2 layers x query, key
    opt = ctrl.build_optimizer(lr=1e-2)
    x = train_on_one_batch(model, opt, 5)
    _assert_export_matches(model, x, tmp_path / "adapter")


def test_switch_off_is_elalora_s_option_only():
    with pytest.raises(ValueError, match="switch_off: not used by method 'ard'"):
        DynaRankConfig(method="ard", switch_off=True)
    with pytest.raises(ValueError, match="switch_off: must be True or False"):
        DynaRankConfig(method="elalora", switch_off="yes")


def test_no_group_offers_the_ranks_that_keep_it_at_its_floor():
    task, model, ctrl = planted(r=3, k_candidates=5, rank_floor=2)
    scores = {"query": [torch.arange(3, dtype=torch.float32) for _ in range(8)]}
    offered = {}
    for c in ctrl.candidates(scores):
        offered[c.group] = offered.get(c.group, 0) + 1
    assert offered == {g: 1 for g in range(8)}  # rank 3, floor 2: one rank each


def test_the_number_of_changes_decays_cubically_and_rounds_follow_the_interval():
    task, model, ctrl = planted(steps=100, t_init_steps=10, t_final_steps=20, resize_every=10, b_changes=4)
    opt = ctrl.build_optimizer(lr=1e-2)
    train(model, task, opt, 100)
    pruned = {r.step: r.pruned for r in ctrl.records if r.resized}
    expanded = {r.step: r.expanded for r in ctrl.records if r.resized}
    # rounds at t > t_init with (t - t_init) % 10 == 0; b(t) = round(4 (1 - p^3)), p = (t - 10) / 70,
    # which is 0 at T - t_final = 80: e.g. t = 50: p = 4/7, 4 (1 - 0.187) = 3.25 -> 3
    assert pruned == expanded == {20: 4, 30: 4, 40: 4, 50: 3, 60: 3, 70: 1}
    assert all(r.total_rank == 24 for r in ctrl.records)


# ---------------------------------------------------------------- growth


@pytest.mark.parametrize("layout", ["own", "shared"])
def test_an_expansion_leaves_outputs_unchanged_and_the_new_rank_is_orthogonal(layout):
    model = tiny_bert()
    targets = ["query", "attention.output.dense"]  # rows (A shared) and cols (B shared)
    config = DynaRankConfig(
        method="elalora", r=2, target_modules=targets, granularity="head", head_layout=layout, seed=0
    )
    attach(model, config)
    ctrl = build_controller(model, total_steps=50)
    opt = ctrl.build_optimizer(lr=1e-2)
    x = train_on_one_batch(model, opt, 5)
    with torch.no_grad():
        before = model(input_ids=x).logits
    grow = {name: {0: 2, 3: 1} for name in elastic_layers(model)}
    ctrl.resize({}, grow)
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert (after - before).abs().max() <= 1e-6
    for name, layer in elastic_layers(model).items():
        assert layer.ranks == [4, 2, 2, 3]
        offsets = [0, 4, 6, 8]
        for g, new in ((0, [2, 3]), (3, [2])):
            group_rows = layer.group_weight[:, offsets[g] : offsets[g] + layer.ranks[g]].t().detach()  # (r_g, d_g)
            shared_rows = layer.shared_weight[layer.slots[g]].detach()  # (r_g, d_other)
            for rows, fresh in ((group_rows, True), (shared_rows, layout == "own")):
                if not fresh:
                    continue  # a reused shared slot keeps its row (other heads use it)
                gram = rows @ rows.t()
                for j in new:
                    others = [i for i in range(layer.ranks[g]) if i != j]
                    assert gram[j, j].item() == pytest.approx(1.0, abs=1e-5)
                    assert gram[j, others].abs().max() <= 1e-5, (name, g, j)
        e = model.dynarank_svd.of(name).detach()
        assert torch.all(e[[2, 3, 10]] == 1e-13)


def test_a_group_never_grows_beyond_its_orthogonal_capacity():
    task, model, ctrl = planted(r=3)
    layer = elastic_layers(model)["query"]
    assert ctrl.capacity(layer) == 16  # min(head size 16, d_in 64)
    scores = {"query": [torch.tensor([1.0, 2.0, 3.0]) * (h + 1) for h in range(8)]}
    layer.add_slots({7: 13})  # head 7 at its capacity (E re-cut to match)
    ctrl.values.match_layout(ctrl.layers)
    scores["query"][7] = torch.arange(16, dtype=torch.float32) + 100.0
    prune, grow = ctrl.plan(scores, b=2)
    assert 7 not in grow.get("query", {})  # its candidates are the highest, but it is full
    assert prune == {"query": {0: [0, 1]}} and grow == {"query": {6: 1, 5: 1}}  # next highest: 14, 12


# ---------------------------------------------------------------- optimizer state


def _moments_by_rank(opt, layer, values):
    """{(group, id of the rank): (A row moment, B column moment, E moment)} with ids from the slot layout."""
    out, offset = {}, 0
    for g, slots in enumerate(layer.slots):
        for j, s in enumerate(slots):
            c = offset + j
            out[g, j] = (
                opt.state[layer.shared_weight]["exp_avg"][s].clone(),
                opt.state[layer.group_weight]["exp_avg"][:, c].clone(),
                opt.state[values]["exp_avg"][c].clone(),
            )
        offset += len(slots)
    return out


@pytest.mark.parametrize("reset", [False, True])
def test_optimizer_moments_of_kept_ranks_survive_a_round_unless_the_reset_flag_is_set(reset):
    task, model, ctrl = planted(r=3, reset_optimizer_on_resize=reset)
    opt = ctrl.build_optimizer(lr=1e-2)
    train(model, task, opt, 4)
    layer = elastic_layers(model)["query"]
    values = model.dynarank_svd.values  # E of every module as one parameter (here: one module)
    before = _moments_by_rank(opt, layer, values)
    ctrl.resize({"query": {0: [1], 5: [0, 2]}}, {"query": {2: 1, 7: 2}})
    assert layer.ranks == [2, 3, 4, 3, 3, 1, 3, 5]
    if reset:
        assert all(not opt.state[p] for p in [*layer.adapter_parameters(), model.dynarank_svd.values])
        return
    after = _moments_by_rank(opt, layer, model.dynarank_svd.values)
    kept = {0: [0, 2], 5: [1]}  # positions that survive in the pruned heads; other heads keep 0, 1, 2
    for (g, j), moments in after.items():
        source = kept.get(g, [0, 1, 2])
        if j >= len(source):  # appended to heads 2 and 7: zero moments
            assert all(torch.count_nonzero(m) == 0 for m in moments), (g, j)
            continue
        for new, old in zip(moments, before[g, source[j]]):
            assert torch.equal(new, old), (g, j)


# ---------------------------------------------------------------- runs, export, granularity


@pytest.mark.parametrize("granularity", ["head", "matrix"])
def test_elalora_trains_per_head_or_per_matrix_and_conserves_the_total_rank(granularity):
    model = tiny_bert()
    attach(model, DynaRankConfig(method="elalora", r=3, target_modules=["query", "value"], granularity=granularity))
    ctrl = build_controller(model, total_steps=30)
    opt = ctrl.build_optimizer(lr=1e-2)
    start = ctrl.total_rank()
    train_on_one_batch(model, opt, 30)
    assert ctrl.total_rank() == start
    assert ctrl.rank_changes > 0
    assert {"total_rank", "adapter_parameters", "ranks"} <= set(ctrl.history[-1])
    assert ctrl.finalized and not hasattr(model, "dynarank_svd")  # E folded into B after the last step


def test_a_parameter_ceiling_is_never_exceeded():
    task, model, ctrl = planted(r=3, steps=100, target_params=2000)
    opt = ctrl.build_optimizer(lr=1e-2)
    train(model, task, opt, 100)
    assert all(r.adapter_parameters <= 2000 and r.budget == 2000 for r in ctrl.records)
    assert ctrl.records[-1].budget_unit == "params" and ctrl.records[-1].total_rank > 0


@pytest.mark.parametrize("budget", [{"target_rank": 1.5}, {"target_params": 1500}])
def test_starting_above_the_budget_prunes_into_it_on_the_cubic_schedule_while_still_reallocating(budget):
    task, model, ctrl = planted(r=3, steps=100, **budget)  # 8 heads x 3 ranks: 24 ranks, 2,304 parameters
    target = 12 if "target_rank" in budget else 1500
    assert ctrl.shrinks and ctrl.target_budget == target and ctrl.budget_at(0) == ctrl.start_budget
    opt = ctrl.build_optimizer(lr=1e-2)
    train(model, task, opt, 100)
    end, unit = ctrl.schedule.end, ctrl.records[-1].budget_unit
    used = {r.step: (r.total_rank if unit == "rank" else r.adapter_parameters) for r in ctrl.records}
    budgets = [ctrl.budget_at(t) for t in range(1, 101)]
    assert budgets == sorted(budgets, reverse=True) and budgets[end - 1] == target  # monotone, reached at the end
    assert all(used[t] <= ctrl.budget_at(t) for t in ctrl.schedule.rounds(force_end=True))  # held after each round
    assert used[end] <= target and used[100] == used[end]  # nothing moves after T - t_final
    assert used[end] > 0.9 * target  # pruned to the budget, not far below it
    assert ctrl.rank_changes > 24 - ctrl.records[-1].total_rank  # more changes than the net pruning: swaps too
    assert min(min(r) for r in ctrl.history[-1]["ranks"].values()) >= 1  # no head pruned off (no switch_off)


@pytest.mark.parametrize("target", [200, 240])
def test_a_shrinking_parameter_budget_in_the_shared_head_layout_is_reached_with_the_heads_on_common_rows(target):
    """The heads share A's rows (head_layout='shared'): a row is paid once whichever heads use it, so the floor checked
    up front (192: one row of 64, 8 heads x one column of 16) has every head's last rank on the same row. Pruning and
    swapping by score alone left the heads' last ranks on different rows, which no pruning can move onto one: the
    run ended at 256 or 320 parameters, above the budget it had accepted, with no warning."""
    kw = {"head_layout": "shared", "target_params": target, "t_init_steps": 5, "t_final_steps": 10, "resize_every": 3}
    task, model, ctrl = planted(r=3, **kw)  # 576 parameters at the start
    opt = ctrl.build_optimizer(lr=1e-2)
    train(model, task, opt, 40)
    assert all(r.adapter_parameters <= r.budget for r in ctrl.records if r.resized)  # every round holds its budget
    assert ctrl.records[-1].adapter_parameters <= target and ctrl.run_warnings() == []
    assert ctrl.rank_changes > 24 - ctrl.records[-1].total_rank  # still swapping while it shrinks
    assert ctrl.shrinks and ctrl.shared_slots(1) is not None  # below 640: 8 heads' ranks on rows of their own


def test_with_switch_off_a_parameter_budget_below_one_rank_is_refused():
    """Every head may give up its last rank, but the model keeps one: the floor checked was 0 ranks (1 parameter), so
    a budget below one rank (16 + 64 = 80) was accepted and never reached."""
    message = r"^target_params: .*\(50 params\) is below 80, one rank of the cheapest layer \(the model keeps one\)"
    with pytest.raises(ValueError, match=message):
        planted(switch_off=True, target_params=50)
    assert planted(switch_off=True, target_params=80)[2].target_budget == 80


def test_a_conserving_elalora_never_forces_a_round_at_the_end_of_its_phase():
    _, _, conserving = planted(r=3, steps=100)
    _, _, shrinking = planted(r=3, steps=100, target_rank=2)
    assert not conserving.shrinks and not conserving.force_end_round and shrinking.force_end_round
    assert conserving.budget_at(50) == conserving.budget_at(1) == 24


def test_export_after_elalora_reloads_in_stock_peft_with_the_same_logits(tmp_path):
    model = tiny_bert()
    attach(
        model,
        DynaRankConfig(method="elalora", r=3, target_modules=["query", "key", "value"], granularity="head", seed=0),
    )
    ctrl = build_controller(model, total_steps=40)
    opt = ctrl.build_optimizer(lr=1e-2)
    x = train_on_one_batch(model, opt, 20)  # mid-run: E is a live gate, folded by the export
    assert ctrl.rank_changes > 0 and not ctrl.finalized
    _assert_export_matches(model, x, tmp_path / "mid")
    train_on_one_batch(model, opt, 20)
    assert ctrl.finalized  # after the last step: E folded into B, plain elastic LoRA
    _assert_export_matches(model, x, tmp_path / "end")


def _assert_export_matches(model, x, path):
    with torch.no_grad():
        expected = model(input_ids=x).logits
    assert (expected - tiny_bert()(input_ids=x).logits).abs().max() > 1e-3  # the adapter matters
    dynarank.export_peft(model, path)
    loaded = PeftModel.from_pretrained(tiny_bert(), str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, expected, atol=1e-4, rtol=0)


def test_a_fresh_adapter_starts_as_the_base_model_with_svd_initialisation():
    task, model, ctrl = planted(r=3)
    layer = elastic_layers(model)["query"]
    x = torch.randn(4, 64)
    torch.testing.assert_close(model(x), x @ task.base_weight.t())  # E = 0
    for p in layer.adapter_parameters():
        assert 0.01 < p.detach().std().item() < 0.03  # P, Q ~ N(0, 0.02)
    assert torch.equal(model.dynarank_svd.of("query").detach(), torch.zeros(24))


def test_elalora_needs_total_steps_and_a_round_inside_the_budgeting_phase():
    _, model, _ = planted()
    with pytest.raises(ValueError, match="total_steps"):
        build_controller(model)
    with pytest.raises(ValueError, match="resize_every: 50 is not shorter"):
        BudgetSchedule.resolve(100, warmup_frac=0.2, final_frac=0.3, interval=50, method="ElaLoRA")
    # Left unset, the interval is the method's own: a run too short for any round is refused by its length, not by a
    # setting the user never gave (which read "resize_every: 1 is not shorter ... Lower it (e.g. 1)").
    with pytest.raises(ValueError, match=r"^total_steps: a run of 1 step is too short for ElaLoRA: .* 1 step\(s\)"):
        planted(steps=1)
    with pytest.raises(ValueError, match=r"budget \(100 params\) is below 640, .* floor of 1 rank.*switch_off\)"):
        planted(target_params=100)  # 8 heads x 1 rank x 16 + 1 shared row x 64
    with pytest.raises(ValueError, match=r"target_rank: must be .* \(0, r=3\).*conserves the total rank"):
        DynaRankConfig(method="elalora", r=3, target_rank=3)


def test_planted_ranks_move_towards_the_truth():
    task = make_planted_task(seed=0, noise=0.1)
    config = DynaRankConfig(method="elalora", r=3, target_modules=["query"], granularity="head", seed=0)
    out = train_planted(task, config, steps=600)
    ranks = out["ranks"]
    assert sum(ranks) == 24
    assert ranks[4] > 3 and ranks[0] < 3 and ranks[5] < 3  # true ranks 8, 0, 0 (from 3 each)


def test_scores_and_gates_follow_layers_reshaped_outside_the_controller():
    # A checkpoint restore re-creates the layers (set_slots) after the controller exists; E follows through
    # match_layout and the importance EMAs re-bind to the new parameters at the next step.
    task, model, ctrl = planted(r=3)
    layer = elastic_layers(model)["query"]
    slots = [[0, 1]] + [list(range(2 + 3 * h, 5 + 3 * h)) for h in range(7)]  # head 0 at rank 2
    layer.set_slots(slots)
    model.dynarank_svd.match_layout(ctrl.layers)
    assert model.dynarank_svd.of("query").shape == (23,)
    with torch.no_grad():  # the values a restore copies in
        for p in (*layer.adapter_parameters(), model.dynarank_svd.of("query")):
            p.copy_(torch.randn(p.shape) * 0.1)
    opt = ctrl.build_optimizer(lr=1e-2)
    train(model, task, opt, 2)
    assert ctrl.importance.score(layer.group_weight).sum() > 0
    assert ctrl.importance.params[1] is layer.group_weight and len(ctrl.importance.held()) == 3
