"""Specification of the PEFT export (round trip through STOCK peft) and of native save / load."""

from __future__ import annotations

import json
import pickle

import peft
import pytest
import torch
from peft import PeftModel
from safetensors import safe_open

import dynarank
from dynarank import AdapterFormatError, DynaRankConfig
from tiny_models import randomize_adapters, tiny_bart, tiny_bert, tiny_llama, tiny_roberta, token_batch

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense"]
BUILDERS = {"bert": tiny_bert, "llama": tiny_llama}


def _adapted(kind, layout, *, r=3, lora_alpha=5, targets=None, heterogeneous=True, train_head=True):
    """A tiny model with non-zero adapters, per-group ranks that differ, and (BERT) a trained classifier."""
    model = BUILDERS[kind]()
    targets = targets or (BERT_TARGETS if kind == "bert" else "all-linear")
    dynarank.attach(model, DynaRankConfig(target_modules=targets, r=r, lora_alpha=lora_alpha, head_layout=layout))
    randomize_adapters(model, scale=0.2)
    if heterogeneous:
        for i, layer in enumerate(dynarank.elastic_layers(model).values()):
            layer.remove_slots({g: list(range((g + i) % r)) for g in range(layer.n_groups)})
    if kind == "bert" and train_head:
        with torch.no_grad():
            model.classifier.weight.add_(torch.randn_like(model.classifier.weight))
            model.classifier.bias.fill_(0.5)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _export_and_load(model, kind, path, **kwargs):
    dynarank.export_peft(model, path, **kwargs)
    return PeftModel.from_pretrained(BUILDERS[kind](), str(path)).eval()


def _config(path):
    return json.loads((path / "adapter_config.json").read_text())


def _tensor_names(path):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


def _assert_same_logits(a, b, tol=1e-4):
    assert a.shape == b.shape
    assert (a - b).abs().max() <= tol


# ---------------------------------------------------------------- PEFT export


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_export_with_heterogeneous_ranks_loads_in_stock_peft_with_the_same_logits(tmp_path, kind, layout):
    model = _adapted(kind, layout)
    ids = token_batch()
    expected = _logits(model, ids)
    assert (expected - _logits(BUILDERS[kind](), ids)).abs().max() > 1e-2  # the adapter matters
    layers = dynarank.elastic_layers(model)
    assert any(len(set(layer.ranks)) > 1 for layer in layers.values())
    loaded = _export_and_load(model, kind, tmp_path / "peft")
    _assert_same_logits(_logits(loaded, ids), expected)
    config = _config(tmp_path / "peft")
    assert config["peft_type"] == "LORA"
    assert set(config["rank_pattern"]) == set(layers)  # FULL module names ...
    assert set(config["target_modules"]) == set(layers)
    for name, layer in layers.items():
        lora = loaded.base_model.model.get_submodule(name)
        assert lora.r["default"] == config["rank_pattern"][name] == layer.n_slots, name
        assert lora.scaling["default"] == pytest.approx(layer.scaling), name  # ... each at its own scale
    if kind == "bert":
        assert config["modules_to_save"] == ["classifier"]
        assert torch.equal(
            loaded.base_model.model.classifier.modules_to_save["default"].weight, model.classifier.weight
        )


def test_a_module_at_rank_zero_is_excluded_and_not_targeted(tmp_path, layout):
    model = _adapted("bert", layout)
    empty = "bert.encoder.layer.1.attention.self.value"
    layer = dynarank.elastic_layers(model)[empty]
    layer.remove_slots({g: list(range(r)) for g, r in enumerate(layer.ranks)})
    assert layer.n_slots == 0
    ids = token_batch()
    loaded = _export_and_load(model, "bert", tmp_path / "peft")
    _assert_same_logits(_logits(loaded, ids), _logits(model, ids))
    config = _config(tmp_path / "peft")
    assert empty in config["exclude_modules"]
    assert empty not in config["target_modules"] and empty not in config["rank_pattern"]
    assert not any(empty in key for key in _tensor_names(tmp_path / "peft"))
    assert type(loaded.base_model.model.get_submodule(empty)) is torch.nn.Linear


