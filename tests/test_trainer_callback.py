"""transformers Trainer drives the controller through DynaRankCallback, with no manual call."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

import dynarank
from dynarank import DynaRankConfig, attach
from dynarank.guards import nonfinite_gradients
from tiny_models import TokenDataset, tiny_bert


def make_trainer(tmp_path, model, accumulation=1, max_steps=30, callbacks=None, trainer_class=Trainer, **arguments):
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
        **arguments,
    )
    return trainer_class(model=model, args=args, train_dataset=TokenDataset(), callbacks=callbacks)


def make(way: str, tmp_path, model, **kwargs):
    """A Trainer that drives ``model``'s controller: 'callback' (a plain Trainer given DynaRankCallback) or 'trainer'
    (DynaRankTrainer, which adds its own). Returns (trainer, callback)."""
    if way == "trainer":
        trainer = make_trainer(tmp_path, model, trainer_class=dynarank.DynaRankTrainer, **kwargs)
        return trainer, trainer.dynarank
    callback = dynarank.DynaRankCallback(model)
    callbacks = kwargs.pop("callbacks", None) or []
    return make_trainer(tmp_path, model, callbacks=[*callbacks, callback], **kwargs), callback


@pytest.mark.parametrize("way", ["callback", "trainer"])
def test_ranks_change_during_train_with_no_manual_call(tmp_path, way):
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=4, target_modules=["query", "value"], ard_lambda=5.0))
    trainer, callback = make(way, tmp_path, model)
    start = dynarank.adapter_parameter_count(model)
    trainer.train()
    ctrl = callback.controller
    assert ctrl.step == 30 and ctrl.total_steps == 30
    assert dynarank.adapter_parameter_count(model) < start
    # The Trainer's optimizer holds the alphas (it takes every trainable parameter) but never steps them: the
    # controller's own optimizer does, without weight decay (the Trainer's is 0.1) and at its own rate.
    alpha = model.dynarank_ard.alpha
    assert any(p is alpha for g in trainer.optimizer.param_groups for p in g["params"])
    assert not trainer.optimizer.state.get(alpha)
    (group,) = ctrl.alpha_optimizer.param_groups
    assert group["weight_decay"] == 0.0 and ctrl.alpha_optimizer.state[alpha]["step"] > 0
    logged = [entry for entry in trainer.state.log_history if "dynarank/total_rank" in entry]
    assert logged and logged[-1]["dynarank/total_rank"] == ctrl.total_rank()
    assert "dynarank/trainable_parameters" in logged[-1]


@pytest.mark.parametrize("way", ["callback", "trainer"])
def test_gradient_accumulation_counts_optimizer_steps(tmp_path, way):
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=2, target_modules=["query"]))
    trainer, callback = make(way, tmp_path, model, accumulation=4, max_steps=6)
    trainer.train()
    assert callback.controller.step == 6  # 24 micro-batches, 6 optimizer steps


@pytest.mark.parametrize("way", ["callback", "trainer"])
def test_only_a_plain_trainer_is_told_that_its_save_model_writes_no_peft_adapter(tmp_path, caplog, way):
    model = attach(tiny_bert(), DynaRankConfig(method="dynarank-lora", r=2, target_modules=["query"]))
    trainer, _ = make(way, tmp_path, model, max_steps=2)
    with caplog.at_level("WARNING", logger="dynarank"):
        trainer.train()
    told = "dynarank.export_peft(model, dir)" in caplog.text
    assert told == (way == "callback")


def test_fixed_rank_lora_trains_through_the_callback(tmp_path):
    model = attach(tiny_bert(), DynaRankConfig(method="dynarank-lora", r=2, target_modules=["query"]))
    callback = dynarank.DynaRankCallback(model)
    trainer = make_trainer(tmp_path, model, max_steps=4)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.controller.step == 4


@pytest.mark.parametrize("kind", ["classify", "causal-lm"])
def test_a_trainer_left_at_transformers_default_rate_is_warned_with_the_method_s_default(tmp_path, caplog, kind):
    from tiny_models import tiny_llama

    base, target = (tiny_bert(), "query") if kind == "classify" else (tiny_llama(), "q_proj")
    model = attach(base, DynaRankConfig(method="ard", r=2, target_modules=[target]))
    data = TokenDataset()
    if kind == "causal-lm":  # next-token labels
        data = [{"input_ids": ids, "labels": ids} for ids in data.ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[dynarank.DynaRankCallback(model)])
    with caplog.at_level("WARNING", logger="dynarank"):
        trainer.train()
    expected = f"ard on a {kind} model trains at {dynarank.default_lr('ard', kind):g} by default"
    assert "transformers' default (5e-05)" in caplog.text and expected in caplog.text


def test_the_trainer_s_warning_gives_the_rate_at_the_adapter_s_budget(tmp_path, caplog):
    base = tiny_bert()
    lora_r1 = sum(m.in_features + m.out_features for n, m in base.named_modules() if n.endswith("query"))
    model = attach(base, DynaRankConfig(method="ard", r=4, target_modules=["query"], target_params=lora_r1))
    data = TokenDataset()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=10, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[dynarank.DynaRankCallback(model)])
    with caplog.at_level("WARNING", logger="dynarank"):
        trainer.train()
    rate = dynarank.default_lr("ard", "classify", budget=1)
    assert rate != dynarank.default_lr("ard", "classify")  # the budget's rate, not the middle one's
    assert f"set learning_rate={rate:g} (dynarank.default_lr('ard', 'classify', budget=1))" in caplog.text


def test_a_trainer_given_its_own_rate_is_not_warned(tmp_path, caplog):
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=2, target_modules=["query"]))
    trainer, _ = make("callback", tmp_path, model, max_steps=10)  # learning_rate=1e-2
    with caplog.at_level("WARNING", logger="dynarank"):
        trainer.train()
    assert "transformers' default" not in caplog.text


def _nan_gradient_at(model, bad_steps: set[int]):
    """Make the classifier's gradient NaN on the given optimizer steps (1-based; one micro-batch each)."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("nan") if calls["n"] in bad_steps else grad

    model.classifier.weight.register_hook(hook)


