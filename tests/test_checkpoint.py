"""Exact resume, atomic checkpoints, damaged-file detection and the non-finite guard."""

from __future__ import annotations

import logging

import pytest
import torch

import dynarank
import dynarank.storage
from dynarank import checkpoint, elastic_layers
from dynarank.checkpoint import CheckpointError
from dynarank.training.loop import NonFiniteError, TrainSpec, nonfinite_gradients, train_classifier
from tiny_models import WordTokenizer, examples, tiny_bert

VARIANTS = {  # name -> (method, its options)
    "ard": ("ard", {"ard_lambda": 1e-4, "lambda_mode": "absolute"}),
    "elalora-shrinking": ("elalora", {"target_rank": 2}),  # prunes 4 -> 2 while reallocating
    "elalora-values-30x": ("elalora", {"values_lr_ratio": 30.0}),  # E in an optimizer group of its own
}


def spec(method: str = "ard", steps: int = 40) -> TrainSpec:
    method, options = VARIANTS.get(method, (method, {}))
    return TrainSpec(
        method=method,
        r=4,
        target_modules=["query", "value"],
        lr=1e-2,
        max_steps=steps,
        batch_size=8,
        dynarank=options,
    )


class Crash(Exception):
    pass


def crash_at(step: int):
    def on_step(record):
        if record["step"] == step:
            raise Crash

    return on_step


def trained_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "method", ["ard", "dynarank-lora", "elalora", "elalora-shrinking", "elalora-values-30x", "adalora-physical"]
)
def test_a_run_killed_mid_schedule_and_resumed_equals_the_uninterrupted_run(tmp_path, method):
    full = train_classifier(
        tiny_bert(), WordTokenizer(), examples(), spec(method), run_dir=tmp_path / "a", save_every=5
    )
    with pytest.raises(Crash):
        train_classifier(
            tiny_bert(),
            WordTokenizer(),
            examples(),
            spec(method),
            run_dir=tmp_path / "b",
            save_every=5,
            on_step=crash_at(23),
        )
    assert checkpoint.list_checkpoints(tmp_path / "b")[-1].name == "step-20"
    resumed = train_classifier(
        tiny_bert(), WordTokenizer(), examples(), spec(method), run_dir=tmp_path / "b", save_every=5, resume=True
    )
    # The interruption (step 23, checkpoint 20) falls inside the rank-change schedule.
    if method == "ard":
        resize_steps = [h["step"] for h in full.controller.history]
        assert any(20 < s < 30 for s in resize_steps[1:-1]), resize_steps
    elif method != "dynarank-lora":  # ElaLoRA / AdaLoRA: scores and rounds still run after step 20
        assert full.controller.schedule.phase(21) == "active"
    assert resumed.metrics["ranks"] == full.metrics["ranks"]
    expected, got = trained_state(full.model), trained_state(resumed.model)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed.controller.history == full.controller.history


@pytest.mark.parametrize("method", ["lora", "dora", "full", "adalora"])
def test_a_baseline_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path, method):
    # Stock PEFT AdaLoRA keeps importance moving averages and a rank pattern outside the model: the
    # checkpoint carries them. Killed at 13, saved at 10: early in its pruning (steps 5 to 31), where a
    # resume that restarted the averages would mask other ranks.
    def run(path, **kwargs):
        model = tiny_bert()
        return train_classifier(model, WordTokenizer(), examples(), spec(method), run_dir=path, save_every=5, **kwargs)

    full = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", on_step=crash_at(13))
    assert checkpoint.list_checkpoints(tmp_path / "b")[-1].name == "step-10"
    resumed = run(tmp_path / "b", resume=True)
    expected, got = trained_state(full.model), trained_state(resumed.model)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    if method == "adalora":
        allocators = [r.model.base_model.rankallocator for r in (full, resumed)]
        assert allocators[0].peft_config.rank_pattern == allocators[1].peft_config.rank_pattern
        assert any(not kept for pattern in allocators[0].peft_config.rank_pattern.values() for kept in pattern)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_classifier(tiny_bert(), WordTokenizer(), examples(), spec(steps=10), run_dir=run, save_every=5)
    original = dynarank.storage._write_synced

    def dying_writer(path, data):
        if path.name == checkpoint.STATE_FILE:
            path.write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt  # the process is killed mid-write
        return original(path, data)

    monkeypatch.setattr(dynarank.storage, "_write_synced", dying_writer)
    model = train_classifier(tiny_bert(), WordTokenizer(), examples(), spec(steps=10), run_dir=tmp_path / "x").model
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(run, model, torch.optim.AdamW(model.parameters()), None, None, step=15)
    monkeypatch.undo()
    (run / "checkpoints" / ".step-99.leftover").mkdir()  # what a SIGKILL would leave behind
    path, state, _ = checkpoint.latest(run)
    assert path.name == "step-10" and state["step"] == 10
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step-5", "step-10"]


