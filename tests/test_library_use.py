"""What a hand-written training loop can rely on: a copy of the model taken mid-run is a snapshot; the usual resume
order (build the model, controller and optimizer, then load their states) trains the loaded adapters; a controller
bound to two optimizers counts iterations; the data start comes before the controller."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import dynarank
from dynarank import DynaRankConfig, attach, build_controller, elastic_layers
from tiny_models import tiny_bert, token_batch

RANK_METHODS = ["ard", "elalora", "adalora-physical"]
T = 40  # steps of a run: warm-up, rank changes and the final phase all fall inside it
X, Y = token_batch(8, 6), torch.tensor([0, 1] * 4)
PROBE = token_batch(4, 6, seed=9)


def fresh(method: str, **knobs):
    """(model, controller, optimizer) of a tiny BERT without dropout, everything seeded."""
    torch.manual_seed(0)
    base = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = attach(base, DynaRankConfig(method=method, r=4, target_modules="all-linear", seed=0, **knobs))
    controller = build_controller(model, total_steps=T)
    optimizer = controller.build_optimizer(lr=1e-2)
    model.train()
    return model, controller, optimizer


def train_steps(model, optimizer, n: int) -> None:
    for _ in range(n):
        model(input_ids=X, labels=Y).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def logits(model) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=PROBE).logits.clone()
    model.train(was)
    return out


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------- copies
@pytest.mark.parametrize("method", RANK_METHODS)
def test_a_deep_copy_taken_mid_run_is_a_snapshot_the_run_does_not_move(method):
    """The layers' gates read the alphas / E they were built on: a copy's gates read the original's, so a 'best so
    far' copy followed the run (ARD: by 3.3 in the logits), and ElaLoRA's copy raised in its cached views of E."""
    model, _, optimizer = fresh(method)
    train_steps(model, optimizer, T // 2 - 4)
    best = copy.deepcopy(model)
    at_copy = logits(best)
    torch.testing.assert_close(at_copy, logits(model), rtol=0, atol=0)
    train_steps(model, optimizer, T // 2 + 4)
    assert not torch.equal(logits(model), at_copy)  # the run moved on
    torch.testing.assert_close(logits(best), at_copy, rtol=0, atol=0)


# ---------------------------------------------------------------------------- resume
@pytest.mark.parametrize("method", RANK_METHODS)
def test_resuming_in_the_usual_order_continues_the_run_bitwise(method):
    """Build the model, controller and optimizer, then load the model's, the controller's and the optimizer's state:
    the loaded adapters (reshaped to the saved layout) were new tensors the optimizer did not hold, so they never
    trained again."""
    k = T // 2 + 5  # after rank changes: the saved layout is not the fresh one
    model, controller, optimizer = fresh(method)
    train_steps(model, optimizer, k)
    saved = copy.deepcopy((model.state_dict(), controller.state_dict(), controller.state_tensors()))
    saved_optimizer = copy.deepcopy(optimizer.state_dict())
    train_steps(model, optimizer, T - k)

    again, controller_again, optimizer_again = fresh(method)
    layout = {n: layer.slots for n, layer in elastic_layers(again).items()}
    again.load_state_dict(saved[0])
    assert {n: layer.slots for n, layer in elastic_layers(again).items()} != layout  # the load reshaped adapters
    controller_again.load_state_dict(saved[1])
    controller_again.load_state_tensors(saved[2])
    optimizer_again.load_state_dict(saved_optimizer)
    train_steps(again, optimizer_again, T - k)
    assert controller_again.ranks() == controller.ranks()
    assert same_tensors(again.state_dict(), model.state_dict())


def test_an_optimizer_state_loaded_before_the_model_is_dropped_with_a_warning_at_the_next_step(caplog):
    model, controller, optimizer = fresh("ard")
    train_steps(model, optimizer, T // 2 + 5)
    saved_model, saved_optimizer = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    again, controller_again, optimizer_again = fresh("ard")
    optimizer_again.load_state_dict(saved_optimizer)
    with caplog.at_level(logging.WARNING):
        again.load_state_dict(saved_model)
        held = {id(p) for group in optimizer_again.param_groups for p in group["params"]}
        assert all(id(p) in held for p in again.parameters() if p.requires_grad and p is not again.dynarank_ard.alpha)
        assert "load the optimizer's state after the model's" not in caplog.text  # said when it matters: ...
        train_steps(again, optimizer_again, 1)  # ... when the optimizer steps with the state it lost
    assert "load the optimizer's state after the model's" in caplog.text


def test_loading_a_mid_run_state_after_the_last_step_says_nothing_of_optimizer_state(caplog):
    """What a Trainer's load_best_model_at_end does: the run is over, nothing trains on, nothing is lost. Before,
    the load warned to load the optimizer's state after the model's."""
    model, controller, optimizer = fresh("ard")
    train_steps(model, optimizer, T // 2 + 5)
    best = copy.deepcopy(model.state_dict())
    train_steps(model, optimizer, T - (T // 2 + 5))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model.load_state_dict(best)
    assert caplog.text == ""


# ---------------------------------------------------------------------------- the README's loop
@pytest.mark.parametrize("method", ["dynarank-lora", *RANK_METHODS])
def test_every_method_s_controller_takes_the_loss_a_loop_computes_itself(method):
    """The README's plain loop says: with your own loss, call controller.observe_loss(loss). Only ARD's controller had
    it: every other method's loop raised AttributeError at its first step."""
    model, controller, optimizer = fresh(method)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(input_ids=X).logits, Y)
        loss.backward()
        controller.observe_loss(loss)
        optimizer.step()
        optimizer.zero_grad()
    assert controller.step == 3


# ---------------------------------------------------------------------------- several optimizers
@pytest.mark.parametrize("head_first", [False, True])
def test_a_controller_bound_to_two_optimizers_counts_iterations(head_first):
    """AdamW for the adapters, SGD for the task head, both bound: the controller ran its step in each optimizer's
    step, so the schedule ran at twice the speed (step 40 of 40 after 20 iterations)."""
    torch.manual_seed(0)
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=4, target_modules="all-linear", seed=0))
    controller = build_controller(model, total_steps=T)
    head = [p for n, p in model.named_parameters() if n.startswith("classifier")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier")]
    adapters, sgd = torch.optim.AdamW(rest, lr=1e-2), torch.optim.SGD(head, lr=1e-2)
    controller.bind(adapters)
    controller.bind(sgd)
    model.train()
    for _ in range(T // 2):
        model(input_ids=X, labels=Y).loss.backward()
        for optimizer in (sgd, adapters) if head_first else (adapters, sgd):
            optimizer.step()
        adapters.zero_grad()
        sgd.zero_grad()
    assert controller.step == T // 2


# ---------------------------------------------------------------------------- order of the data start
def test_init_ranks_after_build_controller_is_refused():
    """The controller had sized its budget schedule from the uniform start, and an optimizer built since kept the
    tensors the init replaced: those layers never trained."""
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=4, target_modules="all-linear", target_params=3000))
    build_controller(model, total_steps=T)
    with pytest.raises(ValueError, match="init_ranks\\(\\) runs before build_controller"):
        dynarank.init_ranks(model, [{"input_ids": X, "labels": Y}])


def test_stepping_past_total_steps_warns_once(caplog):
    model, controller, optimizer = fresh("ard")
    with caplog.at_level(logging.WARNING):
        train_steps(model, optimizer, T)
        assert "past the run's total_steps" not in caplog.text
        train_steps(model, optimizer, 2)
    assert caplog.text.count(f"optimizer step {T + 1} is past the run's total_steps={T}") == 1
