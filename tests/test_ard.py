"""ARD-LoRA controller: the meta-objective, the phases, physical resizing, alarms, planted ranks."""

from __future__ import annotations

import tempfile

import pytest
import torch
from peft import PeftModel

import dynarank
from dynarank import DynaRankConfig, attach, build_controller, elastic_layers
from dynarank.optim_state import state_bytes
from planted_task import make_planted_task, train_planted, within_one
from tiny_models import randomize_adapters, tiny_bert, token_batch


def planted_model(**config):
    task = make_planted_task(seed=0)
    model = task.student()
    attach(model, DynaRankConfig(method="ard", head_layout="own", r=8, target_modules=["query"], **config))
    return task, model


def mse_step(model, task, generator):
    x = torch.randn(16, 64, generator=generator)
    loss = ((model(x) - task.targets(x)) ** 2).mean()
    loss.backward()
    return loss


def mse_steps(model, task, opt, steps: int, seed: int = 0) -> None:
    """``steps`` optimizer steps of mse_step on batches drawn from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        mse_step(model, task, g)
        opt.step()
        opt.zero_grad()


def _alpha_gradients_over_steps(model, task, ctrl, opt, steps: int):
    """Run ``steps`` optimizer steps; per step: (alpha before the update, task gradient, gradient the update used)."""
    alpha = model.dynarank_ard.alpha  # one vector for every group; the planted model adapts one module
    seen = []
    # The alphas' own optimizer (stepped inside opt.step()): the gradient it is about to use.
    ctrl.alpha_optimizer.register_step_pre_hook(lambda o, a, k: seen.append(alpha.grad.clone()))
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(steps):
        mse_step(model, task, g)
        before, task_grad = alpha.detach().clone(), alpha.grad.clone()
        opt.step()
        opt.zero_grad()
        rows.append((before, task_grad, seen[-1]))
    return rows


def test_the_hard_mask_is_exactly_zero_or_one_with_the_clamps_gradient():
    from dynarank.controllers.ard_gates import mask_gate

    _, model = planted_model(mask="hard")
    build_controller(model, total_steps=50)
    gates = model.dynarank_ard
    ((name, layer),) = elastic_layers(model).items()
    r0 = layer.max_rank
    with torch.no_grad():  # slots of every kind: off, in (0, 1/2], in (1/2, 1), on, and x exactly 0 and 1
        gates.of(name).copy_(torch.tensor([0.0, 0.3, 0.5 + 0.5 / r0, 1.0, 1.0 / r0, 0.77, 0.1, 0.63])[: layer.n_groups])
    mask = mask_gate(gates, name, r0, rank_floor=1, soft_only=False)(layer)  # (G, r_max)
    j = torch.arange(r0, dtype=torch.float32)
    floor = j < 1
    alpha = gates.alpha.detach().clone().requires_grad_(True)
    x = r0 * alpha.unsqueeze(1) - j
    assert torch.equal(mask, (floor | (x > 0.5)).float())  # exact 0/1 forward: what an export folds in
    weights = torch.randn_like(mask)
    (mask * weights).sum().backward()
    soft = torch.where(floor, torch.ones_like(x), x.clamp(0.0, 1.0))
    (soft * weights).sum().backward()
    assert torch.equal(gates.alpha.grad, alpha.grad)  # backward: the clamp's gradient, ends included
    assert gates.alpha.grad.abs().sum() > 0


@pytest.mark.parametrize("tv_form", ["step", "anchor"])
def test_regulariser_gradient_on_alpha_equals_l1_plus_the_tv_formula_at_every_step(tv_form):
    """No reference set by hand: the controller's own bookkeeping must give 2 beta (alpha(t) - alpha(t-1))."""
    lam, beta = 0.05, 0.5
    task, model = planted_model(
        lambda_mode="absolute",
        ard_lambda=lam,
        ard_beta=beta,
        tv_form=tv_form,
        warmup_frac=0.0,
        final_frac=0.0,
        resize_every=1000,  # no resize in these steps: the anchor stays at the start
    )
    ctrl = build_controller(model, total_steps=50)
    opt = ctrl.build_optimizer(lr=1e-3)
    start = model.dynarank_ard.of("query").detach().clone()
    rows = _alpha_gradients_over_steps(model, task, ctrl, opt, steps=4)
    tv_parts = []
    for t, (before, task_grad, used) in enumerate(rows):
        reference = rows[t - 1][0] if (tv_form == "step" and t > 0) else (start if tv_form == "anchor" else before)
        expected = task_grad + lam * torch.sign(before) + 2 * beta * (before - reference)
        torch.testing.assert_close(used, expected)
        tv_parts.append(used - task_grad - lam * torch.sign(before))
    # The alphas moved, so the TV part is not zero (from the second step on for the step form).
    assert tv_parts[-1].abs().max() > 1e-4