def test_temporary_folders_of_killed_saves_are_removed_by_the_next_save(tmp_path):
    run = tmp_path / "run"
    result = train_classifier(tiny_bert(), WordTokenizer(), examples(), spec(steps=5), run_dir=run, save_every=5)
    for orphan in (".step-10.k2j3h4", ".step-10.k2j3h4.old"):  # what a SIGKILL during a save leaves
        (run / "checkpoints" / orphan).mkdir()
        (run / "checkpoints" / orphan / checkpoint.TENSORS_FILE).write_bytes(b"half")
    (run / "checkpoints" / "user-notes").mkdir()  # not ours: left alone
    model = result.model
    checkpoint.save(run, model, torch.optim.AdamW(model.parameters()), None, result.controller, step=10)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-5", "user-notes"]


def test_a_checkpoint_left_aside_by_a_save_killed_between_its_renames_is_restored_and_resumed_from(tmp_path):
    run = tmp_path / "run"
    train_classifier(tiny_bert(), WordTokenizer(), examples(), spec(steps=10), run_dir=run, save_every=5)
    root = run / "checkpoints"
    # A save replacing step-10 moved it aside and was killed before its new folder took the name.
    (root / "step-10").rename(root / ".step-10.k2j3h4l5.old")
    (root / ".step-10.k2j3h4l5").mkdir()
    path, state, _ = checkpoint.latest(run)
    assert path.name == "step-10" and state["step"] == 10
    assert sorted(p.name for p in root.iterdir()) == ["step-10", "step-5"]


@pytest.mark.parametrize("content", ["[]", "null", '"step-10"', "3"])
def test_a_state_file_that_is_not_a_json_object_is_a_damaged_checkpoint(tmp_path, content):
    run = tmp_path / "run"
    train_classifier(tiny_bert(), WordTokenizer(), examples(), spec(steps=10), run_dir=run, save_every=5)
    (run / "checkpoints" / "step-10" / checkpoint.STATE_FILE).write_text(content)
    with pytest.raises(CheckpointError, match="state.json is damaged .*not an object"):
        checkpoint.read(run / "checkpoints" / "step-10")
    assert checkpoint.latest(run)[0].name == "step-5"


def test_a_truncated_checkpoint_is_detected_and_the_previous_one_is_used(tmp_path):
    run = tmp_path / "run"
    train_classifier(tiny_bert(), WordTokenizer(), examples(), spec(steps=10), run_dir=run, save_every=5)
    newest = run / "checkpoints" / "step-10" / checkpoint.TENSORS_FILE
    newest.write_bytes(newest.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="checksum"):
        checkpoint.read(newest.parent)
    assert checkpoint.latest(run)[0].name == "step-5"


def test_an_edited_state_file_is_detected_reported_and_the_previous_checkpoint_used(tmp_path, caplog):
    run = tmp_path / "run"
    train_classifier(tiny_bert(), WordTokenizer(), examples(), spec(steps=10), run_dir=run, save_every=5)
    state_file = run / "checkpoints" / "step-10" / checkpoint.STATE_FILE
    state_file.write_text(state_file.read_text().replace('"step": 10', '"step": 9', 1))
    with pytest.raises(CheckpointError, match="state.json does not match its checksum"):
        checkpoint.read(state_file.parent)
    with caplog.at_level(logging.WARNING):
        assert checkpoint.latest(run)[0].name == "step-5"
    assert "skipping a damaged checkpoint" in caplog.text


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    train_classifier(tiny_bert(), WordTokenizer(), examples(), spec(steps=20), run_dir=tmp_path, save_every=4)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-12", "step-16", "step-20"]


