"""Adapters over a quantized base (bitsandbytes 4-bit NF4 and 8-bit, on the CPU): trained, resized, exported.

The tiny Llama is saved once and loaded quantized by transformers, as a user loads a QLoRA base."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

import dynarank
from dynarank import DynaRankConfig, attach, elastic_layers
from dynarank.attach import unwrap
from dynarank.quantized import is_repacked, keep_training_layout, quantization_of
from dynarank.training.models import bitsandbytes_config, load_causal_lm
from tiny_models import randomize_adapters, save_tiny_model_dir

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:.*autograd kernel was not registered:UserWarning")

KINDS = ["nf4", "int8"]


def CONFIG(r: int) -> DynaRankConfig:  # noqa: N802 (reads as the config it builds)
    return DynaRankConfig(method="dynarank-lora", r=r, seed=0, target_modules="all-linear")


IDS = torch.tensor([[5, 17, 230, 999, 42, 8, 77], [64, 3, 3, 512, 1000, 21, 9]])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("llama"), kind="llama")


def stock_quantized(llama_dir, kind: str) -> nn.Module:
    """The base as transformers loads it with a BitsAndBytesConfig: nothing of dynarank's done to it."""
    return AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=bitsandbytes_config(kind))


def logits(model, train: bool) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def heterogeneous(model) -> None:
    """Random adapter values and uneven ranks (some heads cut, one grown)."""
    randomize_adapters(model, scale=0.2)
    layers = elastic_layers(model)
    layers["model.layers.0.self_attn.q_proj"].remove_slots({0: [0, 1], 2: [1]})
    layers["model.layers.1.self_attn.k_proj"].remove_slots({1: [0, 1]})
    layers["model.layers.1.mlp.up_proj"].add_slots({0: 2}, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------- what a quantized base is
def test_quantized_layers_are_recognised_by_kind(llama_dir):
    four, eight = stock_quantized(llama_dir, "nf4"), stock_quantized(llama_dir, "int8")
    assert quantization_of(four.model.layers[0].self_attn.q_proj) == "nf4"
    assert quantization_of(eight.model.layers[0].mlp.down_proj) == "int8"
    assert quantization_of(four.lm_head) is None and quantization_of(nn.Linear(2, 2)) is None
    fp4 = bnb.nn.Linear4bit(64, 32, quant_type="fp4")
    assert quantization_of(fp4) == "fp4"


@pytest.mark.parametrize("kind", KINDS)
def test_the_adapter_is_float32_over_quantized_bytes_and_trains(llama_dir, kind):
    model = attach(stock_quantized(llama_dir, kind), DynaRankConfig(method="ard", r=3, target_modules="all-linear"))
    layers = elastic_layers(model)
    assert len(layers) == 14 and all(quantization_of(layer.base) == kind for layer in layers.values())
    assert {layer.base.weight.dtype for layer in layers.values()} == {torch.uint8 if kind == "nf4" else torch.int8}
    assert {p.dtype for layer in layers.values() for p in layer.adapter_parameters()} == {torch.float32}
    (alpha,) = dynarank.prepare_parameters(model)
    assert alpha.dtype == torch.float32
    assert not any(p.requires_grad for layer in layers.values() for p in layer.base.parameters())
    randomize_adapters(model, scale=0.1)  # B = 0 at the start would leave every A without gradient
    model.train()
    out = model(input_ids=IDS, labels=IDS)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
    for name, layer in layers.items():  # the gradient reaches the lowest layer through every quantized base
        for p in layer.adapter_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_growing_a_rank_keeps_the_function_and_shrinking_equals_masking(llama_dir, kind):
    model = attach(stock_quantized(llama_dir, kind), CONFIG(r=3))
    randomize_adapters(model, scale=0.2)
    layer = elastic_layers(model)["model.layers.0.self_attn.v_proj"]  # 2 key-value heads
    before = logits(model, train=True)
    layer.add_slots({0: 2, 1: 1}, generator=torch.Generator().manual_seed(0))
    assert layer.ranks == [5, 4]
    torch.testing.assert_close(logits(model, train=True), before, atol=1e-6, rtol=0)
    mask = torch.ones(2, 5)
    mask[0, [1, 3]] = 0.0
    mask[1, 0] = 0.0
    layer.set_gate(lambda _: mask)
    masked = logits(model, train=True)
    layer.set_gate(None)
    layer.remove_slots({0: [1, 3], 1: [0]})
    assert layer.ranks == [3, 3]
    torch.testing.assert_close(logits(model, train=True), masked, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_a_resize_carries_the_adam_moments_of_the_kept_ranks(llama_dir, kind):
    model = attach(stock_quantized(llama_dir, kind), CONFIG(r=3))
    randomize_adapters(model, scale=0.2)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    layer = elastic_layers(model)["model.layers.1.self_attn.q_proj"]  # 4 heads x rank 3: own slots 0..11
    old_b = {k: v.clone() for k, v in optimizer.state[layer.group_weight].items()}
    old_a = {k: v.clone() for k, v in optimizer.state[layer.shared_weight].items()}
    layer.remove_slots({1: [2]}, optimizer=optimizer)
    layer.add_slots({3: 1}, optimizer=optimizer)
    kept = [c for c in range(12) if c != 5]
    b, a = optimizer.state[layer.group_weight], optimizer.state[layer.shared_weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.count_nonzero(old_b[key]) > 0
        assert torch.equal(b[key][:, :11], old_b[key][:, kept])  # every head keeps its columns, in order
        assert torch.equal(b[key][:, 11], torch.zeros_like(b[key][:, 11]))  # head 3's new rank starts at zero
        assert torch.equal(a[key][:11], old_a[key][kept]) and torch.equal(a[key][11], torch.zeros_like(a[key][11]))
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()  # the optimizer steps the resized parameters
    assert all(torch.isfinite(p).all() for p in layer.adapter_parameters())


# ---------------------------------------------------------------------------- export to stock PEFT
@pytest.mark.parametrize("kind", KINDS)
def test_an_export_loads_in_stock_peft_on_the_same_quantized_base_with_equal_logits(llama_dir, tmp_path, kind):
    model = attach(stock_quantized(llama_dir, kind), CONFIG(r=3))
    heterogeneous(model)
    dynarank.export_peft(model, tmp_path / "adapter")
    stock = PeftModel.from_pretrained(stock_quantized(llama_dir, kind), tmp_path / "adapter")
    assert quantization_of(stock.base_model.model.model.layers[0].self_attn.q_proj.base_layer) == kind
    # Train mode: bitsandbytes computes as it trains, in both.
    torch.testing.assert_close(logits(stock, train=True), logits(model, train=True), atol=1e-4, rtol=0)
    # Eval mode, with the CPU repacking disabled in the stock model as dynarank disables it in its own.
    keep_training_layout(stock)
    torch.testing.assert_close(logits(stock, train=False), logits(model, train=False), atol=1e-4, rtol=0)


def test_export_leaves_the_quantized_base_untouched(llama_dir, tmp_path):
    model = attach(stock_quantized(llama_dir, "nf4"), CONFIG(r=2))
    heterogeneous(model)
    bases = {
        n: (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
        for n, m in model.named_modules()
        if quantization_of(m)
    }
    dynarank.export_peft(model, tmp_path / "adapter")
    dynarank.save_adapter(model, tmp_path / "native")
    for name, module in model.named_modules():
        if quantization_of(module):
            weight, absmax = bases[name]
            assert torch.equal(module.weight.data, weight) and torch.equal(module.weight.quant_state.absmax, absmax)


@pytest.mark.parametrize("kind", KINDS)
def test_merging_into_a_quantized_base_is_refused_and_changes_nothing(llama_dir, kind):
    model = attach(stock_quantized(llama_dir, kind), CONFIG(r=2))
    randomize_adapters(model)
    before = logits(model, train=True)
    for merge in (lambda: dynarank.merge(model), lambda: unwrap(model, merge=True)):
        with pytest.raises(ValueError, match=f"model.layers.0.self_attn.q_proj has a {kind} bitsandbytes base: merg"):
            merge()
    layer = elastic_layers(model)["model.layers.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="would quantize base \\+ update again"):
        layer.merge()
    assert not any(layer.merged for layer in elastic_layers(model).values())
    torch.testing.assert_close(logits(model, train=True), before, atol=0, rtol=0)


def test_a_trainer_accepts_the_quantized_model_while_it_carries_adapters(llama_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    base = stock_quantized(llama_dir, "nf4")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1)
    with pytest.raises(ValueError, match="purely quantized"):  # transformers' own guard, without adapters
        Trainer(model=base, args=args)
    model = attach(base, CONFIG(r=2))
    Trainer(model=model, args=args, callbacks=[dynarank.DynaRankCallback(model)])
    assert model.is_quantized is False
    unwrap(model, merge=False)
    assert model.is_quantized is True


# ---------------------------------------------------------------------------- the CPU repacking trap
def test_bitsandbytes_repacks_a_4bit_layer_in_eval_and_then_passes_no_gradient_unless_kept_in_training_layout():
    """The trap itself (REFERENCE.md section 8), on one layer: what keep_training_layout prevents."""

    def layer() -> nn.Module:
        torch.manual_seed(0)
        plain = nn.Linear(128, 64, bias=False)
        quantized = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        quantized.load_state_dict(plain.state_dict())
        return quantized.to("cpu")

    stock, kept = layer(), layer()
    if not stock.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    keep_training_layout(kept)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    for module in (stock, kept):
        module.eval()
        with torch.no_grad():
            module(x)
        module.train()
    assert is_repacked(stock) and not is_repacked(kept)
    results = {}
    for name, module in (("stock", stock), ("kept", kept)):
        xs = x.clone().requires_grad_(True)
        module(xs).pow(2).sum().backward()
        results[name] = xs.grad
    assert results["stock"] is None  # the repacked layer passes no gradient to what is below it
    assert results["kept"] is not None and results["kept"].abs().sum() > 0


def test_an_attached_4bit_model_computes_the_same_in_eval_as_in_training(llama_dir):
    config = DynaRankConfig(method="ard", r=2, seed=0, target_modules="all-linear")
    model = attach(stock_quantized(llama_dir, "nf4"), config)
    randomize_adapters(model)
    trained = logits(model, train=True)
    evaluated = logits(model, train=False)  # stock bitsandbytes would repack here (and fail on 16-row layers)
    assert torch.equal(evaluated, trained)
    assert not any(is_repacked(m) for m in model.modules())
    model.train()  # and training goes on with the gradient reaching the lowest layer
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert elastic_layers(model)["model.layers.0.self_attn.q_proj"].shared_weight.grad.abs().sum() > 0


def test_a_base_repacked_before_attaching_is_put_back_in_the_training_layout_with_a_warning(caplog):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(128, 64, bias=False))
    base = nn.Sequential(bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4"))
    base.load_state_dict(plain.state_dict())
    base = base.to("cpu")
    if not base[0].support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack here")
    x = torch.randn(4, 128)
    reference = base(x).detach()
    base.eval()
    with torch.no_grad():
        base(x)
    assert is_repacked(base[0])
    with caplog.at_level(logging.WARNING):
        assert keep_training_layout(base) == 1
    assert "had been repacked by bitsandbytes" in caplog.text and not is_repacked(base[0])
    base.train()
    xs = x.clone().requires_grad_(True)
    out = base(xs)
    out.sum().backward()
    assert xs.grad is not None
    torch.testing.assert_close(out.detach(), reference, atol=2e-2, rtol=0)  # best effort: scales rounded to bf16


# ---------------------------------------------------------------------------- the training layer's loader
def test_the_loader_quantizes_on_request_and_keeps_the_training_layout(llama_dir):
    model, _ = load_causal_lm(llama_dir, quantize="nf4")
    four = [m for m in model.modules() if quantization_of(m)]
    assert len(four) == 14 and all(m.support_avx512bf16_for_cpu is False for m in four)
    assert model.model.layers[0].mlp.up_proj.weight.quant_state.nested  # double quantization, as QLoRA
    model, _ = load_causal_lm(llama_dir, quantize="int8")
    assert {quantization_of(m) for m in model.modules()} == {None, "int8"}