def test_beta_zero_leaves_only_the_l1_gradient():
    task, model = planted_model(
        lambda_mode="absolute", ard_lambda=0.05, ard_beta=0.0, tv_form="step", warmup_frac=0.0, final_frac=0.0
    )
    ctrl = build_controller(model, total_steps=50)
    opt = ctrl.build_optimizer(lr=1e-3)
    for before, task_grad, used in _alpha_gradients_over_steps(model, task, ctrl, opt, steps=3):
        torch.testing.assert_close(used, task_grad + 0.05 * torch.sign(before))


def test_tv_acts_with_lambda_zero_and_is_not_scaled_by_lambda():
    """TV only (ard_lambda=0) is regularised: the TV part is 2 beta (alpha(t) - alpha(t-1)) whatever lambda is."""
    task, model = planted_model(
        lambda_mode="absolute", ard_lambda=0.0, ard_beta=3.0, tv_form="step", warmup_frac=0.0, final_frac=0.0
    )
    ctrl = build_controller(model, total_steps=50)
    opt = ctrl.build_optimizer(lr=1e-2)
    rows = _alpha_gradients_over_steps(model, task, ctrl, opt, steps=3)
    for (a0, _, _), (a1, g1, used1) in zip(rows, rows[1:]):
        torch.testing.assert_close(used1, g1 + 6.0 * (a1 - a0))
    assert (rows[2][2] - rows[2][1]).abs().max() > 1e-4  # step 0 has no task gradient (B = 0); step 1 moved alpha


def test_a_run_with_beta_ten_differs_from_beta_zero():
    def final_alphas(beta: float) -> torch.Tensor:
        torch.manual_seed(0)
        task, model = planted_model(seed=0, ard_beta=beta, warmup_frac=0.2, final_frac=0.0)
        ctrl = build_controller(model, total_steps=40)
        opt = ctrl.build_optimizer(lr=3e-3)
        mse_steps(model, task, opt, 40, seed=1)
        return model.dynarank_ard.of("query").detach().clone()

    assert not torch.equal(final_alphas(0.0), final_alphas(10.0))


def test_a_skipped_step_leaves_no_tv_gradient_behind():
    """alpha did not move across a skipped step, so the next step's TV term compares alpha with itself."""
    task, model = planted_model(
        lambda_mode="absolute", ard_lambda=0.0, ard_beta=3.0, tv_form="step", warmup_frac=0.0, final_frac=0.0
    )
    ctrl = build_controller(model, total_steps=50)
    opt = ctrl.build_optimizer(lr=1e-2)
    _alpha_gradients_over_steps(model, task, ctrl, opt, steps=2)
    mse_step(model, task, torch.Generator().manual_seed(5))
    ctrl.skip_step(opt)
    rows = _alpha_gradients_over_steps(model, task, ctrl, opt, steps=1)
    before, task_grad, used = rows[0]
    torch.testing.assert_close(used, task_grad)


def test_regulariser_counts_once_per_optimizer_step_under_gradient_accumulation():
    task, model = planted_model(lambda_mode="absolute", ard_lambda=0.05, warmup_frac=0.0, final_frac=0.0)
    ctrl = build_controller(model, total_steps=10)
    opt = ctrl.build_optimizer(lr=1e-3)
    alpha = model.dynarank_ard.alpha  # one vector for every group; the planted model adapts one module
    g = torch.Generator().manual_seed(0)
    for _ in range(4):  # four micro-batches, one optimizer step
        mse_step(model, task, g)
    accumulated = alpha.grad.clone()
    used = []
    ctrl.alpha_optimizer.register_step_pre_hook(lambda o, a, k: used.append(alpha.grad.clone()))
    opt.step()
    torch.testing.assert_close(used[0], accumulated + 0.05)
    assert alpha.grad is None  # consumed: the caller's optimizer never steps the alphas


