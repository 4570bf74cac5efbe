"""What the Trainer integration guards: ARD's calibration sees the loss the Trainer trains on, once per step, and
nothing else (not an evaluation, not a gradient-checkpointing recomputation, not a loss the model never returned);
an optimizer whose state cannot follow a resize is refused before training; a model whose dynarank adapters would
not train (PEFT wrapped over them, or frozen) is refused."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer

import dynarank
from dynarank import DynaRankConfig, attach, elastic_layers
from dynarank.optim_state import reindex_parameter
from dynarank.training.loop import TrainSpec, train
from dynarank.training.tasks import encode_classification
from tiny_models import TokenDataset, WordTokenizer, examples, tiny_bert, token_batch, training_args

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
NO_LOSS = "no task loss was observed"


def ard_model(**shape):
    """ARD on the tiny BERT's query and value, half the run a warm-up: over 20 steps at 1e-2 the loss falls during
    warm-up, so lambda is calibrated on it (and on anything else that reaches the calibration)."""
    config = DynaRankConfig(method="ard", r=4, seed=0, target_modules=["query", "value"], warmup_frac=0.5)
    return attach(tiny_bert(**shape), config)


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_run(a, b) -> None:
    (model_a, controller_a), (model_b, controller_b) = a, b
    assert controller_a.ranks() == controller_b.ranks()
    params_a, params_b = trained(model_a), trained(model_b)
    assert params_a.keys() == params_b.keys()
    assert all(torch.equal(params_a[n], params_b[n]) for n in params_a), "the trained tensors differ"


def observed_losses(controller) -> list[tuple[int, float]]:
    """The (step, loss) pairs ARD's calibration of lambda averages (its checkpoint state holds them)."""
    return [(int(t), float(v)) for t, v in controller.state_dict()["losses"]]


class FlippedLabels(TokenDataset):
    """Held-out data the model gets wrong: its loss is nothing like the training loss."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {**item, "labels": 1 - item["labels"]}


class OwnLoss:
    """A compute_loss that computes exactly what BertForSequenceClassification computes (the model sees no labels,
    so it returns no loss of its own)."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits, labels)
        return (loss, outputs) if return_outputs else loss


def run_trainer(tmp_path, way="trainer", trainer_class=None, model=None, eval_dataset=None, **arguments):
    """Train ARD on the tiny BERT with a Trainer; 'trainer': DynaRankTrainer (or ``trainer_class``), 'callback': a
    plain Trainer (or ``trainer_class``) given DynaRankCallback. Returns (model, controller, trainer)."""
    model = ard_model() if model is None else model
    args = training_args(tmp_path, **{"max_steps": 20, "seed": 0, "learning_rate": 1e-2, **arguments})
    common = dict(model=model, args=args, train_dataset=TokenDataset(), eval_dataset=eval_dataset)
    if way == "trainer":
        trainer = (trainer_class or dynarank.DynaRankTrainer)(**common)
        callback = trainer.dynarank
    else:
        callback = dynarank.DynaRankCallback(model)
        trainer = (trainer_class or Trainer)(**common, callbacks=[callback])
    trainer.train()
    return model, callback.controller, trainer


# ---------------------------------------------------------------- evaluation is not training (defect 12)
@pytest.mark.parametrize("way", ["trainer", "callback"])
def test_evaluating_during_training_leaves_an_ard_run_unchanged(tmp_path, way):
    # No dropout: with it, transformers' own DataLoader iterators (the evaluation's too) draw from the global RNG.
    runs = []
    for evaluate in (False, True):
        extra = dict(eval_strategy="steps", eval_steps=1) if evaluate else {}
        model, controller, _ = run_trainer(
            tmp_path / str(evaluate), way, model=ard_model(**NO_DROPOUT), eval_dataset=FlippedLabels(16), **extra
        )
        runs.append((model, controller))
    assert_same_run(*runs)


