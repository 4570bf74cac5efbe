"""transformers Trainer drives the controller through DynaRankCallback, with no manual call."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import dynarank
from dynarank import DynaRankConfig, attach
from tiny_models import TokenDataset, tiny_bert


def make_trainer(tmp_path, model, accumulation=1, max_steps=30, callbacks=None):
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
    return Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks)


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
    model = attach(tiny_bert(), DynaRankConfig(method="dynarank-lora", r=2, target_modules=["query"]))
    callback = dynarank.DynaRankCallback(model)
    trainer = make_trainer(tmp_path, model, max_steps=4)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.controller.step == 4


def test_a_callback_checks_loads_into_its_model_until_another_callback_takes_over_or_training_ends(tmp_path):
    model = attach(tiny_bert(), DynaRankConfig(method="dynarank-lora", r=2, target_modules=["query"]))
    hooks, before = model._load_state_dict_pre_hooks, len(model._load_state_dict_pre_hooks)
    dynarank.DynaRankCallback(model)
    assert len(hooks) == before + 1
    callback = dynarank.DynaRankCallback(model)  # replaces the first: one check, not two
    assert len(hooks) == before + 1
    trainer = make_trainer(tmp_path, model, max_steps=2)
    callback.install(trainer)
    trainer.train()
    assert len(hooks) == before


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
    model = attach(tiny_bert(), DynaRankConfig(method="dynarank-lora", r=2, target_modules=["query"]))
    callback = dynarank.DynaRankCallback(model, on_nonfinite="stop")
    trainer = make_trainer(tmp_path, model, max_steps=5)
    callback.install(trainer)
    _nan_gradient_at(model, {2})
    with pytest.raises(FloatingPointError, match="non-finite gradients in: .*classifier"):
        trainer.train()


def test_the_gradient_check_of_a_step_reads_one_value_however_many_parameters(count_host_reads):
    model = attach(tiny_bert(), DynaRankConfig(method="dynarank-lora", r=2, target_modules=["query", "value"]))
    guard = dynarank.DynaRankCallback(model).guard
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    reads = count_host_reads()
    assert guard.bad_modules() == [] and reads["n"] == 1
    model.classifier.bias.grad[1] = float("nan")
    assert guard.bad_modules() == ["classifier"]


def test_an_optimizer_built_where_a_discarded_one_lived_has_its_steps_guarded_too(tmp_path):
    import gc

    from transformers import TrainerControl, TrainerState

    model = attach(tiny_bert(), DynaRankConfig(method="dynarank-lora", r=2, target_modules=["query"]))
    callback = dynarank.DynaRankCallback(model)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    params = [p for p in model.parameters() if p.requires_grad]

    def train_with_a_first_optimizer() -> int:  # the optimizer goes with this frame
        first = torch.optim.SGD(params, lr=0.1)
        callback.on_train_begin(args, TrainerState(max_steps=5), TrainerControl(), optimizer=first)
        callback.controller.unbind()
        return id(first)

    freed = train_with_a_first_optimizer()
    gc.collect()
    allocated = []  # kept alive, so that each new object takes another free place
    while len(allocated) < 200_000 and id(allocated[-1] if allocated else None) != freed:
        allocated.append(torch.optim.SGD.__new__(torch.optim.SGD))
    if id(allocated[-1]) != freed:
        pytest.skip("the allocator never reused the discarded optimizer's memory")
    second = allocated.pop()
    second.__init__(params, lr=0.1)
    callback.on_train_begin(args, TrainerState(max_steps=5), TrainerControl(), optimizer=second)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    second.step()
    assert callback.guard.skipped == 1 and all(p.isfinite().all() for p in params)


class StepProbe(TrainerCallback):
    """Snapshots what an optimizer step may change, just before and just after it."""

    def __init__(self, model, callback):
        self.model, self.callback, self.steps = model, callback, {}

    def snapshot(self, optimizer):
        params = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        moments = [
            {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state.get(p, {}).items()}
            for g in optimizer.param_groups
            for p in g["params"]
        ]
        scores = {k: v.clone() for k, v in self.callback.controller.state_tensors().items()}
        return params, moments, scores, self.callback.controller.step

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.before = self.snapshot(optimizer)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.steps[state.global_step + 1] = (self.before, self.snapshot(optimizer))


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


@pytest.mark.parametrize("method", ["elalora", "adalora-physical"])
def test_a_skipped_step_changes_nothing_and_the_schedule_keeps_time(tmp_path, method):
    # The SVD methods add an orthogonality gradient and score importance inside the step: a skipped step
    # must do neither, and must not let AdamW move anything.
    model = attach(tiny_bert(), DynaRankConfig(method=method, r=4, target_modules=["query", "value"], seed=0))
    callback = dynarank.DynaRankCallback(model)
    trainer = make_trainer(tmp_path, model, max_steps=20)
    callback.install(trainer)
    probe = StepProbe(model, callback)
    trainer.add_callback(probe)
    _nan_gradient_at(model, {3})
    trainer.train()
    (params, moments, scores, step), after = probe.steps[3]
    assert callback.guard.skipped == 1 and scores, "the importance averages exist by step 3"
    assert _same(after[0], params) and _same(after[1], moments) and _same(after[2], scores)
    assert after[3] == step + 1  # counted: the schedule stays in time with the Trainer
    (params4, *_), after4 = probe.steps[4]
    assert not _same(after4[0], params4)  # a normal step does update
    assert callback.controller.step == 20 and callback.controller.finalized


class Recorder(TrainerCallback):
    """Stands in for a report_to backend: keeps what on_log hands it."""

    def __init__(self):
        self.logged = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs))


@pytest.mark.parametrize("how", ["callbacks", "add_callback"])
def test_report_to_backends_see_the_ranks_without_install(tmp_path, how):
    # The Trainer puts its report_to integrations before user callbacks: the recorder plays one of them.
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=2, target_modules=["query"]))
    callback, recorder = dynarank.DynaRankCallback(model), Recorder()
    trainer = make_trainer(
        tmp_path, model, max_steps=10, callbacks=[recorder, callback] if how == "callbacks" else [recorder]
    )
    if how == "add_callback":
        trainer.add_callback(callback)
    trainer.train()
    logged = [entry for entry in recorder.logged if "loss" in entry]
    assert logged and all("dynarank/total_rank" in entry for entry in logged)


@pytest.mark.parametrize(
    "setting, named",
    [
        (lambda trainer, mp: mp.setenv("ACCELERATE_USE_FSDP", "true"), "ACCELERATE_USE_FSDP=true"),
        (lambda trainer, mp: mp.setenv("ACCELERATE_USE_DEEPSPEED", "1"), "ACCELERATE_USE_DEEPSPEED=1"),
        (lambda trainer, mp: mp.setattr(trainer.args, "deepspeed_plugin", object()), "args.deepspeed_plugin"),
        (lambda trainer, mp: mp.setattr(trainer.args, "fsdp", ["full_shard"]), "args.fsdp"),
        (lambda trainer, mp: mp.setattr(trainer, "is_fsdp_enabled", True), "trainer.is_fsdp_enabled"),
        (lambda trainer, mp: mp.setattr(trainer, "is_deepspeed_enabled", True), "trainer.is_deepspeed_enabled"),
    ],
    ids=["env-fsdp", "env-deepspeed", "deepspeed-plugin", "args-fsdp", "trainer-fsdp", "trainer-deepspeed"],
)
def test_sharded_training_is_refused_whichever_way_it_is_asked_for(tmp_path, monkeypatch, setting, named):
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=2, target_modules=["query"]))
    callback = dynarank.DynaRankCallback(model)
    trainer = make_trainer(tmp_path, model, max_steps=2)
    setting(trainer, monkeypatch)
    with pytest.raises(ValueError, match=f"FSDP and DeepSpeed ZeRO shard them .*{named}"):
        callback.install(trainer)
    if not named.startswith("trainer."):  # the Trainer's own flags are only seen through install()
        with pytest.raises(ValueError, match=f"FSDP and DeepSpeed ZeRO shard them .*{named}"):
            callback.on_train_begin(trainer.args, trainer.state, trainer.control, optimizer=None)