def test_alpha_is_frozen_during_warm_up_and_the_final_phase():
    task, model = planted_model(warmup_frac=0.3, final_frac=0.3)
    ctrl = build_controller(model, total_steps=10)
    opt = ctrl.build_optimizer(lr=1e-2)
    alpha = model.dynarank_ard.alpha  # one vector for every group; the planted model adapts one module
    g = torch.Generator().manual_seed(0)
    values = []
    for _ in range(10):
        mse_step(model, task, g)
        opt.step()
        opt.zero_grad()
        values.append(alpha.detach().clone())
    assert [ctrl.phase(t) for t in range(10)] == ["warmup"] * 3 + ["active"] * 4 + ["final"] * 3
    assert all(torch.equal(v, torch.ones(8)) for v in values[:3])  # frozen in warm-up
    assert not torch.equal(values[3], values[2])  # learning in the active phase
    assert torch.equal(values[-1], values[-3])  # frozen again at the end


def test_the_alphas_have_their_own_optimizer_which_no_schedule_or_weight_decay_of_the_caller_touches():
    task, model = planted_model(warmup_frac=0.2, final_frac=0.1)
    ctrl = build_controller(model, total_steps=20)
    opt = ctrl.build_optimizer(lr=1e-2, weight_decay=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.0 if t > 5 else 1.0)
    alpha = model.dynarank_ard.alpha
    assert all(alpha is not p for group in opt.param_groups for p in group["params"])  # not the caller's
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        mse_step(model, task, g)
        opt.step()
        opt.zero_grad()
        sched.step()
        ctrl.observe_loss(1.0)
    assert opt.param_groups[0]["lr"] == 0.0  # the schedule applies to A/B ...
    (group,) = ctrl.alpha_optimizer.param_groups
    assert group["lr"] == ctrl.settings.lr_alpha and group["weight_decay"] == 0.0  # ... not to alpha
    before = alpha.detach().clone()
    mse_step(model, task, g)
    opt.step()
    assert not torch.equal(alpha.detach(), before)  # alpha still learns while the caller's rate is 0


def test_an_optimizer_that_holds_the_alphas_too_leaves_them_to_the_controller():
    """A Trainer builds its optimizer from every trainable parameter: the alphas are in it, but without a gradient at
    its step (the controller consumed it), so it neither decays nor moves them a second time."""
    task, model = planted_model(lambda_mode="absolute", warmup_frac=0.0, final_frac=0.0)
    ctrl = build_controller(model, total_steps=20)
    everything = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    ctrl.bind(everything)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        mse_step(model, task, g)
        everything.step()
        everything.zero_grad()
    assert not everything.state.get(model.dynarank_ard.alpha)  # never stepped by the caller's optimizer
    assert ctrl.alpha_optimizer.state[model.dynarank_ard.alpha]["step"] == 5


def test_lambda_zero_keeps_every_rank():
    task = make_planted_task(seed=0)
    out = train_planted(
        task,
        DynaRankConfig(method="ard", head_layout="own", r=8, target_modules=["query"], ard_lambda=0.0),
        steps=300,
        lr=3e-3,
    )
    assert out["ranks"] == [8] * 8


def test_lambda_zero_raises_the_explosion_alarm():
    task = make_planted_task(seed=0)
    out = train_planted(
        task,
        DynaRankConfig(method="ard", head_layout="own", r=8, target_modules=["query"], ard_lambda=0.0),
        steps=300,
        lr=3e-3,
    )
    assert any("rank explosion" in w and "raise ard_lambda" in w for w in out["warnings"]), out["warnings"]