def test_evaluating_in_the_training_loop_leaves_an_ard_run_unchanged():
    """The loop's evaluation (eval_every) runs in eval mode without gradients; one that computes a loss from labels,
    as the Trainer's does, must not reach ARD's calibration either."""
    ids, labels = token_batch(8, 6), torch.tensor([1, 0] * 4)
    evaluations = []

    def evaluate(model):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        model.train(was_training)
        evaluations.append(float(loss))
        return {"loss": float(loss)}

    knobs = {"warmup_frac": 0.5, "ard_lambda": 0.02}  # the loss falls during warm-up: lambda is calibrated on it
    spec = TrainSpec(
        method="ard", r=4, target_modules=["query", "value"], lr=1e-2, max_steps=20, batch_size=8, dynarank=knobs
    )
    encoded = encode_classification(WordTokenizer(), examples(160), spec.max_length)
    runs = []
    for every in (None, 1):
        done = train(tiny_bert(), encoded, 0, spec, evaluate, eval_every=every, on_step=lambda info: None)
        runs.append((done.model, done.controller))
    assert len(evaluations) == 1 + (19 + 1)  # the first run's final evaluation; the second's after steps 1-19 and final
    assert_same_run(*runs)


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_gradient_checkpointing_recomputation_is_not_observed_as_another_loss(tmp_path, reentrant):
    model = ard_model()
    calls = []
    elastic_layers(model)["bert.encoder.layer.1.attention.self.value"].register_forward_hook(lambda *_: calls.append(1))
    _, controller, _ = run_trainer(
        tmp_path,
        "callback",  # the plain Trainer: the loss reaches ARD through the model's output only
        model=model,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
        max_steps=10,
    )
    assert len(calls) == 2 * 10  # every step's forward pass, and its recomputation in the backward pass
    warmup = controller.settings.warmup_steps
    assert [t for t, _ in observed_losses(controller)] == list(range(warmup))  # one loss per warm-up step


# ---------------------------------------------------------------- the loss the Trainer trains on (defect 11)
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_compute_loss_equal_to_the_model_s_loss_gives_the_same_ard_run(tmp_path, accumulation):
    own_loss = type("OwnLossTrainer", (OwnLoss, dynarank.DynaRankTrainer), {})
    runs = [
        run_trainer(tmp_path / name, trainer_class=cls, gradient_accumulation_steps=accumulation)[:2]
        for name, cls in (("model", None), ("own", own_loss))
    ]
    assert_same_run(*runs)


@pytest.mark.parametrize("loss, accumulation", [("model", 2), ("compute_loss", 1), ("label_smoothing", 2)])
def test_ard_observes_once_per_warm_up_step_the_loss_the_trainer_logs(tmp_path, caplog, loss, accumulation):
    trainer_class = type("OwnLossTrainer", (OwnLoss, dynarank.DynaRankTrainer), {}) if loss == "compute_loss" else None
    extra = {"label_smoothing_factor": 0.1} if loss == "label_smoothing" else {}
    with caplog.at_level(logging.WARNING, logger="dynarank"):
        _, controller, trainer = run_trainer(
            tmp_path,
            trainer_class=trainer_class,
            gradient_accumulation_steps=accumulation,
            logging_steps=1,
            max_steps=10,  # warm-up: 5 steps
            **extra,
        )
    assert NO_LOSS not in caplog.text
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    observed = observed_losses(controller)
    warmup = controller.settings.warmup_steps
    assert [t for t, _ in observed] == list(range(warmup))  # once per optimizer step: no micro-batch counted twice
    assert [v for _, v in observed] == pytest.approx(logged[:warmup], abs=1e-4)  # the Trainer logs 4 decimals


def test_an_explicitly_observed_loss_replaces_what_the_model_s_output_gave_for_that_step():
    model = ard_model()
    controller = dynarank.build_controller(model, total_steps=30)
    optimizer = controller.build_optimizer(lr=1e-2)
    ids, labels = token_batch(8, 6), torch.tensor([0, 1] * 4)
    model.train()
    for value in (5.0, 4.0):
        for _ in range(2):  # two micro-batches, each observed by the caller
            model(input_ids=ids, labels=labels).loss.backward()
            controller.observe_loss(value)
        optimizer.step()
        optimizer.zero_grad()
    model(input_ids=ids, labels=labels).loss.backward()  # the hook alone: observed
    assert observed_losses(controller)[:4] == [(0, 5.0), (0, 5.0), (1, 4.0), (1, 4.0)]
    assert len(observed_losses(controller)) == 5 and observed_losses(controller)[4][0] == 2