def test_a_step_with_nan_gradients_is_skipped_and_the_schedule_keeps_time(tmp_path, caplog):
    model = attach(tiny_bert(), DynaRankConfig(method="elalora", r=4, target_modules=["query", "value"], seed=0))
    trainer, callback = make("callback", tmp_path, model, max_steps=20)
    _nan_gradient_at(model, {3})
    with caplog.at_level("WARNING"):
        trainer.train()
    assert callback.skipped == 1 and "non-finite gradients in: " in caplog.text and "classifier" in caplog.text
    assert callback.controller.step == 20 and getattr(callback.controller, "finalized", True)  # E folded at the end
    assert all(p.isfinite().all() for p in model.parameters())


def test_the_stop_policy_raises_on_nan_gradients(tmp_path):
    model = attach(tiny_bert(), DynaRankConfig(method="dynarank-lora", r=2, target_modules=["query"]))
    callback = dynarank.DynaRankCallback(model, on_nonfinite="stop")
    trainer = make_trainer(tmp_path, model, max_steps=5, callbacks=[callback])
    _nan_gradient_at(model, {2})
    with pytest.raises(FloatingPointError, match="non-finite gradients in: .*classifier"):
        trainer.train()


def test_the_gradient_check_of_a_step_reads_one_value_however_many_parameters(count_host_reads):
    model = attach(tiny_bert(), DynaRankConfig(method="dynarank-lora", r=2, target_modules=["query", "value"]))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    reads = count_host_reads()
    assert nonfinite_gradients(model) == [] and reads["n"] == 1
    model.classifier.bias.grad[1] = float("nan")
    assert nonfinite_gradients(model) == ["classifier"]


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


@pytest.mark.parametrize("method", ["elalora", "adalora-physical", "ard"])
def test_a_skipped_step_changes_nothing_and_the_schedule_keeps_time(tmp_path, method):
    # The SVD methods add an orthogonality gradient and score importance inside the step, ARD steps its alphas: a
    # skipped step must do none of it, and must not let AdamW move anything.
    options = {"lambda_mode": "absolute", "warmup_frac": 0.0} if method == "ard" else {}  # alphas learn from step 1
    model = attach(
        tiny_bert(), DynaRankConfig(method=method, r=4, target_modules=["query", "value"], seed=0, **options)
    )
    trainer, callback = make("trainer", tmp_path, model, max_steps=20)
    probe = StepProbe(model, callback)
    trainer.add_callback(probe)
    _nan_gradient_at(model, {3})
    trainer.train()
    (params, moments, scores, step), after = probe.steps[3]
    assert callback.skipped == 1 and scores, "the importance averages (ARD: the alphas' moments) exist by step 3"
    assert _same(after[0], params) and _same(after[1], moments) and _same(after[2], scores)
    assert after[3] == step + 1  # counted: the schedule stays in time with the Trainer
    (params4, *_), after4 = probe.steps[4]
    assert not _same(after4[0], params4)  # a normal step does update
    assert callback.controller.step == 20 and getattr(callback.controller, "finalized", True)


class Recorder(TrainerCallback):
    """Stands in for a report_to backend: keeps what on_log hands it."""

    def __init__(self):
        self.logged = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logged.append(dict(logs))