def test_ranks_flipping_under_the_soft_mask_raise_the_oscillation_alarm_pointing_to_the_mask():
    task = make_planted_task(seed=0, noise=1.0)
    config = DynaRankConfig(
        method="ard", head_layout="own", r=8, target_modules=["query"], mask="soft", readout="round", alpha_travel=8.0
    )
    out = train_planted(task, config, lr=3e-3)
    assert out["controller"].motion.reversing_fraction() >= 0.25
    assert any("oscillating ranks" in w and "mask='hard'" in w for w in out["warnings"]), out["warnings"]
    hard = train_planted(
        task, DynaRankConfig(method="ard", head_layout="own", r=8, target_modules=["query"], alpha_travel=8.0), lr=3e-3
    )
    assert not any("oscillating" in w for w in hard["warnings"])  # the default mask does not flip


def test_far_too_large_lambda_raises_the_collapse_alarm():
    task = make_planted_task(seed=0)
    out = train_planted(
        task,
        DynaRankConfig(method="ard", head_layout="own", r=8, target_modules=["query"], ard_lambda=1000.0),
        steps=300,
        lr=3e-3,
    )
    assert any("rank collapse" in w for w in out["warnings"])
    assert sum(out["ranks"]) <= 1


def test_too_small_alpha_learning_rate_raises_the_frozen_alarm():
    task = make_planted_task(seed=0)
    out = train_planted(
        task,
        DynaRankConfig(method="ard", head_layout="own", r=8, target_modules=["query"], lr_alpha=1e-7),
        steps=300,
        lr=3e-3,
    )
    assert any("lr_alpha" in w and "too small" in w for w in out["warnings"])
    assert out["ranks"] == [8] * 8


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_the_default_settings_with_each_head_s_own_a_rows_recover_planted_ranks(seed):
    """The planted heads read independent input directions: ARD's defaults but for the layout (own A rows)."""
    task = make_planted_task(seed=seed, noise=0.1)
    target = ["query"]
    ard = train_planted(task, DynaRankConfig(method="ard", head_layout="own", r=8, target_modules=target), seed=seed)
    oracle = train_planted(
        task, DynaRankConfig(method="dynarank-lora", r=8, target_modules=target), fixed_ranks=task.true_ranks, seed=seed
    )
    assert within_one(ard["ranks"], task.true_ranks) >= 0.9, ard["ranks"]
    assert ard["mse"] <= 1.05 * oracle["mse"]
    assert ard["warnings"] == []


def test_resize_only_removes_switched_off_slots_and_keeps_optimizer_state():
    task, model = planted_model(lambda_mode="absolute", ard_lambda=0.0, warmup_frac=0.0, final_frac=0.0)
    ctrl = build_controller(model, total_steps=100)
    opt = ctrl.build_optimizer(lr=1e-2)
    mse_steps(model, task, opt, 3)
    layer = elastic_layers(model)["query"]
    with torch.no_grad():
        model.dynarank_ard.of("query").copy_(torch.tensor([0.0, 0.1, 0.3, 0.5, 1.0, 0.2, 0.4, 0.9]))
    x = torch.randn(5, 64)
    before = model(x).detach()
    exp_avg_before = opt.state[layer.group_weight]["exp_avg"].clone()  # (16, 64): B columns, 8 per head
    ctrl._resize(dynarank.StepRecord(step=3, phase="active"))
    assert layer.ranks == [0, 1, 3, 4, 8, 2, 4, 8]  # ceil(8 * alpha)
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)
    kept = torch.tensor([8 * g + j for g, r in enumerate(layer.ranks) for j in range(r)])
    torch.testing.assert_close(opt.state[layer.group_weight]["exp_avg"], exp_avg_before[:, kept])


def test_trainable_parameters_and_optimizer_memory_fall_with_the_ranks():
    model = tiny_bert()
    attach(model, DynaRankConfig(method="ard", r=4, target_modules=["query", "value"], ard_lambda=5.0))
    ctrl = build_controller(model, total_steps=40)
    opt = ctrl.build_optimizer(lr=1e-2)
    adapter = lambda: [p for n in elastic_layers(model).values() for p in n.adapter_parameters()]  # noqa: E731
    x, labels = token_batch(8, 6), torch.tensor([0, 1] * 4)
    start_params = dynarank.adapter_parameter_count(model)
    for t in range(40):
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if t == 0:
            start_bytes = state_bytes(opt, adapter())
    assert dynarank.adapter_parameter_count(model) < start_params
    assert state_bytes(opt, adapter()) < start_bytes
    assert ctrl.history[-1]["step"] == 40 and len(ctrl.history) >= 2