def test_a_plain_trainer_computing_its_own_loss_is_told_to_use_dynarank_s_trainer(tmp_path, caplog):
    own_loss = type("OwnLossTrainer", (OwnLoss, Trainer), {})
    with caplog.at_level(logging.WARNING, logger="dynarank"):
        run_trainer(tmp_path, "callback", trainer_class=own_loss)
    assert NO_LOSS in caplog.text
    assert "DynaRankTrainer" in caplog.text and "with_dynarank" in caplog.text


# ---------------------------------------------------------------- optimizers whose state cannot follow a resize (3)
# optim -> what the refusal names: the optimizer's class, and why its state cannot follow
REFUSED = {
    "adafactor": "Adafactor",
    "adamw_bnb_8bit": "bitsandbytes.optim.adamw.AdamW.*8-bit",
    "paged_adamw_8bit": "bitsandbytes.optim.adamw.AdamW.*8-bit",
    "ademamix": "AdEMAMix",
}


@pytest.mark.parametrize("way", ["trainer", "callback"])
@pytest.mark.parametrize("optim", list(REFUSED))
def test_an_optimizer_whose_state_cannot_follow_a_resize_is_refused_before_training(tmp_path, way, optim):
    if optim != "adafactor":
        pytest.importorskip("bitsandbytes")
    model = ard_model()
    before = trained(model)
    with pytest.raises(ValueError, match=rf"optim='{optim}'.*{REFUSED[optim]}.*adamw_torch.*paged_adamw_32bit") as err:
        run_trainer(tmp_path, way, model=model, optim=optim)
    assert "resize" in str(err.value)
    after = trained(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # refused before the first step


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "paged_adamw_32bit", "lion_32bit"])
def test_element_wise_optimizers_carry_their_state_through_the_resizes(tmp_path, optim):
    if "32bit" in optim:
        pytest.importorskip("bitsandbytes")
    # hidden 128: every adapter matrix holds at least bitsandbytes' 4096 elements
    model = attach(
        tiny_bert(hidden_size=128, intermediate_size=256), DynaRankConfig(method="ard", r=32, ard_lambda=0.05, seed=0)
    )
    _, controller, _ = run_trainer(tmp_path, model=model, optim=optim, max_steps=16, learning_rate=1e-2)
    assert sum(record.resized for record in controller.records) > 1


def _stepped(optimizer_class, shape=(6, 5), **kwargs):
    param = torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    optimizer = optimizer_class([param], **kwargs)
    param.sum().backward()
    optimizer.step()
    return param, optimizer


@pytest.mark.parametrize("which", ["torch", "transformers", "bitsandbytes-8bit"])
def test_a_resize_under_state_it_cannot_re_index_names_the_optimizer_and_the_state(which):
    if which == "torch":
        param, optimizer = _stepped(torch.optim.Adafactor)
        name, key = "Adafactor", "row_var"
    elif which == "transformers":
        from transformers.optimization import Adafactor

        param, optimizer = _stepped(Adafactor, lr=1e-3, relative_step=False)
        name, key = "Adafactor", "exp_avg_sq_row"
    else:
        bnb = pytest.importorskip("bitsandbytes")
        param, optimizer = _stepped(bnb.optim.AdamW8bit, shape=(64, 80))  # >= 4096 elements: 8-bit state
        name, key = "AdamW8bit", "state1"
    state = dict(optimizer.state[param])
    with pytest.raises(ValueError, match=rf"{name}.*'{key}'"):
        reindex_parameter(param, 0, torch.tensor([0, 2, 3]), optimizer=optimizer)
    # Refused before anything changed: the optimizer still holds the parameter and its state.
    assert optimizer.param_groups[0]["params"][0] is param
    assert all(optimizer.state[param][k] is v for k, v in state.items())


def test_an_element_wise_state_is_re_indexed_with_its_parameter():
    param, optimizer = _stepped(torch.optim.Adam)
    moments = optimizer.state[param]["exp_avg"].clone()
    new = reindex_parameter(param, 0, torch.tensor([0, 2, 3]), optimizer=optimizer)
    assert torch.equal(optimizer.state[new]["exp_avg"], moments[[0, 2, 3]])