def test_report_to_backends_see_the_ranks_through_the_dynarank_trainer(tmp_path):
    # The Trainer puts its report_to integrations before user callbacks: the recorder plays one of them.
    # DynaRankTrainer puts its callback first, so they log the ranks.
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=2, target_modules=["query"]))
    recorder = Recorder()
    trainer, _ = make("trainer", tmp_path, model, max_steps=10, callbacks=[recorder])
    trainer.train()
    logged = [entry for entry in recorder.logged if "loss" in entry]
    assert logged and all("dynarank/total_rank" in entry for entry in logged)


def test_the_plain_callback_logs_the_ranks_into_the_trainers_log_history(tmp_path):
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=2, target_modules=["query"]))
    trainer, _ = make("callback", tmp_path, model, max_steps=10)
    trainer.train()
    assert all("dynarank/total_rank" in entry for entry in trainer.state.log_history if "loss" in entry)


def test_with_dynarank_mixes_into_any_trainer_class_once():
    class MyTrainer(Trainer):
        pass

    made = dynarank.with_dynarank(MyTrainer)
    assert issubclass(made, MyTrainer) and issubclass(made, dynarank.DynaRankTrainerMixin)
    assert dynarank.with_dynarank(MyTrainer) is made and dynarank.with_dynarank(made) is made


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
    trainer, callback = make("trainer", tmp_path, model, max_steps=2)
    setting(trainer, monkeypatch)
    with pytest.raises(ValueError, match=f"DeepSpeed ZeRO shard them .*{named}.*--fsdp"):
        trainer.train()
    assert callback.controller is None
    if not named.startswith("trainer."):  # a callback sees the arguments and the environment, not the Trainer
        with pytest.raises(ValueError, match=f"DeepSpeed ZeRO shard them .*{named}.*--fsdp"):
            callback.on_train_begin(trainer.args, trainer.state, trainer.control, optimizer=None)


def test_the_plain_callback_refuses_clipping_under_ddp_and_names_the_trainer_that_can(tmp_path, monkeypatch):
    """Resized tensors' gradients must be averaged before clipping, which only DynaRankTrainer can do."""
    import dynarank.integrations.transformers as integration

    monkeypatch.setattr(integration, "world", lambda: (0, 2))
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=2, target_modules=["query"]))
    trainer, callback = make("callback", tmp_path, model, max_steps=2)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    trainer.state.max_steps = 20
    with pytest.raises(ValueError, match=r"max_grad_norm=1.0\).*DynaRankTrainer.*max_grad_norm=0"):
        callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=model, optimizer=optimizer)
    trainer.args.max_grad_norm = 0.0
    callback.controller = None
    callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=model, optimizer=optimizer)


def test_the_dynarank_trainer_gives_the_singular_values_their_rate_and_the_schedule_follows(tmp_path):
    config = DynaRankConfig(method="elalora", r=2, target_modules=["query", "value"], values_lr_ratio=30.0, seed=0)
    model = attach(tiny_bert(), config)
    trainer, callback = make("trainer", tmp_path, model, max_steps=6)
    trainer.train()
    e = model.dynarank_svd.values if hasattr(model, "dynarank_svd") else None
    groups = trainer.optimizer.param_groups
    (alone,) = [g for g in groups if g.get("name") == "E"]
    others = [g for g in groups if g is not alone]
    assert all(len(g["params"]) for g in others)
    # E folded away at the end leaves the optimizer too; its group stays (empty), the schedule's groups still match
    assert alone["params"] == ([] if e is None else [e])
    # the Trainer's schedule, built after the group, scales it as the others: 30x their rate at every step
    assert alone["initial_lr"] == pytest.approx(30 * 1e-2)
    assert all(alone["lr"] == pytest.approx(30 * g["lr"]) for g in others)
    assert callback.controller.settings_used()["values_lr_ratio"] == 30.0


def test_a_plain_trainer_training_the_singular_values_at_the_adapters_rate_is_warned(tmp_path, caplog):
    config = DynaRankConfig(method="elalora", r=2, target_modules=["query", "value"], values_lr_ratio=30.0, seed=0)
    trainer, _ = make("callback", tmp_path, attach(tiny_bert(), config), max_steps=4)
    with caplog.at_level("WARNING", logger="dynarank"):
        trainer.train()
    assert "train at the adapters' learning rate in this Trainer's optimizer" in caplog.text
    assert "30 times it (values_lr_ratio, config)" in caplog.text
    caplog.clear()
    same = DynaRankConfig(method="elalora", r=2, target_modules=["query", "value"], values_lr_ratio=1.0, seed=0)
    trainer, _ = make("callback", tmp_path, attach(tiny_bert(), same), max_steps=4)
    with caplog.at_level("WARNING", logger="dynarank"):
        trainer.train()
    assert "values_lr_ratio" not in caplog.text