def test_export_after_ard_training_reloads_in_stock_peft_with_the_same_logits():
    model = tiny_bert()
    attach(model, DynaRankConfig(method="ard", r=4, target_modules=["query", "key", "value"], ard_lambda=3.0))
    ctrl = build_controller(model, total_steps=30)
    opt = ctrl.build_optimizer(lr=1e-2)
    x, labels = token_batch(8, 6), torch.tensor([0, 1] * 4)
    for _ in range(20):  # stop in the active phase: some slots are still gated off
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        expected = model(input_ids=x).logits
    with tempfile.TemporaryDirectory() as tmp:
        dynarank.export_peft(model, tmp + "/adapter")
        loaded = PeftModel.from_pretrained(tiny_bert(), tmp + "/adapter")
        with torch.no_grad():
            got = loaded(input_ids=x).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- parameter budget (target_params)


def test_a_parameter_budget_caps_the_adapter_at_every_resize_and_at_the_end():
    task = make_planted_task(seed=0, noise=0.1)
    config = DynaRankConfig(method="ard", head_layout="own", r=8, target_modules=["query"], target_params=1000)
    out = train_planted(task, config, seed=0)
    ctrl = out["controller"]
    assert ctrl.budget_at(ctrl.settings.warmup_steps) == ctrl.start_params == 8 * 8 * (64 + 16)
    assert ctrl.budget_at(ctrl.settings.final_start) == 1000
    caps = [(rec.adapter_parameters, rec.budget) for rec in ctrl.records if rec.resized]
    assert caps and all(params <= budget for params, budget in caps)
    per_rank = 64 + 16
    assert 1000 - 2 * per_rank <= out["params"] <= 1000  # a ceiling, met within two ranks' cost
    assert ctrl.history[-1]["adapter_parameters"] == out["params"]


def test_a_budget_at_the_oracle_size_recovers_the_planted_ranks():
    task = make_planted_task(seed=0, noise=0.1)
    oracle_params = sum(task.true_ranks) * (64 + 16)
    out = train_planted(
        task,
        DynaRankConfig(method="ard", head_layout="own", r=8, target_modules=["query"], target_params=oracle_params),
    )
    assert out["ranks"] == list(task.true_ranks)
    assert out["warnings"] == []


def test_the_budget_cut_removes_the_tail_slots_with_the_lowest_margin_first():
    task, model = planted_model(target_params=4000)
    ctrl = build_controller(model, total_steps=100)
    with torch.no_grad():  # r0 * alpha: 8, 4, 6, 2, 8, 8, 8, 5
        model.dynarank_ard.of("query").copy_(torch.tensor([1.0, 0.5, 0.75, 0.25, 1.0, 1.0, 1.0, 0.625]))
    readouts = {"query": ctrl.readout("query")}
    assert readouts["query"] == [8, 4, 6, 2, 8, 8, 8, 5]  # 49 ranks, 3,920 parameters: already within 4,000
    ctrl._cap_to_budget(readouts, 3920)
    assert readouts["query"] == [8, 4, 6, 2, 8, 8, 8, 5]
    # Margins of the tails, r0 * alpha - (k - 1): 1 for every group; the next ones 2. Ties go to the
    # first module and group: removing 4 ranks takes the tail of groups 0..3.
    ctrl._cap_to_budget(readouts, 3920 - 4 * 80)
    assert readouts["query"] == [7, 3, 5, 1, 8, 8, 8, 5]
    with torch.no_grad():
        model.dynarank_ard.of("query").copy_(torch.tensor([1.0, 0.3, 1.0, 1.0, 1.0, 1.0, 1.0, 0.1]))
    readouts = {"query": [8] * 8}
    ctrl._cap_to_budget(readouts, 64 * 80 - 3 * 80)  # margins: group 7 at 0.8 - 7 first, then group 1 (2.4 - 7)
    assert readouts["query"] == [8, 7, 8, 8, 8, 8, 8, 6]


