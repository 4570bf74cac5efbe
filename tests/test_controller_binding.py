"""What a controller's optimizers and saved state must be, said before training goes wrong: a controller nothing
drives says so; an optimizer built again replaces the one before; an optimizer of another model, or one whose state
cannot follow a resize, is refused by bind(); a saved state of another method or run length is refused and leaves
the controller as it was; E folded at the end leaves the optimizer; a step under inference mode is refused; every
resizing method's records count the ranks they removed."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from dynarank import DynaRankConfig, attach, build_controller
from dynarank.config import ConfigError
from tiny_models import tiny_bert, token_batch

RANK_METHODS = ["ard", "elalora", "adalora-physical"]
T = 40  # steps of a run: warm-up, rank changes and the final phase all fall inside it
X, Y = token_batch(8, 6), torch.tensor([0, 1] * 4)
UNBOUND = "is bound to no optimizer"


def attached(method: str, **knobs):
    torch.manual_seed(0)
    base = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = attach(base, DynaRankConfig(method=method, r=4, target_modules="all-linear", seed=0, **knobs))
    return model.train()


def fresh(method: str, total_steps: int = T, **knobs):
    """(model, controller, optimizer built by the controller) of a tiny BERT without dropout, everything seeded."""
    model = attached(method, **knobs)
    controller = build_controller(model, total_steps=total_steps)
    return model, controller, controller.build_optimizer(lr=1e-2)


def train_steps(model, optimizer, n: int) -> None:
    for _ in range(n):
        model(input_ids=X, labels=Y).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def unbound_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if UNBOUND in str(w.message)]


def held(optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


# ---------------------------------------------------------------------------- a controller nothing drives
@pytest.mark.parametrize("method", RANK_METHODS)
def test_a_controller_bound_to_no_optimizer_warns_once_at_the_first_training_forward(method):
    """build_controller marks the model controlled (attach's warning is silenced), and a user's own AdamW never bound
    trained the model with the controller at step 0, the ranks never moving, without a word."""
    model = attached(method)
    controller = build_controller(model, total_steps=T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.eval()
        model(input_ids=X)  # an evaluation is no training forward
        model.train()
        with torch.no_grad():
            model(input_ids=X)
        assert not unbound_warnings(caught)
        train_steps(model, optimizer, 3)
    (message,) = unbound_warnings(caught)
    assert f"method {method!r}" in message and "controller.bind(optimizer)" in message
    assert controller.step == 0  # what the warning says


@pytest.mark.parametrize("method", RANK_METHODS)
def test_a_bound_controller_and_the_newest_of_two_built_say_nothing(method):
    model, controller, optimizer = fresh(method)
    mine = attached(method)
    build_controller(mine, total_steps=T)  # built, then built again: only the newest speaks for the model
    again = build_controller(mine, total_steps=T)
    again.bind(torch.optim.AdamW(again.param_groups(1e-2)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(model, optimizer, 2)
        train_steps(mine, again.optimizers[0], 2)
    assert not unbound_warnings(caught)
    assert (controller.step, again.step) == (2, 2)


@pytest.mark.parametrize("method", RANK_METHODS)
def test_a_controller_bound_to_no_optimizer_warns_once_when_its_model_trains_in_eval_mode(method):
    """A model from from_pretrained is in eval mode, and a plain loop may train it so: it made no training forward,
    and a controller nothing drove said nothing."""
    model = attached(method).eval()
    controller = build_controller(model, total_steps=T)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2), 3)
    (message,) = unbound_warnings(caught)
    assert f"method {method!r}" in message and "controller.bind(optimizer)" in message
    assert controller.step == 0


# ---------------------------------------------------------------------------- an optimizer it is not bound to
NOT_BOUND = "is not bound to stepped its adapters"


def not_bound_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if NOT_BOUND in str(w.message)]


@pytest.mark.parametrize("method", RANK_METHODS)
def test_stepping_an_optimizer_the_controller_is_not_bound_to_warns_once(method):
    """The controller was bound to one optimizer and the loop stepped another over the same parameters: the model
    trained, the controller stayed at step 0 and the ranks never moved, without a word."""
    model, controller, _ = fresh(method)
    other = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(model, other, 3)
    (message,) = not_bound_warnings(caught)
    assert f"method {method!r}" in message and "controller.bind(optimizer)" in message
    assert controller.step == 0 and not unbound_warnings(caught)


class Stepping(torch.optim.Optimizer):
    """An optimizer of its own over the same parameters that steps the bound one inside its step (as a wrapper)."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        super().__init__([p for group in inner.param_groups for p in group["params"]], {})
        self.inner = inner

    def step(self, closure=None):
        return self.inner.step(closure)


@pytest.mark.parametrize("method", RANK_METHODS)
def test_gradient_accumulation_a_wrapper_and_another_models_optimizer_say_nothing(method):
    """Several training forwards per optimizer step, a wrapper stepping the bound optimizer, and an optimizer that
    trains another model: the controller runs at every step of the one that trains its adapters."""
    model, controller, optimizer = fresh(method)
    other_model, _, other_optimizer = fresh(method)
    wrapper = Stepping(optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for _ in range(3):  # accumulation: three micro-batches, one step
                model(input_ids=X, labels=Y).loss.backward()
            wrapper.step()
            wrapper.zero_grad()
            train_steps(other_model, other_optimizer, 1)
    assert not not_bound_warnings(caught) and not unbound_warnings(caught)
    assert controller.step == 3


def test_a_fixed_rank_controller_needs_no_optimizer_and_says_nothing():
    model = attached("dynarank-lora")
    build_controller(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2), 2)
    assert not unbound_warnings(caught)


# ---------------------------------------------------------------------------- an optimizer built again
@pytest.mark.parametrize("method", RANK_METHODS)
def test_building_the_optimizer_again_replaces_the_one_bound_before(method):
    """Both were bound, and the controller waited for both to step: stepping the second alone left it at step 0."""
    model, controller, first = fresh(method)
    second = controller.build_optimizer(lr=1e-2)
    assert controller.optimizers == [second]
    train_steps(model, second, 5)
    assert controller.step == 5
    with pytest.raises(RuntimeError, match="this optimizer was replaced"):
        first.step()  # the controller no longer runs in it, and its tensors are stale after a resize


def test_binding_a_replaced_optimizer_again_makes_it_the_bound_one():
    model, controller, first = fresh("ard")
    second = controller.build_optimizer(lr=1e-2)
    controller.bind(first)
    assert controller.optimizers == [first]
    train_steps(model, first, 2)
    assert controller.step == 2
    with pytest.raises(RuntimeError, match="this optimizer was replaced"):
        second.step()


# ---------------------------------------------------------------------------- what bind() refuses
@pytest.mark.parametrize("method", [*RANK_METHODS, "dynarank-lora"])
def test_an_optimizer_of_another_model_is_refused(method):
    """It was accepted, and the controller resized its own model, which nothing trained, at the other's steps."""
    mine = attached(method)
    controller = build_controller(mine, total_steps=T)
    _, _, other = fresh(method)
    with pytest.raises(ValueError, match="holds none of this controller's model's trainable parameters"):
        controller.bind(other)
    assert controller.optimizers == []


@pytest.mark.parametrize("method", RANK_METHODS)
def test_an_optimizer_whose_state_cannot_follow_a_resize_is_refused_by_bind(method):
    """Adafactor was accepted, and training failed at the first resize, mid-run."""
    model = attached(method)
    controller = build_controller(model, total_steps=T)
    with pytest.raises(ValueError, match="Adafactor keeps a factored second moment.*cannot follow"):
        controller.bind(torch.optim.Adafactor(controller.param_groups(1e-2), lr=1e-2))
    assert controller.optimizers == []


def test_fixed_ranks_take_an_optimizer_that_could_not_follow_a_resize():
    model = attached("dynarank-lora")
    controller = build_controller(model)
    controller.bind(torch.optim.Adafactor(controller.param_groups(1e-2), lr=1e-2))
    assert len(controller.optimizers) == 1


def test_a_run_length_that_is_a_bool_is_refused():
    with pytest.raises(ConfigError, match="total_steps"):
        build_controller(attached("dynarank-lora"), total_steps=True)


# ---------------------------------------------------------------------------- loading a saved state
def saved_state(method: str, steps: int = 12, total_steps: int = T) -> dict:
    model, controller, optimizer = fresh(method, total_steps)
    train_steps(model, optimizer, steps)
    return json.loads(json.dumps(controller.state_dict()))  # as a checkpoint stores it


def as_json(controller) -> str:
    return json.dumps(controller.state_dict(), sort_keys=True)


@pytest.mark.parametrize(
    "saved_by, loaded_by",
    [("elalora", "ard"), ("ard", "elalora"), ("elalora", "adalora-physical"), ("ard", "dynarank-lora")],
)
def test_a_state_of_another_method_is_refused_and_leaves_the_controller_as_it_was(saved_by, loaded_by):
    """A KeyError ('prices', 'start_budget') after the step and history were loaded, a shape error that did not say
    why, or (fixed ranks) nothing at all."""
    state = saved_state(saved_by)
    _, controller, _ = fresh(loaded_by)
    before = as_json(controller)
    with pytest.raises(ValueError, match=f"saved by method '{saved_by}'.*attached for '{loaded_by}'"):
        controller.load_state_dict(state)
    assert as_json(controller) == before and controller.step == 0


def test_a_state_of_a_run_of_another_length_is_refused_and_leaves_the_controller_as_it_was():
    state = saved_state("ard", total_steps=T)
    _, controller, _ = fresh("ard", total_steps=100)
    before = as_json(controller)
    with pytest.raises(ValueError, match=f"total_steps={T}.*total_steps=100"):
        controller.load_state_dict(state)
    assert as_json(controller) == before


def test_a_state_saved_before_method_and_run_length_were_recorded_still_loads():
    state = saved_state("ard")
    del state["method"], state["total_steps"]
    _, controller, _ = fresh("ard")
    controller.load_state_dict(state)
    assert controller.step == 12 and controller.state_dict()["history"] == state["history"]


def test_an_older_state_of_another_method_is_refused_before_anything_changes():
    """Without the method recorded, what the method needs is checked first: the load stopped with a bare KeyError
    'prices' after it had set the step (12) and the history."""
    state = saved_state("elalora")
    del state["method"], state["total_steps"]
    _, controller, _ = fresh("ard")
    before = as_json(controller)
    with pytest.raises(ValueError, match="lacks 'prices'"):
        controller.load_state_dict(state)
    assert as_json(controller) == before


# ---------------------------------------------------------------------------- the end of a run, inference mode
@pytest.mark.parametrize("method", ["elalora", "adalora-physical"])
@pytest.mark.parametrize("values_lr_ratio", [1.0, 30.0])
def test_e_folded_at_the_end_leaves_the_optimizer(method, values_lr_ratio):
    """The model dropped E, and the optimizer kept it and its moments alive. A group that held E alone stays, empty
    (a scheduler's groups still match), and the optimizer trains on."""
    model, controller, optimizer = fresh(method, values_lr_ratio=values_lr_ratio)
    groups = len(optimizer.param_groups)
    train_steps(model, optimizer, T)
    assert controller.finalized
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert held(optimizer) == trainable
    assert {id(p) for p in optimizer.state} <= trainable
    assert len(optimizer.param_groups) == groups
    train_steps(model, optimizer, 2)


@pytest.mark.parametrize("method", RANK_METHODS)
def test_a_step_under_inference_mode_is_refused_before_anything_changes(method):
    """A resize under inference mode made the new adapters inference tensors, and the next backward failed with
    'Inference tensors cannot be saved for backward'."""
    model, controller, optimizer = fresh(method)
    model(input_ids=X, labels=Y).loss.backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode(), pytest.raises(RuntimeError, match="under torch.inference_mode"):
        optimizer.step()
    assert controller.step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():  # no_grad is fine
        optimizer.step()
    assert controller.step == 1


# ---------------------------------------------------------------------------- records
def test_ard_records_count_the_ranks_each_resize_removed():
    """BudgetRecord.pruned says the ranks a step removed; ARD left it at 0 (only cut_by_alpha / cut_by_budget)."""
    model, controller, optimizer = fresh("ard", target_params=3000)
    start = controller.total_rank()
    train_steps(model, optimizer, T)
    removed = [r.pruned for r in controller.records if r.resized]
    assert removed and all(n > 0 for n in removed)
    assert sum(r.pruned for r in controller.records) == start - controller.total_rank()