def test_exporting_a_model_whose_every_module_is_at_rank_zero_raises(tmp_path):
    model = _adapted("bert", "own", heterogeneous=False)
    for layer in dynarank.elastic_layers(model).values():
        layer.remove_slots({g: list(range(r)) for g, r in enumerate(layer.ranks)})
    with pytest.raises(ValueError, match="rank 0"):
        dynarank.export_peft(model, tmp_path / "peft")


def test_a_bert_classifier_with_a_trained_head_round_trips(tmp_path):
    model = _adapted("bert", "own", heterogeneous=False, targets=["query", "value"])
    ids = token_batch()
    loaded = _export_and_load(model, "bert", tmp_path / "peft")
    _assert_same_logits(_logits(loaded, ids), _logits(model, ids))
    names = _tensor_names(tmp_path / "peft")
    assert "base_model.model.classifier.weight" in names and "base_model.model.classifier.bias" in names


def test_a_roberta_classifier_whose_head_holds_linear_layers_round_trips(tmp_path):
    model = dynarank.attach(tiny_roberta(), DynaRankConfig(target_modules="all-linear", r=3, head_layout="shared"))
    randomize_adapters(model, scale=0.2)
    with torch.no_grad():
        model.classifier.out_proj.bias.fill_(0.5)  # a trained head travels as modules_to_save
    dynarank.export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(tiny_roberta(), str(tmp_path / "peft")).eval()
    ids = token_batch() + 2  # RoBERTa positions count from its padding id: keep tokens off it
    _assert_same_logits(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_the_auto_peft_classes_load_an_export_from_the_base_it_names(tmp_path, kind):
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

    BUILDERS[kind]().save_pretrained(tmp_path / "base")
    auto = {"bert": AutoPeftModelForSequenceClassification, "llama": AutoPeftModelForCausalLM}[kind]
    base = type(BUILDERS[kind]()).from_pretrained(tmp_path / "base")
    model = dynarank.attach(base, DynaRankConfig(target_modules="all-linear", r=3, head_layout="shared"))
    randomize_adapters(model, scale=0.2)
    dynarank.export_peft(model, tmp_path / "peft")
    assert _config(tmp_path / "peft")["task_type"] == {"bert": "SEQ_CLS", "llama": "CAUSAL_LM"}[kind]
    loaded = auto.from_pretrained(str(tmp_path / "peft")).eval()
    ids = token_batch()
    _assert_same_logits(_logits(loaded, ids), _logits(model.eval(), ids))


@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_a_server_safe_export_of_a_language_model_keeps_its_task_type_and_loads_with_its_auto_peft_class(
    tmp_path, kind
):
    """A causal or seq2seq LM's task type wraps no task head (a classifier's makes PEFT expect the head's weights, which
    a server-safe export leaves out), and vLLM's loader reads only r, lora_alpha and use_rslora of the config. Written
    without it, AutoPeftModelForCausalLM raised 'Cannot infer the auto class from the config'."""
    from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM

    build, auto, task_type = {
        "llama": (tiny_llama, AutoPeftModelForCausalLM, "CAUSAL_LM"),
        "bart": (tiny_bart, AutoPeftModelForSeq2SeqLM, "SEQ_2_SEQ_LM"),
    }[kind]
    build().save_pretrained(tmp_path / "base")
    base = type(build()).from_pretrained(tmp_path / "base")
    model = dynarank.attach(base, DynaRankConfig(target_modules=["q_proj", "v_proj"], r=3, lora_alpha=7)).eval()
    randomize_adapters(model, scale=0.2)
    dynarank.export_peft(model, tmp_path / "served", server_safe=True)
    config = _config(tmp_path / "served")
    assert config["task_type"] == task_type
    assert config["r"] == config["lora_alpha"] and not config.get("modules_to_save")
    loaded = auto.from_pretrained(str(tmp_path / "served")).eval()
    ids = token_batch() + 3  # BART's special tokens are 0-2
    batch = {"input_ids": ids} if kind == "llama" else {"input_ids": ids, "decoder_input_ids": ids[:, :5]}
    with torch.no_grad():
        _assert_same_logits(loaded(**batch).logits, model(**batch).logits, tol=1e-5)


def test_a_server_safe_export_of_a_classifier_names_no_task_type(tmp_path):
    """SEQ_CLS would make stock PEFT wrap the classifier as modules_to_save and expect weights the export leaves out."""
    dynarank.export_peft(_adapted("bert", "own", train_head=False), tmp_path / "served", server_safe=True)
    assert _config(tmp_path / "served")["task_type"] is None


def _tiny_whisper():
    """Whisper (speech in: input_features of 8 mel bins x 16 frames), one encoder and one decoder layer."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    shape = dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2)
    config = WhisperConfig(
        **shape,
        vocab_size=100,
        num_mel_bins=8,
        d_model=32,
        encoder_ffn_dim=48,
        decoder_ffn_dim=48,
        max_source_positions=8,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return WhisperForConditionalGeneration(config).eval()


ENCODER_DECODERS = {
    "whisper": (_tiny_whisper, lambda g: {"input_features": torch.randn(2, 8, 16, generator=g)}),
    "bart": (tiny_bart, lambda g: {"input_ids": torch.randint(3, 100, (2, 7), generator=g)}),
}


@pytest.mark.parametrize("kind, task_type", [("whisper", None), ("bart", "SEQ_2_SEQ_LM")])
def test_an_encoder_decoder_gets_the_seq2seq_task_type_only_if_it_reads_text_and_loads_with_the_same_logits(
    tmp_path, kind, task_type
):
    """PEFT's seq2seq model class hands input_ids to the decoder as well: Whisper, which reads input_features, was
    exported as SEQ_2_SEQ_LM like any encoder-decoder, and the loaded model's forward raised ("WhisperDecoder got
    multiple values for keyword argument 'input_ids'")."""
    build, inputs = ENCODER_DECODERS[kind]
    model = dynarank.attach(build(), DynaRankConfig(method="dynarank-lora", r=2, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, scale=0.3)
    g = torch.Generator().manual_seed(1)
    batch = {**inputs(g), "decoder_input_ids": torch.randint(3, 100, (2, 5), generator=g)}
    dynarank.export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(build(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        expected = model(**batch).logits
        assert (expected - build()(**batch).logits).abs().max() > 1e-3  # the adapter matters
        _assert_same_logits(loaded(**batch).logits, expected, tol=1e-5)
    assert _config(tmp_path / "peft")["task_type"] == task_type


def test_a_llama_module_at_rank_zero_and_a_head_at_rank_zero_export_exactly(tmp_path, layout):
    model = _adapted("llama", layout)
    layers = dynarank.elastic_layers(model)
    gone = layers["model.layers.0.self_attn.v_proj"]
    gone.remove_slots({g: list(range(r)) for g, r in enumerate(gone.ranks)})
    query = layers["model.layers.1.self_attn.q_proj"]
    query.remove_slots({1: list(range(query.ranks[1]))})  # one head switched off, the others live
    assert gone.n_slots == 0 and query.ranks[1] == 0 and query.n_slots > 0
    ids = token_batch()
    loaded = _export_and_load(model, "llama", tmp_path / "peft")
    _assert_same_logits(_logits(loaded, ids), _logits(model, ids))
    assert "model.layers.0.self_attn.v_proj" in _config(tmp_path / "peft")["exclude_modules"]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_server_safe_export_bakes_the_scale_into_b(tmp_path, kind, layout):
    model = _adapted(kind, layout, train_head=False, lora_alpha=7)  # scaling 7/3: the scale must land in B
    ids = token_batch()
    loaded = _export_and_load(model, kind, tmp_path / "peft", server_safe=True)
    _assert_same_logits(_logits(loaded, ids), _logits(model, ids))
    config = _config(tmp_path / "peft")
    max_rank = max(layer.n_slots for layer in dynarank.elastic_layers(model).values())
    assert config["r"] == config["lora_alpha"] == max_rank
    assert config["alpha_pattern"] == config["rank_pattern"]
    assert not config.get("modules_to_save")
    names = _tensor_names(tmp_path / "peft")
    assert names and all(n.endswith((".lora_A.weight", ".lora_B.weight")) for n in names)
    for name in config["rank_pattern"]:
        assert loaded.base_model.model.get_submodule(name).scaling["default"] == 1.0


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_the_exported_adapter_survives_merge_and_unload(tmp_path, kind, layout):
    model = _adapted(kind, layout)
    ids = token_batch()
    merged = _export_and_load(model, kind, tmp_path / "peft").merge_and_unload()
    assert not any(isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    _assert_same_logits(_logits(merged, ids), _logits(model, ids))


def test_a_gate_is_folded_into_the_exported_tensors(tmp_path, layout):
    model = _adapted("bert", layout, train_head=False)
    for layer in dynarank.elastic_layers(model).values():
        gate = torch.rand(layer.n_groups, layer.max_rank, generator=torch.Generator().manual_seed(2))
        layer.set_gate(lambda l, m=gate: m)
    ids = token_batch()
    loaded = _export_and_load(model, "bert", tmp_path / "peft")
    _assert_same_logits(_logits(loaded, ids), _logits(model, ids))


def test_a_trained_embedding_tied_to_the_lm_head_exports_to_the_same_logits(tmp_path):
    """With tie_word_embeddings, training the input embedding (modules_to_save) trains the LM head too; PEFT saves a
    module of modules_to_save as an untied copy, so the export saves the head as well (it loaded with the base's
    head: logits off by up to 2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import TINY_DECODER

    def base():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**TINY_DECODER, vocab_size=100, tie_word_embeddings=True)).eval()

    config = DynaRankConfig(method="dynarank-lora", r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    model = dynarank.attach(base(), config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():  # stands for training: the tied head moves with the embedding
        model.model.embed_tokens.weight.add_(0.05 * torch.randn_like(model.model.embed_tokens.weight))
    ids = token_batch(2, 6)
    dynarank.export_peft(model, tmp_path / "peft")
    assert _config(tmp_path / "peft")["modules_to_save"] == ["model.embed_tokens", "lm_head"]
    loaded = PeftModel.from_pretrained(base(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_export_refuses_to_overwrite_a_directory_that_is_not_an_adapter(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        dynarank.export_peft(_adapted("bert", "own"), tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no temporary directory left behind


def test_exporting_a_merged_model_raises(tmp_path):
    model = _adapted("bert", "own")
    dynarank.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        dynarank.export_peft(model, tmp_path / "peft")


# ---------------------------------------------------------------- native save / load


def test_a_torch_compiled_model_writes_the_files_the_uncompiled_model_writes(tmp_path):
    """torch.compile's wrapper holds the model as _orig_mod: exports and saves read through it named every module
    '_orig_mod.<name>', which neither stock PEFT nor dynarank.load_adapter finds in the model."""
    model = _adapted("bert", "shared")  # a trained classifier too: modules_to_save and the task type
    compiled = torch.compile(model, backend="eager")
    ids = token_batch()
    _assert_same_logits(_logits(compiled, ids), _logits(model, ids), tol=0)
    for name, write in {
        "peft": dynarank.export_peft,
        "served": lambda m, path: dynarank.export_peft(m, path, server_safe=True),
        "native": dynarank.save_adapter,
    }.items():
        write(model, tmp_path / "plain" / name)
        write(compiled, tmp_path / "compiled" / name)
        plain = sorted((tmp_path / "plain" / name).iterdir())
        assert [p.name for p in sorted((tmp_path / "compiled" / name).iterdir())] == [p.name for p in plain]
        for file in plain:
            assert (tmp_path / "compiled" / name / file.name).read_bytes() == file.read_bytes(), (name, file.name)
    loaded = PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "compiled" / "peft")).eval()
    _assert_same_logits(_logits(loaded, ids), _logits(model, ids))
    native = dynarank.load_adapter(tiny_bert(), tmp_path / "compiled" / "native").eval()
    _assert_same_logits(_logits(native, ids), _logits(model, ids), tol=0)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_save_then_load_restores_ranks_and_outputs_exactly(tmp_path, kind, layout):
    model = _adapted(kind, layout)
    ids = token_batch()
    dynarank.save_adapter(model, tmp_path / "native")
    fresh = dynarank.load_adapter(BUILDERS[kind](), tmp_path / "native")
    saved, loaded = dynarank.elastic_layers(model), dynarank.elastic_layers(fresh)
    assert saved.keys() == loaded.keys()
    for name, layer in saved.items():
        assert loaded[name].ranks == layer.ranks, name
        assert loaded[name].slots == layer.slots, name
        assert (loaded[name].split, loaded[name].layout) == (layer.split, layer.layout)
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))
    assert dynarank.count_trainable(fresh) == dynarank.count_trainable(model)


def test_a_saved_adapter_loads_at_the_output_scale_it_trained_with_whatever_the_defaults_are_now(tmp_path):
    """The scale is part of the adapter: an adapter saved when a method's default scale was another one (here: a
    scale no config of today gives) loads with its own, not with what its config resolves to today."""
    model = _adapted("bert", "own")  # lora_alpha 5 over r 3
    for layer in dynarank.elastic_layers(model).values():
        layer.scaling = 0.625
    ids = token_batch()
    dynarank.save_adapter(model, tmp_path / "native")
    fresh = dynarank.load_adapter(BUILDERS["bert"](), tmp_path / "native")
    assert {layer.scaling for layer in dynarank.elastic_layers(fresh).values()} == {0.625}
    assert torch.equal(_logits(fresh, ids), _logits(model, ids))


def _masked_lm():
    """The tiny classifier's encoder under a masked-LM head: every adapted Linear is there, its task head is not."""
    from transformers import BertForMaskedLM

    return BertForMaskedLM(tiny_bert().config)


@pytest.mark.parametrize(
    "build, named",
    [
        (lambda: tiny_bert(hidden_size=48), ["bert.encoder.layer.0.attention.self.query", "48"]),
        (lambda: tiny_bert(num_hidden_layers=3), ["bert.encoder.layer.2."]),
        (lambda: tiny_bert(num_labels=3), ["classifier.weight", "(3, 32)"]),
        (tiny_llama, ["query"]),
        (_masked_lm, ["BertForMaskedLM", "'classifier'", "task head"]),  # the encoder fits, the head is not there
    ],
    ids=["hidden-48", "three-layers", "three-labels", "llama", "no-task-head"],
)
def test_loading_into_a_different_architecture_raises_a_format_error(tmp_path, build, named):
    dynarank.save_adapter(_adapted("bert", "own"), tmp_path / "native")
    model = build()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(AdapterFormatError) as info:
        dynarank.load_adapter(model, tmp_path / "native")
    for text in named:
        assert text in str(info.value)
    # Nothing is left half-attached: no adapter, no config, the trainable flags as they were.
    assert not dynarank.elastic_layers(model) and not hasattr(model, "dynarank_config")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_loading_into_a_model_that_already_carries_dynarank_adapters_says_so(tmp_path):
    """Before, the error said the model had no Linear module of the adapter's names (they are adapted already)."""
    model = _adapted("bert", "own")
    dynarank.save_adapter(model, tmp_path / "native")
    layers = dynarank.elastic_layers(model)
    with pytest.raises(AdapterFormatError, match="it already carries dynarank adapters") as info:
        dynarank.load_adapter(model, tmp_path / "native")
    assert "no Linear module" not in str(info.value)
    assert dynarank.elastic_layers(model) == layers


def test_an_adapter_saved_with_names_that_matched_nothing_loads_as_it_was_saved(tmp_path):
    """attach refuses a target or exclusion name that matches nothing; an adapter saved before it did, holding one,
    still loads (the names that matched chose its layers)."""
    import dataclasses

    model = _adapted("bert", "own")
    config = model.dynarank_config
    model.dynarank_config = dataclasses.replace(
        config, target_modules=[*config.target_modules, "vproj"], exclude_modules=["typo"]
    )
    dynarank.save_adapter(model, tmp_path / "native")
    fresh = dynarank.load_adapter(BUILDERS["bert"](), tmp_path / "native")
    assert dynarank.elastic_layers(fresh).keys() == dynarank.elastic_layers(model).keys()
    assert fresh.dynarank_config.target_modules == config.target_modules
    assert torch.equal(_logits(fresh, token_batch()), _logits(model, token_batch()))


@pytest.mark.parametrize("method", ["ard", "elalora", "adalora-physical"])
def test_an_adapter_saved_in_the_middle_of_a_rank_changing_run_loads_with_the_same_outputs(tmp_path, method):
    # Mid-run, the controller's gate (ARD's hard mask, the SVD methods' E) still shapes the outputs.
    model = tiny_bert()
    extra = {"ard_lambda": 30.0} if method == "ard" else {"granularity": "matrix"}
    dynarank.attach(model, DynaRankConfig(method=method, r=4, target_modules=BERT_TARGETS, seed=0, **extra))
    ctrl = dynarank.build_controller(model, total_steps=200)
    opt = ctrl.build_optimizer(lr=1e-2)
    ids, labels = token_batch(batch=8), torch.tensor([0, 1] * 4)
    for _ in range(60):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(layer.gate() is not None for layer in dynarank.elastic_layers(model).values())
    if method == "ard":  # switch a slot off by its mask without cutting it: r0 * alpha = 2.3 keeps 3 slots, 2 on
        with torch.no_grad():
            model.dynarank_ard.of("bert.encoder.layer.0.attention.self.value")[0] = 2.3 / 4
        layer = dynarank.elastic_layers(model)["bert.encoder.layer.0.attention.self.value"]
        assert layer.ranks[0] >= 3 and layer.gate()[0, 2] == 0
    model.eval()
    dynarank.save_adapter(model, tmp_path / "native")
    fresh = dynarank.load_adapter(tiny_bert(), tmp_path / "native").eval()
    _assert_same_logits(_logits(fresh, ids), _logits(model, ids), tol=1e-5)


def test_save_adapter_refuses_to_overwrite_a_directory_that_is_not_an_adapter(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        dynarank.save_adapter(_adapted("bert", "own"), tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "user data"


def test_saving_over_a_previous_adapter_replaces_it(tmp_path):
    first = _adapted("bert", "own")
    dynarank.save_adapter(first, tmp_path / "native")
    second = _adapted("bert", "shared", r=2)
    dynarank.save_adapter(second, tmp_path / "native")
    loaded = dynarank.load_adapter(tiny_bert(), tmp_path / "native")
    ids = token_batch()
    assert torch.equal(_logits(loaded, ids), _logits(second, ids))
    assert sorted(p.name for p in (tmp_path / "native").iterdir()) == [
        "dynarank_adapter.json",
        "dynarank_adapter.safetensors",
    ]


def test_saving_over_an_adapter_that_holds_a_users_file_refuses_and_deletes_nothing(tmp_path):
    model = _adapted("bert", "own")
    dynarank.save_adapter(model, tmp_path / "native")
    dynarank.export_peft(model, tmp_path / "peft")
    for path in (tmp_path / "native", tmp_path / "peft"):
        (path / "NOTES.txt").write_text("the user's notes")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=r"holds files dynarank did not write \(NOTES.txt\)"):
        dynarank.save_adapter(model, tmp_path / "native")
    with pytest.raises(FileExistsError, match="NOTES.txt"):
        dynarank.export_peft(model, tmp_path / "peft")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native", "peft"]  # no temporary directory left


def test_an_export_replaces_a_previous_export_with_the_companion_files_its_application_names(tmp_path):
    # The CLI writes dynarank_run.json beside every adapter it exports and names it as a companion: replacing the
    # directory may remove it; any other file there is the user's and is never deleted.
    dynarank.export_peft(_adapted("bert", "own"), tmp_path / "peft")
    (tmp_path / "peft" / "dynarank_run.json").write_text("{}")
    second = _adapted("bert", "shared", r=2)
    with pytest.raises(FileExistsError, match="dynarank_run.json"):
        dynarank.export_peft(second, tmp_path / "peft")
    dynarank.export_peft(second, tmp_path / "peft", companions=("dynarank_run.json",))
    ids = token_batch()
    _assert_same_logits(
        _logits(PeftModel.from_pretrained(tiny_bert(), str(tmp_path / "peft")), ids), _logits(second, ids)
    )


def test_files_and_directory_are_forced_to_disk_before_the_rename(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("names synced descriptors through /proc")
    events = []
    real_fsync, real_rename = os.fsync, Path.rename
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))
    )
    monkeypatch.setattr(
        Path, "rename", lambda self, target: (events.append(("rename", str(self))), real_rename(self, target))[1]
    )
    dynarank.save_adapter(_adapted("bert", "own"), tmp_path / "native")
    rename = next(i for i, (kind, _) in enumerate(events) if kind == "rename")
    temporary = events[rename][1]
    synced = [path for kind, path in events[:rename] if kind == "fsync"]
    assert sorted(synced) == sorted(
        [f"{temporary}/dynarank_adapter.json", f"{temporary}/dynarank_adapter.safetensors", temporary]
    )
    assert events[-1] == ("fsync", str(tmp_path))  # the rename itself is made durable


def _failing_renames(monkeypatch, out, fail_putting_back=False):
    """Path.rename raising OSError when the new directory is renamed onto ``out`` (and, with
    ``fail_putting_back``, when the previous one is renamed back too)."""
    from pathlib import Path

    real = Path.rename

    def rename(self, target):
        onto_out = Path(target) == out
        if onto_out and (not self.name.endswith(".old") or fail_putting_back):
            raise OSError("simulated: disk went away")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)


def test_a_replacement_whose_final_rename_fails_puts_the_previous_adapter_back(tmp_path, monkeypatch):
    first, out, ids = _adapted("bert", "own"), tmp_path / "native", token_batch()
    dynarank.save_adapter(first, out)
    _failing_renames(monkeypatch, out)
    with pytest.raises(OSError, match="simulated"):
        dynarank.save_adapter(_adapted("bert", "shared", r=2), out)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]  # nothing hidden left behind
    assert torch.equal(_logits(dynarank.load_adapter(tiny_bert(), out), ids), _logits(first, ids))


def _the_next_load_or_save_finds_the_previous_adapter(then: str, previous, out, ids) -> None:
    """After a save that left ``previous`` moved aside: a load returns it, or a new save replaces it cleanly."""
    if then == "load":
        assert torch.equal(_logits(dynarank.load_adapter(tiny_bert(), out), ids), _logits(previous, ids))
    else:
        third = _adapted("bert", "shared", r=2)
        dynarank.save_adapter(third, out)
        assert torch.equal(_logits(dynarank.load_adapter(tiny_bert(), out), ids), _logits(third, ids))
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]


