"""transformers Trainer drives the controller through DynaRankCallback, with no manual call."""

from __future__ import annotations

from transformers import Trainer, TrainingArguments

import dynarank
from dynarank import DynaRankConfig, attach
from tiny_models import TokenDataset, tiny_bert


def make_trainer(tmp_path, model, accumulation=1, max_steps=30):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulation,
        learning_rate=1e-2,
        logging_steps=5,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        weight_decay=0.1,
    )
    return Trainer(model=model, args=args, train_dataset=TokenDataset())


def test_ranks_change_during_train_with_no_manual_call(tmp_path):
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=4, target_modules=["query", "value"], ard_lambda=5.0))
    callback = dynarank.DynaRankCallback(model)
    trainer = make_trainer(tmp_path, model)
    callback.install(trainer)
    start = dynarank.adapter_parameter_count(model)
    trainer.train()
    ctrl = callback.controller
    assert ctrl.step == 30 and ctrl.total_steps == 30
    assert dynarank.adapter_parameter_count(model) < start
    alpha_group = next(g for g in trainer.optimizer.param_groups if g.get("name") == "ard_alpha")
    assert alpha_group["weight_decay"] == 0.0
    assert all(
        id(p) not in {id(a) for a in alpha_group["params"]}
        for g in trainer.optimizer.param_groups
        if g is not alpha_group
        for p in g["params"]
    )
    logged = [entry for entry in trainer.state.log_history if "dynarank/total_rank" in entry]
    assert logged and logged[-1]["dynarank/total_rank"] == ctrl.total_rank()
    assert "dynarank/trainable_parameters" in logged[-1]


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=2, target_modules=["query"]))
    callback = dynarank.DynaRankCallback(model)
    trainer = make_trainer(tmp_path, model, accumulation=4, max_steps=6)
    callback.install(trainer)
    trainer.train()
    assert callback.controller.step == 6  # 24 micro-batches, 6 optimizer steps


def test_fixed_rank_lora_trains_through_the_callback(tmp_path):
    model = attach(tiny_bert(), DynaRankConfig(method="lora", r=2, target_modules=["query"]))
    callback = dynarank.DynaRankCallback(model)
    trainer = make_trainer(tmp_path, model, max_steps=4)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.controller.step == 4


def _nan_gradient_at(model, bad_steps: set[int]):
    """Make the classifier's gradient NaN on the given optimizer steps (1-based; one micro-batch each)."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] in bad_steps else grad

    model.classifier.weight.register_hook(hook)


def test_a_step_with_nan_gradients_is_skipped_and_the_schedule_keeps_time(tmp_path, caplog):
    model = attach(tiny_bert(), DynaRankConfig(method="elalora", r=4, target_modules=["query", "value"], seed=0))
    callback = dynarank.DynaRankCallback(model)
    trainer = make_trainer(tmp_path, model, max_steps=20)
    callback.install(trainer)
    _nan_gradient_at(model, {3})
    with caplog.at_level("WARNING"):
        trainer.train()
    assert callback.guard.skipped == 1 and "non-finite gradients in: " in caplog.text and "classifier" in caplog.text
    assert callback.controller.step == 20 and callback.controller.finalized  # E folded at the end
    assert all(p.isfinite().all() for p in model.parameters())


def test_the_stop_policy_raises_on_nan_gradients(tmp_path):
    import pytest

    model = attach(tiny_bert(), DynaRankConfig(method="lora", r=2, target_modules=["query"]))
    callback = dynarank.DynaRankCallback(model, on_nonfinite="stop")
    trainer = make_trainer(tmp_path, model, max_steps=5)
    callback.install(trainer)
    _nan_gradient_at(model, {2})
    with pytest.raises(FloatingPointError, match="non-finite gradients in: .*classifier"):
        trainer.train()
