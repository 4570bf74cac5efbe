"""What a rank controller holds, and for how long: memory follows the ranks.

A resize replaces the adapters' tensors; nothing of the controller keeps a replaced tensor (nor its gradient) alive.
The SVD methods' gathers (the rank scores', the orthogonality penalty's) are counted in ``held_bytes`` while they are
held, and freed when ranks are final. The model's hooks hold their controller weakly: a copy of the model copies no
controller, and a dropped controller is collected, its hooks taken off the model. An optimizer's position table
keeps one entry per parameter it holds, however many resizes replace them."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from dynarank import DynaRankConfig, RankController, attach, build_controller
from dynarank.controllers.importance import TripletPlan
from dynarank.optim_state import state_bytes
from dynarank.training.loop import training_state_bytes
from tiny_models import tiny_bert, token_batch

SVD_METHODS = ["elalora", "adalora-physical"]
T = 30  # steps of a run: warm-up, rounds at every step of the budgeting phase, the final phase
X, Y = token_batch(8, 6), torch.tensor([0, 1] * 4)
HOOKS = ("_forward_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
PHASES = {
    "ard": dict(rank_init="uniform", ard_lambda=1.0),
    "elalora": dict(granularity="head"),
    "adalora-physical": dict(granularity="head", target_rank=2),
}


def attached(method: str, **knobs):
    torch.manual_seed(0)
    base = tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = DynaRankConfig(
        method=method, r=4, target_modules="all-linear", seed=0, resize_every=1, **PHASES[method], **knobs
    )
    return attach(base, config).train()


def train_step(model, optimizer) -> None:
    model(input_ids=X, labels=Y).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def adapter_tensors(controller) -> list[torch.Tensor]:
    """Every adapter factor of the model, and E (SVD methods; the controller's own once folded)."""
    return [p for layer in controller.layers.values() for p in layer.factors()] + [controller.values.values]


def own_tensor_bytes(obj, depth: int = 0, seen: set | None = None) -> int:
    """Bytes of the tensors ``obj`` holds in its attributes, lists and dicts that are not parameters (each storage
    once): a plan's own gathers, without the model's tensors it reads."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.nn.Parameter) or isinstance(obj, torch.nn.Module) or depth > 4:
        return 0
    if torch.is_tensor(obj):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (list, tuple)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return 0
    return sum(own_tensor_bytes(item, depth + 1, seen) for item in items)


def hook_counts(model) -> dict[str, int]:
    return {attr: len(getattr(model, attr)) for attr in HOOKS}


def live(cls) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), cls))


# ---------------------------------------------------------------------------- replaced tensors
@pytest.mark.parametrize("method", SVD_METHODS)
def test_no_tensor_a_resize_replaced_stays_alive_during_or_after_the_run(method):
    """Before, the rank scores' plan kept the parameters it was built for (and their gradients, which no zero_grad
    clears once the optimizer holds their successors) to the end of the run and after."""
    model = attached(method)
    controller = build_controller(model, total_steps=T)
    optimizer = controller.build_optimizer(lr=1e-2)
    replaced: list[weakref.ref] = []
    for _ in range(T):
        before = {id(t): weakref.ref(t) for t in adapter_tensors(controller)}
        train_step(model, optimizer)
        now = {id(t) for t in adapter_tensors(controller)}
        replaced += [ref for i, ref in before.items() if i not in now]
        gc.collect()
        assert all(ref() is None for ref in replaced), f"step {controller.step}"
    assert sum(record.resized for record in controller.records) > 3  # the run did resize, many times
    assert controller.finalized


def test_the_score_plan_keeps_no_parameter_alive_and_is_built_again_for_a_new_one():
    """The plan's key holds its parameters weakly: a freed one is collected, and a new tensor in its place (even one
    that takes its id) gets gathers of its own, never the plan built for the freed one."""
    model = attached("elalora")
    controller = build_controller(model, total_steps=T)
    layers = controller.layers
    params = [p.detach().clone() for p in controller._scored_parameters()]
    flat = torch.rand(sum(p.numel() for p in params))
    plan = TripletPlan()
    plan.scores(layers, params, flat)
    built = plan.row_gather
    plan.scores(layers, params, flat)
    assert plan.row_gather is built  # the same parameters: the gathers are kept
    freed, first = weakref.ref(params[0]), id(params[0])
    del params[0]
    gc.collect()
    assert freed() is None
    for _ in range(1000):  # a new tensor of the same shape, by preference at the freed one's address
        fresh = torch.empty(controller._scored_parameters()[0].shape)
        if id(fresh) == first:
            break
    params.insert(0, fresh)
    plan.scores(layers, params, flat)
    assert plan.row_gather is not built


# ---------------------------------------------------------------------------- what held_bytes counts
@pytest.mark.parametrize("method", SVD_METHODS)
def test_held_bytes_counts_the_gathers_of_the_scores_and_the_penalty_and_nothing_is_left_once_folded(method):
    """Before, held_bytes (and so the run's footprint records) counted the importance EMAs only, not the gathers,
    which hold an int64 entry per scored element (twice the adapters' float32 bytes), and the plans outlived the
    run."""
    model = attached(method, ortho_weight=0.1)
    controller = build_controller(model, total_steps=T)
    optimizer = controller.build_optimizer(lr=1e-2)
    checked = 0
    while not controller.finalized:
        train_step(model, optimizer)
        scores, penalty = own_tensor_bytes(controller._triplets), own_tensor_bytes(controller._orthogonality)
        if scores and penalty:
            held = controller.importance.held_bytes() + scores + penalty
            assert controller.held_bytes() == held, f"step {controller.step}"
            params = [p for p in model.parameters() if p.requires_grad]
            trained = sum(p.numel() * p.element_size() for p in params) + state_bytes(optimizer, params)
            assert training_state_bytes(model, optimizer, controller) == trained + held  # what the footprint records
            checked += 1
    assert checked > 3
    # Ranks are final and E is folded: nothing of the scores or the penalty is held any more.
    assert own_tensor_bytes(controller._triplets) == own_tensor_bytes(controller._orthogonality) == 0
    assert controller.held_bytes() == 0


@pytest.mark.parametrize("method", SVD_METHODS)
def test_the_score_gathers_are_freed_with_the_scores_when_the_budgeting_phase_ends(method):
    model = attached(method)
    controller = build_controller(model, total_steps=T)
    optimizer = controller.build_optimizer(lr=1e-2)
    while controller.step < controller.schedule.end:
        train_step(model, optimizer)
        if controller.step < controller.schedule.end:
            controller.triplet_scores()  # what a round reads: the plan is built
            assert own_tensor_bytes(controller._triplets) > 0
    assert own_tensor_bytes(controller._triplets) == 0
    assert controller.importance.held_bytes() == 0


# ---------------------------------------------------------------------------- the model's hooks
def test_a_copy_of_an_ard_model_in_warm_up_copies_no_controller_nor_optimizer():
    """Before, ARD's warm-up loss hook was a bound method of the controller: copy.deepcopy(model) copied the controller
    and its optimizers (their state too), and the copy's training forwards were recorded by that copy."""
    model = attached("ard", warmup_frac=0.5)
    controller = build_controller(model, total_steps=T)
    optimizer = controller.build_optimizer(lr=1e-2)
    for _ in range(3):
        train_step(model, optimizer)
    controllers, optimizers = live(RankController), live(torch.optim.Optimizer)
    snapshot = copy.deepcopy(model)
    assert (live(RankController), live(torch.optim.Optimizer)) == (controllers, optimizers)
    losses = list(controller._losses)
    snapshot(input_ids=X, labels=Y)  # a training forward of the copy is no loss of this run
    assert controller._losses == losses
    model(input_ids=X, labels=Y)  # one of the model is
    assert len(controller._losses) == len(losses) + 1


@pytest.mark.parametrize("method", ["ard", *SVD_METHODS])
def test_a_dropped_controller_is_collected_and_its_hooks_leave_with_the_next_controller_built(method):
    """Before, ARD's loss hook kept a controller dropped in warm-up (and its optimizer, with the tensors it held)
    alive, recording the next controller's losses; every controller's load hooks stayed on the model for good."""
    model = attached(method, warmup_frac=0.5)
    controller = build_controller(model, total_steps=T)
    optimizer = controller.build_optimizer(lr=1e-2)
    one_controller = hook_counts(model)
    for _ in range(3):
        train_step(model, optimizer)
    dropped, dropped_optimizer = weakref.ref(controller), weakref.ref(optimizer)
    del controller, optimizer
    gc.collect()
    assert dropped() is None and dropped_optimizer() is None
    model(input_ids=X, labels=Y).loss.backward()  # its hooks, still on the model, do nothing
    again = build_controller(model, total_steps=T)  # the model trains on with a new controller, which hears it
    optimizer = again.build_optimizer(lr=1e-2)
    assert hook_counts(model) == one_controller  # the new controller's hooks, none of the dropped one's
    train_step(model, optimizer)
    assert again.step == 1
    if method == "ard":
        assert len(again._losses) == 1


# ---------------------------------------------------------------------------- the optimizer's position table
def test_the_position_table_keeps_one_entry_per_parameter_the_optimizer_holds_across_resizes():
    """Before, every parameter a resize replaced left its entry behind (1,648 entries for 17 parameters after 400
    ElaLoRA steps)."""
    model = attached("elalora")
    controller = build_controller(model, total_steps=T)
    optimizer = controller.build_optimizer(lr=1e-2)
    for _ in range(T):
        train_step(model, optimizer)
    assert sum(record.resized for record in controller.records) > 3
    table = optimizer._dynarank_positions
    held = {id(p): (g, i) for g, group in enumerate(optimizer.param_groups) for i, p in enumerate(group["params"])}
    assert len(table) <= len(held)
    assert all(held.get(key) == where for key, where in table.items())