@pytest.mark.parametrize("then", ["load", "save"])
def test_an_adapter_whose_replacement_could_not_put_it_back_is_restored_by_the_next_load_or_save(
    tmp_path, monkeypatch, then
):
    first, out, ids = _adapted("bert", "own"), tmp_path / "native", token_batch()
    dynarank.save_adapter(first, out)
    _failing_renames(monkeypatch, out, fail_putting_back=True)
    with pytest.raises(OSError, match="simulated"):
        dynarank.save_adapter(_adapted("bert", "shared", r=2), out)
    monkeypatch.undo()
    assert not out.exists() and [p.name.endswith(".old") for p in tmp_path.iterdir()] == [True]  # kept aside
    _the_next_load_or_save_finds_the_previous_adapter(then, first, out, ids)


KILLED_BETWEEN_THE_RENAMES = """
import os, sys
from pathlib import Path
from dynarank import storage as io

out, real = Path(sys.argv[1]), Path.rename
def rename(self, target):
    if Path(target) == out:
        os._exit(9)  # killed: no except, no finally runs
    return real(self, target)
Path.rename = rename
io.write_atomically(out, {io.LAYOUT_FILE: b"{}", io.WEIGHTS_FILE: b"new"}, marker=io.LAYOUT_FILE)
"""