def test_a_restored_model_takes_the_output_scale_its_checkpoint_trained_with_whatever_the_defaults_are_now():
    """The scale is part of what a run trained: restored with an attach whose defaults resolve to another scale (a
    newer dynarank), the model keeps the checkpoint's, and computes what the saved one did."""
    config = dynarank.DynaRankConfig(method="adalora-physical", r=3, target_modules=["query", "value"], seed=0)
    saved = dynarank.attach(tiny_bert(), config)
    for layer in elastic_layers(saved).values():
        layer.scaling = 0.625  # a scale today's defaults do not give
        torch.nn.init.normal_(layer.group_weight, std=0.1)
    optimizer = torch.optim.AdamW([p for p in saved.parameters() if p.requires_grad])
    state, tensors = checkpoint.capture(saved, optimizer, None, None, step=0)
    restored = dynarank.attach(tiny_bert(), config)
    checkpoint.restore_model(restored, state, tensors)
    assert {layer.scaling for layer in elastic_layers(restored).values()} == {0.625}
    ids = torch.tensor([[2, 5, 7, 9]])
    assert torch.equal(restored(input_ids=ids).logits, saved(input_ids=ids).logits)
    state["output_scales"] = {name: -1.0 for name in state["output_scales"]}
    with pytest.raises(CheckpointError, match="output scales"):
        checkpoint.restore_model(dynarank.attach(tiny_bert(), config), state, tensors)


def _svd_state(**fields):
    """(config, controller state) of an AdaLoRA-style controller on a tiny classifier."""
    config = dynarank.DynaRankConfig(method="adalora-physical", r=3, target_modules=["query", "value"], **fields)
    model = dynarank.attach(tiny_bert(), config)
    return config, dynarank.build_controller(model, total_steps=20).state_dict()


def test_a_restored_svd_run_keeps_the_penalty_and_start_it_trained_with_whatever_the_defaults_are_now():
    """A run started under a version whose defaults gave another orthogonality weight or start (AdaLoRA-style's
    causal-LM default kept the papers' penalty until the twentieth session) continues as it trained: the saved
    values replace what the defaults resolve to now, and the run's settings say where they came from."""
    config, state = _svd_state()
    state["settings"].update(ortho_weight=0.1, svd_init="lora")  # what an older version resolved
    restored = dynarank.attach(tiny_bert(), config)
    controller = dynarank.build_controller(restored, total_steps=20, restoring=True)
    assert (controller.ortho_weight, controller.svd_init) == (0.0, "adalora")  # today's classifier defaults
    controller.load_state_dict(state)
    assert (controller.ortho_weight, controller.svd_init) == (0.1, "lora")
    assert "restored run" in controller.settings_used()["ortho_weight_source"]


@pytest.mark.parametrize(
    "fields, saved",
    [
        ({"ortho_weight": 0.0}, {"ortho_weight": 0.1}),  # given in the config, and not what the run trained with
        ({}, {"values_lr_ratio": 30.0}),  # the optimizer's groups are built from it before the state loads
    ],
)
def test_a_restored_svd_run_refuses_a_setting_other_than_the_one_it_trained_with_where_it_cannot_take_it(fields, saved):
    config, state = _svd_state(**fields)
    state["settings"].update(saved)
    controller = dynarank.build_controller(dynarank.attach(tiny_bert(), config), total_steps=20, restoring=True)
    before = controller.ortho_weight, controller.values_lr_ratio
    ((name, value),) = saved.items()
    with pytest.raises(ValueError, match=rf"trained with {name}={value!r}.*with {name}={value!r} in its config"):
        controller.load_state_dict(state)
    assert (controller.ortho_weight, controller.values_lr_ratio) == before


def test_a_checkpoint_does_not_load_into_a_different_architecture(tmp_path):
    train_classifier(tiny_bert(), WordTokenizer(), examples(), spec(steps=5), run_dir=tmp_path, save_every=5)
    with pytest.raises(CheckpointError, match="does not fit"):
        train_classifier(
            tiny_bert(num_labels=3), WordTokenizer(), examples(), spec(steps=5), run_dir=tmp_path, resume=True
        )


def test_resume_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train_classifier(tiny_bert(), WordTokenizer(), examples(), spec(steps=5), run_dir=tmp_path, resume=True)


def poison_loss_at(model, step: int):
    """Make the model's loss NaN on its ``step``-th training forward pass."""
    forward, calls = model.forward, {"n": 0}

    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == step and out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    model.forward = patched
    return model


