"""The score EMAs live in two flat buffers, each parameter's state a view of them; a resize re-indexes the states
of the modules it touches, and the next update packs them again, copying the untouched parameters' states from the
old buffers in runs. Packing is a copy: every state keeps its values bitwise, and the update that follows is the one
parameter by parameter."""

from __future__ import annotations

import torch

from dynarank import DynaRankConfig, attach, build_controller, elastic_layers
from tiny_models import randomize_adapters, tiny_bert

TARGETS = ["query", "value", "attention.output.dense", "intermediate.dense"]


def _controller():
    model = tiny_bert()
    attach(model, DynaRankConfig(method="elalora", r=3, target_modules=TARGETS, granularity="head", seed=0))
    ctrl = build_controller(model, total_steps=50)
    randomize_adapters(model, seed=1)
    return model, ctrl


def _random_grads(ctrl, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ctrl._scored_parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _states(ctrl):
    params = [p for p in ctrl._scored_parameters() if p.numel()]
    states = [ctrl.importance.state_of(p) for p in params]
    return [(state["sensitivity"].clone(), state["uncertainty"].clone()) for state in states]


def _expected_update(ctrl, before):
    """The EMA step of every parameter on its own (importance.py's formula), from the states ``before``."""
    b1, b2 = ctrl.importance.beta1, ctrl.importance.beta2
    out = []
    for p, (ibar, ubar) in zip([p for p in ctrl._scored_parameters() if p.numel()], before):
        sensitivity = (p.detach() * p.grad).abs()
        ibar = ibar * b1 + sensitivity * (1 - b1)
        out.append((ibar, ubar * b2 + (sensitivity - ibar).abs() * (1 - b2)))
    return out


def _assert_packed(ctrl):
    """Every state is a view of one of the two buffers (one storage per kind), none held apart by the carrier."""
    params = [p for p in ctrl._scored_parameters() if p.numel()]
    assert not ctrl.importance.carrier.state
    for key in ("sensitivity", "uncertainty"):
        storages = {ctrl.importance.state_of(p)[key].untyped_storage().data_ptr() for p in params}
        assert len(storages) == 1, key


def test_after_a_resize_the_update_repacks_every_state_unchanged_and_steps_as_parameter_by_parameter():
    model, ctrl = _controller()
    for seed in (0, 1):  # two packed updates: the EMAs are not zero
        _random_grads(ctrl, seed)
        ctrl.importance.update()
    names = list(elastic_layers(model))
    ctrl.resize({names[0]: {0: [0, 2], 1: [1]}, names[3]: {0: [1]}}, {names[2]: {1: 1}, names[5]: {0: 1, 3: 2}})
    _random_grads(ctrl, 2)
    before = _states(ctrl)  # the re-indexed states of the touched modules, the views of the others
    held = sum(2 * 4 * p.numel() for p in ctrl._scored_parameters())  # two float32 EMAs per element
    assert ctrl.held_bytes() == held  # the carrier's states and the buffers' share, each counted once
    old = ctrl.importance._packed
    ctrl.importance.update()
    assert ctrl.importance._packed is not old
    _assert_packed(ctrl)
    assert ctrl.held_bytes() == held
    for (ibar, ubar), (want_i, want_u) in zip(_states(ctrl), _expected_update(ctrl, before)):
        torch.testing.assert_close(ibar, want_i, rtol=1e-6, atol=0)  # float32 rounding of the fused update only
        torch.testing.assert_close(ubar, want_u, rtol=1e-6, atol=1e-12)


def test_packing_is_a_copy_states_replaced_or_new_included():
    model, ctrl = _controller()
    _random_grads(ctrl, 0)
    ctrl.importance.update()
    params = [p for p in ctrl._scored_parameters() if p.numel()]
    # a state replaced outright (a restore; module 3, which the resize leaves alone), states re-indexed by a
    # resize (modules 1 and 4), the rest still views of the buffers
    ctrl.importance.set_state(params[6], torch.full(params[6].shape, 2.0), torch.full(params[6].shape, 3.0))
    names = list(elastic_layers(model))
    ctrl.resize({names[1]: {0: [0]}}, {names[4]: {2: 1}})
    before = _states(ctrl)
    ctrl.importance._pack([p for p in ctrl._scored_parameters() if p.numel()])
    _assert_packed(ctrl)
    after = _states(ctrl)
    assert len(after) == len(before)
    for (a_i, a_u), (b_i, b_u) in zip(after, before):
        assert torch.equal(a_i, b_i) and torch.equal(a_u, b_u)
    # a parameter no longer tracked drops out; the others keep their values
    kept = [p for p in ctrl._scored_parameters() if p.numel()][2:]
    snapshot = [ctrl.importance.state_of(p)["sensitivity"].clone() for p in kept]
    ctrl.importance.track(kept)
    ctrl.importance._pack(kept)
    assert ctrl.importance.held() == kept
    for p, want in zip(kept, snapshot):
        assert torch.equal(ctrl.importance.state_of(p)["sensitivity"], want)


def test_clearing_the_scores_frees_the_buffers_and_the_next_update_starts_from_zero():
    _, ctrl = _controller()
    _random_grads(ctrl, 0)
    ctrl.importance.update()
    ctrl.importance.clear()
    assert ctrl.importance._packed is None and not ctrl.importance.carrier.state and not ctrl.importance.held()
    assert ctrl.held_bytes() == 0
    ctrl.importance.update()
    for p in ctrl._scored_parameters():
        if p.numel():
            sensitivity = (p.detach() * p.grad).abs()
            torch.testing.assert_close(
                ctrl.importance.state_of(p)["sensitivity"], sensitivity * (1 - ctrl.importance.beta1)
            )
    assert ctrl.held_bytes() == sum(2 * 4 * p.numel() for p in ctrl._scored_parameters())
