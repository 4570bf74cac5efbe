"""transformers Trainer resume_from_checkpoint and load_best_model_at_end of a rank-changing run: exact, or a clear
error; through DynaRankTrainer and through the plain callback."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from transformers import Trainer, TrainerCallback

import dynarank
from dynarank import DynaRankConfig, attach, checkpoint, elastic_layers
from dynarank.checkpoint import CheckpointError
from tiny_models import TokenDataset, tiny_bert, training_args

STEPS, SAVE = 24, 10
# Per method: the options, and the steps after the checkpoint at which its ranks still change.
METHODS = {
    "ard": {"ard_lambda": 0.02},  # lambda relative to the warm-up's loss gain: partial collapse, cuts to step 18
    "elalora": {},  # per head: ranks move between heads in rounds from step 6 to 19
    "adalora-physical": {},  # AdaLoRA-style pruning per matrix, last cut at step 12
}
GROUPS = {"elalora": {"granularity": "head"}}  # ElaLoRA reallocates between the heads


# Evaluate every 4 steps and load the checkpoint of the best 'pick' (the metric the test's evaluate returns) at the end.
BEST_AT_END = dict(eval_strategy="steps", eval_steps=4, load_best_model_at_end=True, metric_for_best_model="pick")


def build(method: str, out, save_steps: int | None = SAVE, way: str = "trainer", evaluate=None, **arguments):
    """Model, callback and Trainer; ``way``: 'trainer' (DynaRankTrainer), 'callbacks' (Trainer(callbacks=[...])) or
    'add_callback' (trainer.add_callback after the Trainer is built); ``evaluate``: the Trainer's compute_metrics
    (evaluated on 16 examples); ``arguments``: more TrainingArguments."""
    options = {**METHODS.get(method, {}), **GROUPS.get(method, {})}
    config = DynaRankConfig(method=method, r=4, target_modules=["query", "value"], seed=0, **options)
    model = attach(tiny_bert(), config)
    args = training_args(
        out,
        max_steps=STEPS,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        dataloader_num_workers=0,
        logging_steps=1000,
        seed=0,
        **arguments,
    )
    callback = None if way == "trainer" else dynarank.DynaRankCallback(model)
    trainer = (dynarank.DynaRankTrainer if way == "trainer" else Trainer)(
        model=model,
        args=args,
        train_dataset=TokenDataset(),
        eval_dataset=TokenDataset(16) if evaluate else None,
        compute_metrics=evaluate,
        callbacks=[callback] if way == "callbacks" else None,
    )
    if way == "add_callback":
        trainer.add_callback(callback)
    return model, callback or trainer.dynarank, trainer


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module", params=list(METHODS))
def uninterrupted(request, tmp_path_factory):
    """A full run that saved checkpoint-10 on its way (its ranks are changing there)."""
    out = tmp_path_factory.mktemp(request.param)
    model, callback, trainer = build(request.param, out)
    trainer.train()
    return request.param, out, model, callback.controller


@pytest.mark.parametrize("way", ["trainer", "callbacks"])
def test_a_resumed_trainer_run_ends_bitwise_equal_to_the_uninterrupted_run(uninterrupted, tmp_path, way):
    """The plain callback finds the checkpoint the Trainer resumed from in output_dir: resume from a copy there."""
    method, out, model, controller = uninterrupted
    history = [(h["step"], h["ranks"]) for h in controller.history]
    at_save = next(ranks for step, ranks in reversed(history) if step <= SAVE)
    assert at_save != history[0][1], "the checkpoint is taken before any rank changed"
    assert any(step > SAVE and ranks != at_save for step, ranks in history), "no rank change after the checkpoint"
    saved = json.loads((out / f"checkpoint-{SAVE}" / "dynarank" / "state.json").read_text())
    assert saved["step"] == SAVE and saved["total_steps"] == STEPS

    fresh, callback, trainer = build(method, tmp_path, save_steps=None, way=way)
    shutil.copytree(out / f"checkpoint-{SAVE}", tmp_path / f"checkpoint-{SAVE}")
    trainer.train(resume_from_checkpoint=str(tmp_path / f"checkpoint-{SAVE}"))
    assert callback.controller.step == STEPS
    assert callback.controller.ranks() == controller.ranks()
    assert callback.controller.history == controller.history
    expected, got = trained(model), trained(fresh)
    assert expected.keys() == got.keys()
    for name in expected:  # bitwise on CPU: same data order, RNG streams, optimizer moments and rank decisions
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.parametrize("way", ["trainer", "callbacks"])
@pytest.mark.parametrize("method", list(METHODS))
def test_a_run_resumed_from_the_checkpoint_of_its_last_step_ends_equal_to_it(tmp_path, method, way):
    """A process killed after the last step's checkpoint (in the final evaluation, say) is resumed from it. The SVD
    methods fold E into the adapters at the end of training: while that came before the last checkpoint, the resume
    zeroed or changed ElaLoRA's adapters silently and AdaLoRA-style's refused its optimizer."""
    model, _, trainer = build(method, tmp_path / "run", save_steps=STEPS)
    trainer.train()
    fresh, callback, resumed = build(method, tmp_path / "resumed", save_steps=None, way=way)
    shutil.copytree(tmp_path / "run" / f"checkpoint-{STEPS}", tmp_path / "resumed" / f"checkpoint-{STEPS}")
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / f"checkpoint-{STEPS}"))
    assert callback.controller.step == STEPS
    expected, got = trained(model), trained(fresh)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_resume_from_checkpoint_true_takes_the_newest_checkpoint_with_dynarank_state(tmp_path, caplog):
    model, callback, trainer = build("adalora-physical", tmp_path / "run", save_steps=8)
    trainer.train()
    shutil.rmtree(tmp_path / "run" / "checkpoint-24" / "dynarank")  # killed between the Trainer's save and ours
    fresh, callback, trainer = build("adalora-physical", tmp_path / "run", save_steps=None)
    with caplog.at_level(logging.WARNING):
        trainer.train(resume_from_checkpoint=True)
    assert "passing over checkpoint-24" in caplog.text
    expected, got = trained(model), trained(fresh)
    assert all(torch.equal(expected[name], got[name]) for name in expected)  # went on from checkpoint-16


@pytest.mark.parametrize("way", ["trainer", "callbacks"])
def test_a_checkpoint_without_dynarank_state_is_refused_with_what_to_do(tmp_path, way):
    model, callback, trainer = build("ard", tmp_path / "run")
    trainer.train()
    shutil.rmtree(tmp_path / "run" / f"checkpoint-{SAVE}" / "dynarank")
    fresh, callback, trainer = build("ard", tmp_path / "run", save_steps=None, way=way)
    with pytest.raises(CheckpointError, match="holds no dynarank state .*cannot restart mid-run"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{SAVE}"))


def test_the_plain_callback_says_what_to_do_for_a_checkpoint_outside_output_dir(uninterrupted, tmp_path):
    method, out, model, controller = uninterrupted
    fresh, callback, trainer = build(method, tmp_path / "elsewhere", save_steps=None, way="add_callback")
    with pytest.raises(CheckpointError, match=r"holds no dynarank state.*DynaRankTrainer or with_dynarank"):
        trainer.train(resume_from_checkpoint=str(out / f"checkpoint-{SAVE}"))


def test_a_checkpoint_whose_dynarank_state_does_not_match_its_weights_is_refused(uninterrupted, tmp_path):
    method, out, model, controller = uninterrupted
    bad = tmp_path / "bad" / f"checkpoint-{SAVE}"  # its dynarank state records another layout than its weights have
    shutil.copytree(out / f"checkpoint-{SAVE}", bad)
    state, tensors = checkpoint.read(bad / checkpoint.TRAINER_DIR)
    last = list(state["layout"])[-1]
    state["layout"][last] = state["layout"][last][:-1]
    checkpoint._write(bad / checkpoint.TRAINER_DIR, state, tensors)
    fresh, callback, trainer = build(method, tmp_path / "out", save_steps=None)
    with pytest.raises(CheckpointError, match="do not have the slot layout recorded in"):
        trainer.train(resume_from_checkpoint=str(bad))


def test_a_resume_with_another_run_length_is_refused(tmp_path):
    build("elalora", tmp_path / "run")[2].train()
    fresh, callback, trainer = build("elalora", tmp_path / "other", save_steps=None)
    trainer.args.max_steps = STEPS + 6
    with pytest.raises(CheckpointError, match=f"step {SAVE} of {STEPS}: the rank schedule is placed in the run"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{SAVE}"))


class LogitsAtSave(TrainerCallback):
    """The model's logits on a fixed batch at every checkpoint: what loading that checkpoint must give back."""

    def __init__(self, model):
        self.model, self.logits, self.batch = model, {}, TokenDataset(4).ids

    def __call__(self) -> torch.Tensor:
        training = self.model.training
        self.model.eval()
        with torch.no_grad():
            logits = self.model(input_ids=self.batch).logits
        self.model.train(training)
        return logits

    def on_save(self, args, state, control, **kwargs):
        self.logits[state.global_step] = self()


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