@pytest.mark.parametrize("method", ["ard", "elalora", "adalora-physical"])
def test_a_nan_loss_skips_the_step_and_the_rank_schedule_keeps_time(caplog, method):
    with caplog.at_level(logging.WARNING):
        result = train_classifier(poison_loss_at(tiny_bert(), 3), WordTokenizer(), examples(), spec(method, steps=20))
    ctrl = result.controller
    assert result.metrics["skipped_steps"] == 1
    # The diagnostic pass finds no module output at fault: the NaN came from the loss itself.
    assert "non-finite values at step 3 in: loss (first non-finite output: none; the loss computation" in caplog.text
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    # The skipped step is counted: the schedule ends where total_steps puts it, with a final snapshot,
    # and ElaLoRA / AdaLoRA fold their E into the adapter (the model carries no controller state after).
    assert ctrl.step == 20 and ctrl.history[-1]["step"] == 20
    if method != "ard":
        assert ctrl.finalized and not hasattr(result.model, "dynarank_svd")


def test_a_nan_loss_names_the_first_module_whose_output_was_non_finite(caplog):
    model = tiny_bert()
    value = model.bert.encoder.layer[1].attention.self.value  # becomes the base of its adapter
    value.register_forward_hook(lambda module, args, out: out * float("nan"))
    with caplog.at_level(logging.WARNING):
        result = train_classifier(model, WordTokenizer(), examples(), spec("dynarank-lora", steps=1))
    assert result.metrics["skipped_steps"] == 1
    assert "first non-finite output: bert.encoder.layer.1.attention.self.value.base)" in caplog.text


def test_a_nan_gradient_names_the_module_that_produced_it(caplog):
    model = tiny_bert()
    model.classifier.weight.register_hook(lambda grad: grad * float("nan"))  # the loss itself stays finite
    with caplog.at_level(logging.WARNING):
        result = train_classifier(model, WordTokenizer(), examples(), spec("dynarank-lora", steps=2))
    assert result.metrics["skipped_steps"] == 2
    assert "non-finite values at step 1 in: classifier" in caplog.text


def test_checking_the_gradients_reads_one_value_however_many_parameters_and_names_modules_only_if_bad(
    count_host_reads,
):
    model = attached()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    assert len(params) >= 10
    reads = count_host_reads()
    assert nonfinite_gradients(model) == [] and reads["n"] == 1
    model.classifier.weight.grad[0, 0] = float("inf")
    assert nonfinite_gradients(model) == ["classifier"]


def test_the_stop_policy_raises_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(NonFiniteError, match=r"training stopped. The last checkpoint, .*step-6, is kept"):
        train_classifier(
            poison_loss_at(tiny_bert(), 7),
            WordTokenizer(),
            examples(),
            spec(steps=10),
            run_dir=tmp_path,
            save_every=3,
            on_nonfinite="stop",
        )
    path, state, _ = checkpoint.latest(tmp_path)
    assert state["step"] == 6 and path.name == "step-6"


def test_the_controller_takes_no_rank_decision_from_non_finite_alpha_gradients(caplog):
    model = tiny_bert()
    result = train_classifier(model, WordTokenizer(), examples(), spec(steps=6))
    ctrl = result.controller
    alpha = next(iter(model.dynarank_ard.parameters()))
    before = alpha.detach().clone()
    alpha.grad = torch.full_like(alpha, float("nan"))
    with caplog.at_level(logging.WARNING):
        ctrl.before_step(ctrl.optimizers[0])
    assert alpha.grad is None and "non-finite gradient on the alphas" in caplog.text
    assert torch.equal(alpha.detach(), before)
    assert elastic_layers(model)


def test_alphas_an_update_made_non_finite_are_restored_to_their_last_value_with_a_warning(caplog):
    model = tiny_bert()
    ctrl = train_classifier(model, WordTokenizer(), examples(), spec(steps=6)).controller
    alpha = next(iter(model.dynarank_ard.parameters()))
    before = alpha.detach().clone()
    with torch.no_grad():
        alpha[0] = float("inf")  # what an overflowing optimizer update leaves
    with caplog.at_level(logging.WARNING):
        ctrl.after_step(ctrl.optimizers[0])
    assert "became non-finite; restored their last value" in caplog.text
    assert torch.isfinite(alpha).all() and torch.equal(alpha.detach(), before)


