"""TRL's SFTTrainer drives dynarank unchanged (``peft_config=None``, the attached model passed in): text, messages and
prompt / completion data, gradient checkpointing on (TRL's default), ranks changing, alphas stepped by their own
optimizer, a killed-and-resumed run equal to the straight one; on a float and on a 4-bit base."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import dynarank
from dynarank import DynaRankConfig, attach, elastic_layers
from dynarank.quantized import is_repacked, keep_training_layout, quantization_of
from tiny_models import save_tiny_model_dir

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

STEPS, SAVE = 10, 5


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _rows(kind: str, n: int = 48) -> list[dict]:
    if kind == "text":
        return [{"text": f"question {i}: what is {i} plus one? answer: {i + 1}."} for i in range(n)]
    if kind == "messages":
        return [
            {"messages": [_turn("user", f"what is {i} plus one?"), _turn("assistant", f"it is {i + 1}.")]}
            for i in range(n)
        ]
    return [
        {"prompt": [_turn("user", f"what is {i} plus one?")], "completion": [_turn("assistant", f"it is {i + 1}.")]}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """The tiny Llama (4 query / 2 key-value heads) with the MiniLM tokenizer and a chat template."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-chat"), kind="llama", chat=True)


def load_base(chat_dir, quantize: str | None = None):
    extra = {}
    if quantize:
        from dynarank.training.models import bitsandbytes_config

        extra["quantization_config"] = bitsandbytes_config(quantize)
    return AutoModelForCausalLM.from_pretrained(chat_dir, **extra)


def build(chat_dir, out, data: str = "messages", way: str = "with_dynarank", quantize=None, save: bool = False):
    """(model, callback, trainer): ARD on every Linear of the tiny Llama, trained by SFTTrainer. ``way``:
    'with_dynarank' (the documented one-liner) or 'callback' (a plain SFTTrainer given DynaRankCallback)."""
    model = attach(
        load_base(chat_dir, quantize),
        DynaRankConfig(method="ard", r=4, target_modules="all-linear", seed=0, ard_lambda=0.05),
    )
    args = trl.SFTConfig(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=32,
        report_to=[],
        save_strategy="steps" if save else "no",
        save_steps=SAVE,
        logging_steps=2,
        disable_tqdm=True,
        seed=0,
    )
    common = dict(model=model, args=args, train_dataset=datasets.Dataset.from_list(_rows(data)))
    tokenizer = AutoTokenizer.from_pretrained(chat_dir)
    if way == "with_dynarank":
        trainer = dynarank.with_dynarank(trl.SFTTrainer)(**common, processing_class=tokenizer, peft_config=None)
        return model, trainer.dynarank, trainer
    callback = dynarank.DynaRankCallback(model)
    trainer = trl.SFTTrainer(**common, processing_class=tokenizer, peft_config=None, callbacks=[callback])
    return model, callback, trainer


def trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "data, way",
    [
        ("text", "with_dynarank"),
        ("messages", "with_dynarank"),
        ("prompt-completion", "with_dynarank"),
        ("messages", "callback"),
    ],
)
def test_sft_trainer_learns_ranks_with_gradient_checkpointing_on(chat_dir, tmp_path, data, way):
    model, callback, trainer = build(chat_dir, tmp_path, data, way)
    assert trainer.args.gradient_checkpointing  # TRL's default, left on
    layer = elastic_layers(model)["model.layers.1.self_attn.v_proj"]
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    trainer.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert len(calls) == 2 * STEPS  # every step's forward pass, and its recomputation in the backward pass
    controller = callback.controller
    assert controller.step == STEPS
    totals = [snapshot["total_rank"] for snapshot in controller.history]
    assert totals[-1] < totals[0], totals
    # The Trainer's optimizer holds the alphas and never steps them; the controller's own optimizer does.
    alpha = model.dynarank_ard.alpha
    assert any(p is alpha for group in trainer.optimizer.param_groups for p in group["params"])
    assert not trainer.optimizer.state.get(alpha)
    assert controller.alpha_optimizer.state[alpha]["step"] > 0 and (alpha.detach() != 1.0).any()
    logged = [entry for entry in trainer.state.log_history if "dynarank/total_rank" in entry]
    assert logged and logged[-1]["dynarank/total_rank"] == controller.total_rank()