@pytest.mark.parametrize("per_parameter, cut_group, freed", [(False, 0, 8), (True, 1, 8 + 32)])
def test_the_cap_by_margin_per_parameter_cuts_a_shared_slots_last_user_before_its_co_users(
    per_parameter, cut_group, freed
):
    from dynarank.controllers.ard_budget import cap_to_budget, prefix_cost

    config = DynaRankConfig(method="ard", r=4, head_layout="shared", target_modules=["query"], target_params=500)
    model = attach(tiny_bert(), config)
    layers = {name: layer for name, layer in elastic_layers(model).items() if name.endswith("0.attention.self.query")}
    ((name, layer),) = layers.items()
    # 4 heads of 8 on a width of 32. Group 1 alone uses slots 2 and 3; every other group uses slots 0 and 1, shared.
    # Every tail at margin 1.
    ranks = {name: [4 if g == 1 else 2 for g in range(layer.n_groups)]}
    scaled = {name: [float(r) for r in ranks[name]]}
    before = prefix_cost(layers, ranks)
    cap_to_budget(layers, ranks, scaled, 0, before - 1, per_parameter=per_parameter)
    expected = [4 if g == 1 else 2 for g in range(layer.n_groups)]
    expected[cut_group] -= 1
    assert ranks[name] == expected  # by margin: the tie goes to group 0 (one column freed); per parameter: the row too
    assert before - prefix_cost(layers, ranks) == freed


def test_a_budget_above_what_the_alphas_want_is_still_reached_at_the_end():
    """The budget is the adapter's size, not only its ceiling: removed slots never return, so the floor holds the
    read-out's cuts back while the adapter would fall below the target."""
    task = make_planted_task(seed=0, noise=0.1)
    per_rank = 64 + 16
    oracle_params = sum(task.true_ranks) * per_rank  # what the alphas ask for alone (the test above)
    target = oracle_params + 12 * per_rank
    out = train_planted(
        task, DynaRankConfig(method="ard", head_layout="own", r=8, target_modules=["query"], target_params=target)
    )
    ctrl = out["controller"]
    assert target - per_rank < out["params"] <= target
    assert ctrl.cuts["held"] > 0 and sum(rec.held_by_budget for rec in ctrl.records) == ctrl.cuts["held"]
    # every planted rank is inside what is kept: the held slots are extra, not instead
    assert all(k >= true for k, true in zip(out["ranks"], task.true_ranks))


def _read_16_ranks(model) -> torch.Tensor:
    """Set the planted model's alphas to r0 * alpha = 2, 1, 3, 0.5, 2, 2, 2, 2.9 (a read-out of 16 ranks, 1,280
    parameters); returns them."""
    alpha = model.dynarank_ard.of("query")
    with torch.no_grad():
        alpha.copy_(torch.tensor([0.25, 0.125, 0.375, 0.0625, 0.25, 0.25, 0.25, 0.3625]))
    return alpha


def test_the_floor_holds_the_cut_slots_with_the_highest_margin_first():
    task, model = planted_model(target_params=2000)
    ctrl = build_controller(model, total_steps=100)
    _read_16_ranks(model)
    readouts = {"query": ctrl.readout("query")}
    assert readouts["query"] == [2, 1, 3, 1, 2, 2, 2, 3]  # 16 ranks, 1,280 parameters
    ctrl._hold_to_target(readouts)  # 2,000 holds 9 more ranks (25 x 80); the next slots' margins r0 * alpha - k:
    # groups 0, 1, 2, 4, 5, 6: 0, then -1; group 7: -0.1; group 3: -0.5. Ties go to the first group.
    assert readouts["query"] == [4, 2, 4, 2, 3, 3, 3, 4]  # the six 0s, -0.1, -0.5, and group 0's -1
    held = dict(readouts)
    ctrl._hold_to_target(held)
    assert held == readouts  # at the target: nothing more to hold
    readouts = {"query": [8] * 8}
    ctrl._hold_to_target(readouts)  # above the target the floor does nothing (the cap's job)
    assert readouts["query"] == [8] * 8