@pytest.mark.parametrize("way", ["trainer", "callbacks"])
@pytest.mark.parametrize("end", [STEPS, 12], ids=["run-to-its-end", "stopped-early"])
@pytest.mark.parametrize("method", list(METHODS))
def test_load_best_model_at_end_gives_the_model_the_best_checkpoints_layout_and_function(tmp_path, method, end, way):
    # Run to its end, the run has dropped what the checkpoint computed with (ARD's mask in the final phase,
    # ElaLoRA / AdaLoRA's E once folded); stopped early (early stopping), it has not.
    best, evaluations = 8, []

    def pick(_):  # the evaluation at step 8 scores best; the ranks change after it
        evaluations.append(None)
        return {"pick": float(len(evaluations) * 4 == best)}

    model, callback, trainer = build(
        method,
        tmp_path,
        save_steps=4,
        way=way,
        evaluate=pick,
        **BEST_AT_END,
    )
    logits = LogitsAtSave(model)
    trainer.add_callback(logits)
    trainer.add_callback(StopAt(end))
    trainer.train()

    assert trainer.state.global_step == end
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best}")
    layout = {step: checkpoint.read_trainer_state(tmp_path / f"checkpoint-{step}")[0]["layout"] for step in (best, end)}
    assert layout[best] != layout[end], "the layout did not change after the best checkpoint"
    assert {name: layer.slots for name, layer in elastic_layers(model).items()} == layout[best]
    torch.testing.assert_close(logits(), logits.logits[best], rtol=0, atol=1e-6)


class DeleteAt(TrainerCallback):
    def __init__(self, step, path):
        self.step, self.path = step, path

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            shutil.rmtree(self.path)


def test_load_best_model_at_end_needs_nothing_but_the_best_checkpoints_weights(tmp_path):
    """The weights carry their slot layout (and a gate the run dropped since is folded in on load): the best model
    loads even when the best checkpoint's dynarank/ folder is gone."""
    model, callback, trainer = build(
        "adalora-physical",
        tmp_path,
        save_steps=4,
        evaluate=lambda _: {"pick": 1.0},  # ties: the first evaluation, at step 4, stays the best
        **BEST_AT_END,
    )
    logits = LogitsAtSave(model)
    trainer.add_callback(logits)
    trainer.add_callback(DeleteAt(6, tmp_path / "checkpoint-4" / "dynarank"))
    trainer.add_callback(StopAt(12))
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-4")
    saved = checkpoint.read_trainer_state(tmp_path / "checkpoint-12")[0]["layout"]
    assert {name: layer.slots for name, layer in elastic_layers(model).items()} != saved  # step 4's layout
    torch.testing.assert_close(logits(), logits.logits[4], rtol=0, atol=1e-6)