# ---------------------------------------------------------------- adapters that would not train (4)
def test_a_trl_trainer_given_a_peft_config_is_refused_before_it_wraps_the_model(tmp_path):
    trl = pytest.importorskip("trl")
    from peft import LoraConfig

    model = ard_model()
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=2, report_to=[])
    with pytest.raises(ValueError, match="peft_config must be None"):
        dynarank.with_dynarank(trl.SFTTrainer)(
            model=model, args=args, train_dataset=TokenDataset(), peft_config=LoraConfig(r=2, target_modules=["key"])
        )
    assert all(p.requires_grad for layer in elastic_layers(model).values() for p in layer.adapter_parameters())


@pytest.mark.parametrize("way", ["trainer", "callback"])
def test_a_model_whose_dynarank_adapters_are_all_frozen_is_refused_when_training_begins(tmp_path, way):
    model = ard_model()
    for layer in elastic_layers(model).values():
        for p in layer.adapter_parameters():
            p.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        run_trainer(tmp_path, way, model=model)


# ---------------------------------------------------------------- a method that learns ranks, trained without one
UNCONTROLLED = "trains without a rank controller"


def uncontrolled_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if UNCONTROLLED in str(w.message)]


@pytest.mark.parametrize("way", ["trainer", "callback"])
def test_training_under_the_integration_gives_no_missing_controller_warning(tmp_path, way, recwarn):
    run_trainer(tmp_path, way=way, max_steps=3)
    assert not uncontrolled_warnings(recwarn.list)


def test_a_plain_trainer_without_the_callback_warns_once_that_the_ranks_stay_fixed(tmp_path, recwarn):
    model = ard_model()
    args = training_args(tmp_path, max_steps=3, seed=0, learning_rate=1e-2)
    Trainer(model=model, args=args, train_dataset=TokenDataset()).train()
    (message,) = uncontrolled_warnings(recwarn.list)
    assert "method 'ard' learns no ranks" in message and "DynaRankCallback" in message
    assert {layer.ranks[0] for layer in elastic_layers(model).values()} == {4}  # as the warning says: fixed at r


@pytest.mark.parametrize("method", ["ard", "elalora", "adalora-physical", "dynarank-lora"])
def test_only_a_training_forward_without_a_controller_warns_and_only_for_a_method_that_learns_ranks(method, recwarn):
    model = attach(tiny_bert(), DynaRankConfig(method=method, r=2, seed=0, target_modules=["query", "value"]))
    batch = {"input_ids": token_batch()}
    model.eval()
    model(**batch)  # an evaluation
    model.train()
    with torch.no_grad():
        model(**batch)
    assert not uncontrolled_warnings(recwarn.list)
    model(**batch)
    model(**batch)
    expected = 0 if method == "dynarank-lora" else 1  # fixed ranks need no controller
    assert len(uncontrolled_warnings(recwarn.list)) == expected

    built = attach(tiny_bert(), DynaRankConfig(method=method, r=2, seed=0, target_modules=["query", "value"]))
    dynarank.build_controller(built, total_steps=100)
    built(**batch)
    assert len(uncontrolled_warnings(recwarn.list)) == expected


# ---------------------------------------------------------------- trainer.save_model()
def test_save_model_writes_a_plain_peft_adapter_that_stock_peft_loads_with_the_runs_logits(tmp_path):
    """The Trainer's own save wrote the attached model's state dict, whose base weights are named
    '<module>.base.weight': a stock from_pretrained found every adapted weight missing and drew it at random."""
    from peft import PeftModel

    model, _, trainer = run_trainer(tmp_path / "run", max_steps=6, save_steps=3, save_strategy="steps")
    out = tmp_path / "run"  # the output directory, which holds the checkpoints: they stay
    trainer.save_model()
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists() and (out / "checkpoint-6" / "model.safetensors").is_file()
    stock = PeftModel.from_pretrained(tiny_bert(), out).eval()
    batch = {"input_ids": token_batch()}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)