@pytest.mark.parametrize("then", ["load", "save"])
def test_a_save_killed_between_its_two_renames_leaves_the_previous_adapter_to_the_next_load_or_save(tmp_path, then):
    import subprocess
    import sys

    first, out, ids = _adapted("bert", "own"), tmp_path / "native", token_batch()
    dynarank.save_adapter(first, out)
    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_THE_RENAMES, str(out)], capture_output=True)
    assert killed.returncode == 9, killed.stderr.decode()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and left[1] == left[0] + ".old"  # the new directory, and the previous one moved aside
    _the_next_load_or_save_finds_the_previous_adapter(then, first, out, ids)


def test_a_truncated_weights_file_raises_a_format_error(tmp_path):
    path = dynarank.save_adapter(_adapted("bert", "own"), tmp_path / "native")
    weights = path / "dynarank_adapter.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match="safetensors"):
        dynarank.load_adapter(tiny_bert(), path)


def test_a_missing_or_broken_layout_file_raises_a_format_error(tmp_path):
    path = dynarank.save_adapter(_adapted("bert", "own"), tmp_path / "native")
    (path / "dynarank_adapter.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="JSON"):
        dynarank.load_adapter(tiny_bert(), path)
    (path / "dynarank_adapter.json").unlink()
    with pytest.raises(AdapterFormatError, match="dynarank_adapter.json"):
        dynarank.load_adapter(tiny_bert(), path)


UNPICKLED: list[str] = []


def _record_unpickling():
    UNPICKLED.append("unpickled")
    return {}


class _Tripwire:
    """Records (instead of running code) if anything ever unpickles it."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_a_pickled_adapter_is_rejected_without_being_unpickled(tmp_path, monkeypatch):
    def _refuse(*args, **kwargs):
        raise AssertionError("the loader must never unpickle")

    monkeypatch.setattr(torch, "load", _refuse)
    monkeypatch.setattr(pickle, "load", _refuse)
    monkeypatch.setattr(pickle, "loads", _refuse)
    UNPICKLED.clear()
    only_pickle = tmp_path / "pickled"
    only_pickle.mkdir()
    torch.save({"weights": _Tripwire()}, only_pickle / "adapter_model.bin")
    with pytest.raises(AdapterFormatError) as info:
        dynarank.load_adapter(tiny_bert(), only_pickle)
    assert "dynarank_adapter.json" in str(info.value) and "dynarank_adapter.safetensors" in str(info.value)
    # A pickle under the expected weights name, next to a valid layout file.
    disguised = dynarank.save_adapter(_adapted("bert", "own"), tmp_path / "disguised")
    torch.save({"weights": _Tripwire()}, disguised / "dynarank_adapter.safetensors")
    with pytest.raises(AdapterFormatError, match="safetensors"):
        dynarank.load_adapter(tiny_bert(), disguised)
    assert UNPICKLED == []


def test_a_directory_moved_aside_is_found_by_its_full_name_even_with_dots(tmp_path):
    from dynarank import storage as io

    (tmp_path / ".my.adapter.v2.k3_9xq.old").mkdir()  # .<name>.<random>.old, the random part without dots
    (tmp_path / ".step-6.ab12.old").mkdir()
    (tmp_path / ".step-7.ab12").mkdir()  # a temporary new directory, not a previous version
    assert io.interrupted_replacements(tmp_path) == [tmp_path / "my.adapter.v2", tmp_path / "step-6"]