@pytest.mark.parametrize("run_dir", [None, "empty"])
def test_the_stop_policy_does_not_claim_a_checkpoint_that_was_never_written(tmp_path, run_dir):
    with pytest.raises(NonFiniteError) as info:
        train_classifier(
            poison_loss_at(tiny_bert(), 2),
            WordTokenizer(),
            examples(),
            spec(steps=10),
            run_dir=tmp_path / run_dir if run_dir else None,
            save_every=3 if run_dir else None,
            on_nonfinite="stop",
        )
    assert "No checkpoint was written" in str(info.value) and "is kept" not in str(info.value)


# ---------------------------------------------------------------- Trainer checkpoints' dynarank/ state


def attached(method: str = "adalora-physical", **options):
    """A tiny BERT with per-head groups (4 heads) on query and value."""
    options = {"granularity": "head", **options}
    return dynarank.attach(
        tiny_bert(), dynarank.DynaRankConfig(method=method, r=4, target_modules=["query", "value"], seed=0, **options)
    )


@pytest.mark.parametrize("key", ["step", "total_steps", "method", "layout", "controller"])
def test_a_trainer_state_without_a_required_key_is_refused_naming_it(tmp_path, key):
    model = attached()
    checkpoint.save_trainer_state(tmp_path, model, dynarank.build_controller(model, total_steps=10))
    state, tensors = checkpoint.read(tmp_path / checkpoint.TRAINER_DIR)
    del state[key]
    checkpoint._write(tmp_path / checkpoint.TRAINER_DIR, state, tensors)  # checksums of the edited state
    with pytest.raises(CheckpointError, match=f"state.json lacks {key}: not a Trainer checkpoint's state"):
        checkpoint.read_trainer_state(tmp_path)


def test_a_trainer_state_records_the_output_scales_the_callback_restores(tmp_path):
    model = attached()  # AdaLoRA-style: its default scale is the fraction of the start it ends at (2/3)
    checkpoint.save_trainer_state(tmp_path, model, dynarank.build_controller(model, total_steps=10))
    state, _ = checkpoint.read_trainer_state(tmp_path)
    assert state["output_scales"] == {name: 2 / 3 for name in elastic_layers(model)}
    other = attached(lora_alpha=4)  # scale 1
    checkpoint.restore_output_scales(other, state["output_scales"])
    assert {layer.scaling for layer in elastic_layers(other).values()} == {2 / 3}


def _layout_of(model) -> dict:
    """Each layer's slots and the very parameter objects it holds."""
    return {n: (layer.slots, layer.shared_weight, layer.group_weight) for n, layer in elastic_layers(model).items()}


def _unchanged(model, before: dict) -> bool:
    now = _layout_of(model)
    return now.keys() == before.keys() and all(
        now[n][0] == before[n][0] and now[n][1] is before[n][1] and now[n][2] is before[n][2] for n in now
    )


def _damage_last(layout: dict, how: str) -> tuple[dict, str]:
    last = list(layout)[-1]
    if how == "groups":
        layout[last] = layout[last][:-1]
        return layout, f"{last} has 3 rank groups in the checkpoint, 4 in the model"
    if how == "slot":
        layout[last][0] = [0, -1]
        return layout, f"{last}: the checkpoint's slot lists are not lists of non-negative integers"
    layout["bert.encoder.layer.9.attention.self.query"] = layout.pop(last)
    return layout, "adapted modules differ .*layer.9"


@pytest.mark.parametrize("how", ["groups", "slot", "names"])
def test_a_layout_that_does_not_fit_is_refused_before_any_layer_changes(how):
    # The first modules would fit: none of them may be resized before the last one is found wrong.
    model = attached(granularity="head")  # 4 heads: 4 rank groups per module
    layout, message = _damage_last({n: [g[:2] for g in layer.slots] for n, layer in elastic_layers(model).items()}, how)
    before = _layout_of(model)
    with pytest.raises(CheckpointError, match=message):
        checkpoint.restore_layout(model, layout)
    assert _unchanged(model, before)


def test_a_trainer_state_left_aside_by_a_save_killed_between_its_renames_is_restored_when_read(tmp_path):
    model = attached()
    checkpoint.save_trainer_state(tmp_path, model, dynarank.build_controller(model, total_steps=10))
    (tmp_path / checkpoint.TRAINER_DIR).rename(tmp_path / f".{checkpoint.TRAINER_DIR}.x1y2z3w4.old")
    state, _ = checkpoint.read_trainer_state(tmp_path)
    assert state["total_steps"] == 10 and sorted(p.name for p in tmp_path.iterdir()) == [checkpoint.TRAINER_DIR]