@pytest.fixture(scope="module")
def straight(chat_dir, tmp_path_factory):
    """The uninterrupted run, which saved checkpoint-5 on its way."""
    out = tmp_path_factory.mktemp("straight")
    model, callback, trainer = build(chat_dir, out, save=True)
    trainer.train()
    return out, model, callback.controller


@pytest.mark.parametrize("way", ["with_dynarank", "callback"])
def test_a_killed_and_resumed_sft_run_equals_the_straight_run_bitwise(chat_dir, straight, tmp_path, way):
    """with_dynarank resumes from the checkpoint where it is; the plain callback finds it in its output_dir."""
    out, model, controller = straight
    history = [(h["step"], h["total_rank"]) for h in controller.history]
    assert any(step > SAVE and rank != dict(history).get(SAVE) for step, rank in history), "no rank change after it"
    checkpoint = out / f"checkpoint-{SAVE}"
    if way == "callback":
        checkpoint = shutil.copytree(checkpoint, tmp_path / f"checkpoint-{SAVE}")
    fresh, callback, trainer = build(chat_dir, tmp_path, way=way)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert callback.controller.history == controller.history
    expected, got = trained(model), trained(fresh)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_on_a_4bit_base_sft_trains_float32_adapters_resumes_exactly_and_exports_to_stock_peft(
    chat_dir, tmp_path, caplog
):
    pytest.importorskip("bitsandbytes")
    with caplog.at_level(logging.WARNING):
        model, callback, trainer = build(chat_dir, tmp_path / "a", way="callback", quantize="nf4", save=True)
    # TRL casts the trainable parameters of a quantized model to bfloat16; the callback put them back.
    assert "put back to torch.float32" in caplog.text
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    trainer.train()
    assert {quantization_of(layer.base) for layer in elastic_layers(model).values()} == {"nf4"}
    assert not any(is_repacked(m) for m in model.modules())
    totals = [snapshot["total_rank"] for snapshot in callback.controller.history]
    assert totals[-1] < totals[0] and (model.dynarank_ard.alpha.detach() != 1.0).any()

    fresh, resumed, again = build(chat_dir, tmp_path / "b", way="callback", quantize="nf4")
    shutil.copytree(tmp_path / "a" / f"checkpoint-{SAVE}", tmp_path / "b" / f"checkpoint-{SAVE}")
    again.train(resume_from_checkpoint=True)
    assert resumed.controller.history == callback.controller.history
    expected, got = trained(model), trained(fresh)
    assert all(torch.equal(expected[name], got[name]) for name in expected)

    dynarank.export_peft(model, tmp_path / "adapter")
    base = load_base(chat_dir, "nf4")
    keep_training_layout(base)  # evaluate as training computed (dynarank.quantized: the CPU repacking trap)
    stock = PeftModel.from_pretrained(base, tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 230, 999, 42, 8, 77]])
    model.eval(), stock.eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_a_dpo_trainer_with_a_budget_starts_ard_from_its_preference_loss_and_learns_ranks(chat_dir, tmp_path):
    """DPO batches hold no labels, so the model gives no loss of its own: ARD's start measured from the data takes
    the Trainer's (DPO's) loss through the mixin. Before, the start divided the model's None loss and failed."""
    config = DynaRankConfig(method="ard", r=4, seed=0, target_modules="all-linear", target_params=1500, init_batches=1)
    model = attach(load_base(chat_dir), config)
    preferences = [
        {
            "prompt": [_turn("user", f"what is {i} plus one?")],
            "chosen": [_turn("assistant", "yes indeed good")],
            "rejected": [_turn("assistant", "no never bad")],
        }
        for i in range(16)
    ]
    args = trl.DPOConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, max_steps=8, per_device_train_batch_size=4,
        learning_rate=1e-2, max_length=32, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = dynarank.with_dynarank(trl.DPOTrainer)(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(preferences),
        processing_class=AutoTokenizer.from_pretrained(chat_dir), peft_config=None,
    )  # fmt: skip
    trainer.train()
    record = model.dynarank_rank_init
    assert record["batches"] == 1 and record["start_params"] > 1500
    assert trainer.dynarank.controller.step == 8
    assert trainer.dynarank.controller.adapter_parameters() < record["start_params"]
