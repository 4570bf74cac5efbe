"""What dynarank's Trainer integration relies on in transformers, one test per hook: if a release changes one of
these, this file says which, before the integration misbehaves."""

from __future__ import annotations

import inspect

import torch
from transformers import Trainer, TrainerCallback

import dynarank
from dynarank import DynaRankConfig, attach
from dynarank.layer import ElasticLoRALinear
from tiny_models import TokenDataset, tiny_bert, training_args


def trainer_for(tmp_path, callbacks=(), trainer_class=Trainer, eval_dataset=None, **arguments):
    model = attach(tiny_bert(), DynaRankConfig(r=2, target_modules=["query"]))
    args = training_args(tmp_path, **{"max_steps": 4, **arguments})
    trainer = trainer_class(
        model=model, args=args, train_dataset=TokenDataset(), eval_dataset=eval_dataset, callbacks=list(callbacks)
    )
    return model, trainer


class Seen(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.events.append(("begin", optimizer is not None and bool(optimizer.state)))

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        self.params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.events.append(("pre", bool(grads), float(norm)))

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        moved = any(not torch.equal(p.detach(), self.params[n]) for n, p in model.named_parameters() if p.requires_grad)
        self.events.append(("post", moved))

    def on_save(self, args, state, control, **kwargs):
        folder = f"{args.output_dir}/checkpoint-{state.global_step}"
        import os

        self.events.append(("save", os.path.isfile(f"{folder}/model.safetensors")))


def test_on_pre_optimizer_step_sees_the_clipped_gradients_before_the_update_and_on_optimizer_step_after(tmp_path):
    seen = Seen()
    _, trainer = trainer_for(tmp_path, [seen], max_grad_norm=1e-3)
    trainer.train()
    pre = [e for e in seen.events if e[0] == "pre"]
    post = [e for e in seen.events if e[0] == "post"]
    assert len(pre) == len(post) == 4
    assert all(has_grads and norm <= 1e-3 * 1.0001 for _, has_grads, norm in pre)  # clipped already
    assert all(moved for _, moved in post)


def test_on_train_begin_gets_the_optimizer_after_a_resumed_state_is_loaded_into_it(tmp_path):
    _, trainer = trainer_for(tmp_path, save_strategy="steps", save_steps=2)
    trainer.train()
    seen = Seen()
    _, resumed = trainer_for(tmp_path, [seen])
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert seen.events[0] == ("begin", True)  # the moments of checkpoint-2 are in the optimizer already


def test_on_save_runs_after_the_trainer_wrote_the_checkpoint(tmp_path):
    seen = Seen()
    _, trainer = trainer_for(tmp_path, [seen], save_strategy="steps", save_steps=2)
    trainer.train()
    assert [e for e in seen.events if e[0] == "save"] == [("save", True), ("save", True)]


def test_resuming_and_loading_the_best_model_go_through_the_layers_load_state_dict(tmp_path, monkeypatch):
    calls = []
    real = ElasticLoRALinear._load_from_state_dict

    def counted(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    _, trainer = trainer_for(tmp_path, save_strategy="steps", save_steps=2)
    trainer.train()
    monkeypatch.setattr(ElasticLoRALinear, "_load_from_state_dict", counted)
    _, resumed = trainer_for(tmp_path)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert len(calls) == 2  # the query layer of each of the two layers
    calls.clear()
    _, best = trainer_for(
        tmp_path / "best",
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        eval_dataset=TokenDataset(8),
    )
    best.train()
    assert len(calls) == 2


def test_the_trainer_calls_training_step_per_micro_batch_and_flags_the_last_one_of_each_optimizer_step(tmp_path):
    flags = []

    class Probe(Trainer):
        def training_step(self, model, inputs, *args, **kwargs):
            flags.append(self.accelerator.sync_gradients)
            return super().training_step(model, inputs, *args, **kwargs)

    _, trainer = trainer_for(tmp_path, trainer_class=Probe, gradient_accumulation_steps=3)
    trainer.train()
    # One flagged micro-batch per optimizer step (the last of its accumulation, or of the epoch), never more than 3.
    assert flags.count(True) == trainer.state.global_step == 4 and flags[-1]
    runs = "".join("T" if f else "F" for f in flags).split("T")[:-1]
    assert all(len(run) <= 2 for run in runs)


def test_train_takes_the_checkpoint_to_resume_from_as_its_first_argument():
    assert list(inspect.signature(Trainer.train).parameters)[1] == "resume_from_checkpoint"


def test_the_mixin_puts_its_callback_ahead_of_the_report_to_integrations(tmp_path):
    _, trainer = trainer_for(tmp_path, trainer_class=dynarank.DynaRankTrainer)
    assert isinstance(trainer.callback_handler.callbacks[0], dynarank.DynaRankCallback)