def test_held_slots_come_on_without_changing_the_function_and_their_group_keeps_its_rank():
    """A held slot was off: it restarts from a zero group-side column (its stale values would change the output at
    once), every slot of its group is on from then on, and the group's alpha stays at its cap."""
    from dynarank.controllers.base import BudgetRecord

    task, model = planted_model(target_params=2000)
    randomize_adapters(model, seed=1)  # stale, non-zero values behind the slots that are off
    ctrl = build_controller(model, total_steps=100)
    alpha = _read_16_ranks(model)  # the floor holds 9 more
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x)
    ctrl._resize(BudgetRecord(step=ctrl.step, phase="active"))
    layer = elastic_layers(model)["query"]
    assert layer.ranks == [4, 2, 4, 2, 3, 3, 3, 4]  # as the floor's order says (the test above)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    held = ctrl.held.tolist()
    assert held == [True, True, True, True, True, True, True, True]  # every group got a slot back
    assert (8 * alpha.detach()).tolist() == [4.0, 2.0, 4.0, 2.0, 3.0, 3.0, 3.0, 4.0]  # every slot on
    gate = layer.gate()
    assert all(bool((gate[g, :r] == 1).all()) for g, r in enumerate(layer.ranks))
    # group 3 read 0.5: its slot 0 was off, kept only as the contested slot; it restarts from zero too
    start = sum(layer.ranks[:3])
    assert layer.group_weight[:, start : start + 2].abs().sum() == 0
    with torch.no_grad():
        alpha.sub_(0.2)  # an update that would pull them down
    ctrl._project_alphas()
    assert (8 * alpha.detach()).tolist() == [4.0, 2.0, 4.0, 2.0, 3.0, 3.0, 3.0, 4.0]
    assert ctrl.readout("query") == layer.ranks  # never cut again
    assert ctrl.state_dict()["held"] == held  # checkpointed with the controller


def test_held_slots_restart_with_zero_momentum_but_keep_their_second_moment():
    """Late in a long run Adam's bias correction is ~1: a held slot restarted with a zeroed second moment would take
    first updates of ~3x the learning rate. Its momentum is zeroed (the column restarts from zero), its second
    moment is carried, and its first update stays within the learning rate."""
    from dynarank.controllers.base import BudgetRecord

    task, model = planted_model(target_params=2000)
    randomize_adapters(model, seed=1)
    ctrl = build_controller(model, total_steps=100)
    lr = 1e-2
    opt = ctrl.build_optimizer(lr=lr)
    mse_steps(model, task, opt, 5)  # every slot on: each column has a momentum and a second moment
    for p_state in opt.state.values():  # as late in a run: the same averages, bias corrections ~1
        if "step" in p_state:
            steps = float(p_state["step"])
            p_state["exp_avg"].div_(1 - 0.9**steps)
            p_state["exp_avg_sq"].div_(1 - 0.999**steps)
            p_state["step"].fill_(10_000)
    layer = elastic_layers(model)["query"]
    state = opt.state[layer.group_weight]
    old_columns = layer.column_index.clone()
    sq_before, avg_before = state["exp_avg_sq"].clone(), state["exp_avg"].clone()
    assert bool((sq_before > 0).all())
    _read_16_ranks(model)  # the floor holds 9 more: [2, 1, 3, 1, 2, 2, 2, 3] -> [4, 2, 4, 2, 3, 3, 3, 4]
    ctrl._resize(BudgetRecord(step=ctrl.step, phase="active"))
    restarted = [(g, j) for g, (a, b) in enumerate(zip([2, 1, 3, 0, 2, 2, 2, 3], layer.ranks)) for j in range(a, b)]
    assert len(restarted) == 10  # the 9 held and group 3's slot 0 (read 1 with r0 * alpha = 1/2: off)
    for g, j in restarted:
        new, old = int(layer.column_index[g, j]), int(old_columns[g, j])
        assert state["exp_avg"][:, new].abs().sum() == 0 and avg_before[:, old].abs().sum() > 0
        torch.testing.assert_close(state["exp_avg_sq"][:, new], sq_before[:, old], rtol=0, atol=0)
    columns = torch.tensor([int(layer.column_index[g, j]) for g, j in restarted])
    before = layer.group_weight.detach()[:, columns].clone()
    mse_steps(model, task, opt, 1, seed=7)
    moved = (layer.group_weight.detach()[:, columns] - before).abs()
    assert moved.max() > 0  # the restarted slots train
    assert moved.max() <= lr  # a zeroed second moment: 0.1 g / sqrt(0.001 g^2) = 3.2x lr