def _fp16_trainer_as_on_a_gpu(model, args, way):
    """A Trainer under fp16 mixed precision as accelerate runs it on a GPU (native AMP, a GradScaler; here a CPU
    one), with an overflow (inf in the task head's gradient) at optimizer steps 3 and 4."""
    from transformers import TrainerCallback

    callback = dynarank.DynaRankCallback(model) if way == "callback" else None
    trainer_class = Trainer if way == "callback" else dynarank.DynaRankTrainer
    trainer = trainer_class(
        model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback] if callback else None
    )
    trainer.accelerator.native_amp = True
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu")
    overflow = {3, 4}  # the optimizer steps whose gradients overflow
    model.classifier.weight.register_hook(
        lambda g: g * float("inf") if trainer.state.global_step + 1 in overflow else g
    )
    counts = []

    class Counts(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            counts.append((state.global_step, (callback or trainer.dynarank).controller.step))

    trainer.add_callback(Counts())
    return trainer, callback or trainer.dynarank, counts


@pytest.mark.parametrize("way", ["trainer", "callback"])
@pytest.mark.parametrize("method", ["ard", "adalora-physical"])
def test_steps_a_gradient_scaler_skips_are_counted_and_a_later_checkpoint_resumes(tmp_path, method, way):
    """An overflow makes the scaler skip a non-fused optimizer's ``step()``, so the controller's step hooks do not
    run. The callback counts the step all the same: the controller keeps the Trainer's count and a checkpoint after
    the overflow resumes. Before, the controller fell one step behind per overflow (it took the next good step for
    the skipped one, learning nothing from it), its last scheduled steps never came, and every later checkpoint was
    refused as from a run of other arguments."""
    config = DynaRankConfig(method=method, r=4, seed=0, target_modules=["query", "value"])
    args = dict(max_steps=12, fp16=True, optim="adamw_torch", save_strategy="steps", save_steps=6, seed=0)
    trainer, callback, counts = _fp16_trainer_as_on_a_gpu(
        attach(tiny_bert(**NO_DROPOUT), config), training_args(tmp_path / "run", **args), way
    )
    trainer.train()
    assert counts == [(step, step) for step in range(1, 13)]
    assert callback.skipped == 2
    resumed, callback, _ = _fp16_trainer_as_on_a_gpu(
        attach(tiny_bert(**NO_DROPOUT), config), training_args(tmp_path / "run", **args), way
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6"))
    assert callback.controller.step == 12


@pytest.mark.parametrize("method", ["ard", "elalora"])
def test_a_model_init_trainer_drives_the_model_it_trains_as_if_it_was_given(tmp_path, method):
    """``model_init`` (``hyperparameter_search``'s way) makes a new model at every ``train()``: the mixin's callback
    drives that one, and the run is the one of the same model passed in. Before, the callback drove the model the
    Trainer's ``__init__`` had made: ARD's ranks never moved, ElaLoRA refused its optimizer."""
    options = {"ard": {"ard_lambda": 0.02}, "elalora": {"target_rank": 2}}[method]  # ranks that move in 20 steps
    config = DynaRankConfig(method=method, r=4, seed=0, target_modules=["query", "value"], **options)
    made = []

    def model_init():
        made.append(attach(tiny_bert(**NO_DROPOUT), config))
        return made[-1]

    args = training_args(tmp_path / "init", max_steps=20, seed=0)
    by_init = dynarank.DynaRankTrainer(model_init=model_init, args=args, train_dataset=TokenDataset())
    by_init.train()
    assert len(made) == 2 and by_init.dynarank.model is by_init.model is made[-1]
    given = dynarank.DynaRankTrainer(
        model=attach(tiny_bert(**NO_DROPOUT), config),
        args=training_args(tmp_path / "given", max_steps=20, seed=0),
        train_dataset=TokenDataset(),
    )
    given.train()
    assert by_init.dynarank.controller.total_rank() < 4 * 8  # the ranks moved (8 groups of 4 at the start)
    assert_same_run((by_init.model, by_init.dynarank.controller), (given.model, given.dynarank.controller))


def test_a_plain_callback_under_model_init_is_refused_naming_the_way_that_follows_it(tmp_path):
    config = DynaRankConfig(method="ard", r=4, seed=0, target_modules=["query", "value"])
    callback = dynarank.DynaRankCallback(attach(tiny_bert(), config))
    trainer = Trainer(
        model_init=lambda: attach(tiny_bert(), config),
        args=training_args(tmp_path, max_steps=4),
        train_dataset=TokenDataset(),
        callbacks=[callback],
    )
    with pytest.raises(ValueError, match=r"trains another model .*model_init.*DynaRankTrainer"):
        trainer.train()


def test_under_gradient_accumulation_the_data_start_measures_as_many_examples_as_without(tmp_path):
    """ARD's ``init_batches`` counts the run's batches; a Trainer's data loader yields micro-batches, several to an
    optimizer step under gradient accumulation, so the start measures that many more of them. Before, it measured
    as many micro-batches as it should have measured batches (a half or a quarter of the data) and started at other
    ranks than the same run without accumulation."""
    starts = []
    for batch, accumulation in ((16, 1), (8, 2), (4, 4)):
        config = DynaRankConfig(method="ard", r=4, seed=0, target_modules=["query", "value"], target_params=512)
        model = attach(tiny_bert(**NO_DROPOUT), config)
        args = dict(max_steps=40, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        trainer = dynarank.DynaRankTrainer(
            model=model, args=training_args(tmp_path / str(batch), seed=0, **args), train_dataset=TokenDataset()
        )
        trainer.train()
        record = model.dynarank_rank_init
        starts.append((record["tokens"], trainer.dynarank.controller.history[0]["ranks"]))
        assert record["batches"] == 2 * accumulation  # init_batches: 40 steps // 20
    assert starts[1] == starts[0] and starts[2] == starts[0]


def test_the_mixins_data_start_measures_the_loss_the_trainer_trains_on(tmp_path, monkeypatch):
    """Label smoothing, a compute_loss_func, TRL's loss types and preference losses: the Trainer's compute_loss, not
    model(**batch).loss. Before, the start's gradients were of the model's plain loss, and a DPO or reward
    Trainer, whose batches hold no labels, failed in a TypeError (None / 1)."""
    import dynarank.integrations.transformers as integration

    measured = []

    def spy(model, batches, loss_fn, **kwargs):
        batch = next(batches)
        measured.append((float(loss_fn(model, dict(batch))), batch))
        raise RuntimeError("measured")

    monkeypatch.setattr(integration, "init_ranks", spy)
    config = DynaRankConfig(method="ard", r=4, seed=0, target_modules=["query", "value"], target_params=512)
    model = attach(tiny_bert(**NO_DROPOUT), config)

    def weighted(outputs, labels, num_items_in_batch=None):  # a Trainer's own loss, not the model's
        return 3.0 * F.cross_entropy(outputs.logits, labels)

    args = training_args(tmp_path, max_steps=20)
    trainer = dynarank.DynaRankTrainer(model=model, args=args, train_dataset=TokenDataset(), compute_loss_func=weighted)
    with pytest.raises(RuntimeError, match="measured"):
        trainer.train()
    loss, batch = measured[0]
    model.eval()
    with torch.no_grad():
        assert loss == pytest.approx(float(trainer.compute_loss(model, dict(batch))), rel=1e-6)
        assert loss == pytest.approx(3 * float(model(**batch).loss), rel=1e-6)


def test_a_callback_whose_model_returns_no_loss_for_the_data_start_says_what_to_do(tmp_path):
    class Unlabelled(TokenDataset):
        def __getitem__(self, i):
            return {"input_ids": self.ids[i]}

    config = DynaRankConfig(method="ard", r=4, seed=0, target_modules=["query", "value"], target_params=512)
    model = attach(tiny_bert(), config)
    callback = dynarank.DynaRankCallback(model)
    args = training_args(tmp_path, max_steps=20, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=Unlabelled(), callbacks=[callback])
    trainer.compute_loss = lambda model, inputs, **kwargs: model(
        **inputs
    ).logits.sum()  # no labels, a loss all the same
    with pytest.raises(ValueError, match=r"the model returns none for its batches \(they hold \['input_ids'\]\)"):
        trainer.train()