def test_the_l1_strength_is_steered_toward_the_budget():
    task, model = planted_model(target_params=2000)
    ctrl = build_controller(model, total_steps=100)
    ctrl._steer_lambda(wanted=3000, budget=2000)
    assert ctrl.lambda_scale == pytest.approx(1.5)  # the alphas want more than the budget: stronger l1
    ctrl._steer_lambda(wanted=100, budget=2000)
    assert ctrl.lambda_scale == pytest.approx(0.75)  # far below: weaker, by at most a factor of 2 per resize


def test_a_budget_that_cannot_be_met_is_refused_with_what_to_change():
    task, model = planted_model(target_params=10_000)
    with pytest.raises(ValueError, match="raise the start rank"):
        build_controller(model, total_steps=100)
    assert not hasattr(model, "dynarank_ard")  # refused before the model was touched
    assert all(layer.gate() is None for layer in elastic_layers(model).values())
    task, model = planted_model(target_params=5, rank_floor=0)
    with pytest.raises(ValueError, match=r"budget \(5\) is below 80, the smallest adapter .*: raise the budget"):
        build_controller(model, total_steps=100)
    with pytest.raises(ValueError, match="target_rank: not used by method 'ard'"):
        DynaRankConfig(method="ard", target_rank=2)


def test_paper_preset_gives_the_seed_values():
    _, model = planted_model(preset="paper")
    s = build_controller(model, total_steps=100).settings
    assert (s.ard_lambda, s.ard_beta, s.lr, s.lr_alpha) == (0.01, 0.01 * 0.1, 1e-4, 5e-5)
    assert (s.lambda_mode, s.tv_form, s.warmup_steps, s.final_start) == ("absolute", "step", 0, 100)


def test_relative_lambda_is_calibrated_from_the_warm_up_loss():
    task = make_planted_task(seed=0)
    out = train_planted(
        task, DynaRankConfig(method="ard", head_layout="own", r=8, target_modules=["query"]), steps=200, lr=3e-3
    )
    ctrl = out["controller"]
    gained = ctrl._loss_improvement()
    assert gained > 0
    # lambda_g = strength * r0 * gained * cost_g / P, P = 8 heads * 8 slots * 80 params
    torch.testing.assert_close(ctrl.lambdas["query"], torch.full((8,), 1.0 * 8 * gained * 80 / (8 * 8 * 80)))


def test_bad_ard_setups_are_refused_with_a_clear_message():
    _, model = planted_model()
    with pytest.raises(ValueError, match="total_steps"):
        build_controller(model)
    _, model = planted_model(warmup_frac=0.0)
    with pytest.raises(ValueError, match="warm-up"):
        build_controller(model, total_steps=100)
    with pytest.raises(ValueError, match="warmup_frac"):
        DynaRankConfig(method="ard", warmup_frac=0.6, final_frac=0.5)


def test_a_fixed_rank_model_is_driven_by_the_base_controller():
    model = tiny_bert()
    attach(model, DynaRankConfig(r=2))
    randomize_adapters(model)
    ctrl = build_controller(model, total_steps=3)
    opt = ctrl.build_optimizer(lr=1e-3)
    for _ in range(3):
        model(input_ids=token_batch(), labels=torch.tensor([0, 1, 0])).loss.backward()
        opt.step()
        opt.zero_grad()
    assert ctrl.step == 3 and [r.resized for r in ctrl.records] == [False] * 3
