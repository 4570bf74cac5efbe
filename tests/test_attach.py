"""Specification of attach(): targets, head inference (incl. GQA), freezing, validation, parameter counts."""

from __future__ import annotations

import pytest
import torch

import dynarank
from dynarank import DynaRankConfig, ElasticLoRALinear
from dynarank.config import ConfigError
from tiny_models import tiny_bart, tiny_bert, tiny_llama, tiny_roberta, token_batch

D, D_H, HEADS = 32, 8, 4  # both tiny models: hidden 32, 4 query heads of 8
BERT_ATTENTION = ["query", "key", "value", "attention.output.dense"]


def _plans(model):
    return {n: (l.split, l.n_groups, l.group_size) for n, l in dynarank.elastic_layers(model).items()}


def _short(name):
    """Module name without the layer prefix, e.g. 'attention.self.query'."""
    for prefix, parts in (("bert.encoder.layer.", 4), ("model.layers.", 3)):
        if name.startswith(prefix):
            return name.split(".", parts)[-1]
    return name


# ---------------------------------------------------------------- head inference


def test_bert_attention_is_split_per_head_and_the_mlp_is_one_group():
    model = dynarank.attach(tiny_bert(), DynaRankConfig(target_modules=["query", "key", "value", "dense"], r=2))
    plans = _plans(model)
    assert len(plans) == 2 * 6 + 1  # q, k, v, attention.output.dense, intermediate.dense, output.dense; pooler
    for name, plan in plans.items():
        short = _short(name)
        if short in ("attention.self.query", "attention.self.key", "attention.self.value"):
            assert plan == ("rows", HEADS, D_H), name
        elif short == "attention.output.dense":
            assert plan == ("cols", HEADS, D_H), name
        elif short == "intermediate.dense":
            assert plan == ("rows", 1, 64), name
        else:
            assert short in ("output.dense", "bert.pooler.dense") and plan == ("rows", 1, D), name


def test_llama_gqa_key_value_projections_are_split_per_key_value_head():
    model = dynarank.attach(tiny_llama(), DynaRankConfig(target_modules="all-linear", r=2))
    expected = {
        "self_attn.q_proj": ("rows", 4, D_H),
        "self_attn.k_proj": ("rows", 2, D_H),
        "self_attn.v_proj": ("rows", 2, D_H),
        "self_attn.o_proj": ("cols", 4, D_H),
        "mlp.gate_proj": ("rows", 1, 48),
        "mlp.up_proj": ("rows", 1, 48),
        "mlp.down_proj": ("rows", 1, D),
    }
    plans = _plans(model)
    assert sorted(plans) == sorted(f"model.layers.{i}.{k}" for i in range(2) for k in expected)
    for name, plan in plans.items():
        assert plan == expected[_short(name)], name


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_matrix_granularity_gives_one_group_everywhere(build):
    model = dynarank.attach(build(), DynaRankConfig(target_modules="all-linear", r=2, granularity="matrix"))
    layers = dynarank.elastic_layers(model)
    assert len(layers) == sum(isinstance(m, torch.nn.Linear) for m in build().modules()) - 1
    for name, layer in layers.items():
        assert (layer.split, layer.n_groups, layer.group_size) == ("rows", 1, layer.out_features), name


# ---------------------------------------------------------------- targets and freezing


@pytest.mark.parametrize("build, head", [(tiny_bert, "classifier"), (tiny_llama, "lm_head")], ids=["bert", "llama"])
def test_all_linear_never_adapts_the_task_head(build, head):
    model = dynarank.attach(build(), DynaRankConfig(target_modules="all-linear", r=2))
    assert not isinstance(model.get_submodule(head), ElasticLoRALinear)
    assert isinstance(model.get_submodule(head), torch.nn.Linear)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in build().modules())
    assert len(dynarank.elastic_layers(model)) == n_linear - 1


def test_a_bart_classification_head_is_trained_in_full_and_never_adapted():
    from transformers import BartConfig, BartForSequenceClassification

    torch.manual_seed(0)
    shape = dict(encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4)
    config = BartConfig(vocab_size=100, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, **shape)
    model = dynarank.attach(BartForSequenceClassification(config), DynaRankConfig(target_modules="all-linear", r=2))
    assert model.dynarank_modules_to_save == ["classification_head"]
    assert not any(n.startswith("classification_head") for n in dynarank.elastic_layers(model))
    assert all(p.requires_grad for p in model.classification_head.parameters())
    assert dynarank.elastic_layers(model)["model.encoder.layers.0.self_attn.q_proj"].n_groups == 4


def test_distilbert_heads_and_its_pre_classifier_are_recognised():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_position_embeddings=64)
    model = dynarank.attach(DistilBertForSequenceClassification(config), DynaRankConfig(target_modules="all-linear"))
    assert model.dynarank_modules_to_save == ["classifier", "pre_classifier"]
    plans = {n.rsplit(".", 1)[-1]: (l.split, l.n_groups) for n, l in dynarank.elastic_layers(model).items()}
    assert plans["q_lin"] == plans["k_lin"] == plans["v_lin"] == ("rows", 4)
    assert plans["out_lin"] == ("cols", 4)


def test_per_head_ranks_without_a_head_count_warn_and_fall_back_to_one_group(caplog):
    model = torch.nn.Sequential()  # a model without a config: nothing says how many heads there are
    model.add_module("query", torch.nn.Linear(D, D))
    with caplog.at_level("WARNING", logger="dynarank.attach"):
        dynarank.attach(model, DynaRankConfig(target_modules=["query"], r=2))
    assert "no head count" in caplog.text and "num_heads" in caplog.text
    assert all(layer.n_groups == 1 for layer in dynarank.elastic_layers(model).values())


def test_the_classifier_stays_trainable_while_every_base_weight_is_frozen():
    model = dynarank.attach(tiny_bert(), DynaRankConfig(target_modules="all-linear", r=2))
    adapters = {id(p) for layer in dynarank.elastic_layers(model).values() for p in layer.adapter_parameters()}
    for name, p in model.named_parameters():
        if name.startswith("classifier."):
            assert p.requires_grad, name
        elif id(p) in adapters:
            assert p.requires_grad, name
        else:
            assert not p.requires_grad, name
    assert model.dynarank_modules_to_save == ["classifier"]
    assert dynarank.count_trainable(model) == dynarank.adapter_parameter_count(model) + 2 * D + 2


def test_a_tied_or_causal_lm_head_is_not_trained():
    model = dynarank.attach(tiny_llama(), DynaRankConfig(target_modules=["q_proj", "v_proj"], r=2))
    assert not model.lm_head.weight.requires_grad
    assert dynarank.count_trainable(model) == dynarank.adapter_parameter_count(model)


def test_a_regex_target_is_matched_against_the_full_name():
    config = DynaRankConfig(target_modules=r"bert\.encoder\.layer\.0\.attention\.self\.(query|value)", r=2)
    model = dynarank.attach(tiny_bert(), config)
    assert sorted(dynarank.elastic_layers(model)) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
    ]


def test_exclude_modules_are_never_adapted():
    config = DynaRankConfig(target_modules="all-linear", exclude_modules=["key", "intermediate.dense"], r=2)
    names = list(dynarank.elastic_layers(dynarank.attach(tiny_bert(), config)))
    assert len(names) == 2 * 4 + 1
    assert not any(n.endswith((".key", ".intermediate.dense")) for n in names)


def test_a_target_list_matching_nothing_raises_and_lists_the_model_modules():
    model = tiny_bert()
    with pytest.raises(ValueError, match="matches no Linear module") as info:
        dynarank.attach(model, DynaRankConfig(target_modules=["q_proj", "v_proj"]))
    message = str(info.value)
    assert "query" in message and "attention.output.dense" in message and "q_proj" in message
    assert not dynarank.elastic_layers(model)


def test_targeting_only_a_task_head_says_that_heads_are_trained_in_full():
    with pytest.raises(ValueError, match=r"Task heads \(classifier\) are trained in full"):
        dynarank.attach(tiny_bert(), DynaRankConfig(target_modules=["classifier"]))


@pytest.mark.parametrize(
    "config, field, named",
    [
        (dict(target_modules=["q_proj", "vproj"]), "target_modules", "'vproj' matches no Linear module"),
        (dict(target_modules=["q_proj"], exclude_modules=["typo"]), "exclude_modules", "'typo' matches no Linear"),
        (dict(target_modules=["q_proj", "lm_head"]), "target_modules", "'lm_head' names a task head"),
        (dict(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"]), "target_modules", "exclude_modules"),
    ],
    ids=["misspelt-target", "misspelt-exclusion", "a-task-head-beside-targets", "a-target-wholly-excluded"],
)
def test_a_name_given_that_matches_nothing_is_refused_even_when_the_others_match(config, field, named):
    """As modules_to_save refuses a name that matches nothing. Before, ['q_proj', 'vproj'] adapted q_proj alone
    and said nothing, a misspelt exclusion excluded nothing, and a task head beside real targets was dropped."""
    model = tiny_llama()
    with pytest.raises(ConfigError) as info:
        dynarank.attach(model, DynaRankConfig(r=2, **config))
    assert info.value.fields == (field,)
    message = str(info.value)
    assert named in message
    assert "model.layers.{i}.self_attn.v_proj" in message  # what the model's Linear modules are called
    assert not dynarank.elastic_layers(model) and not hasattr(model, "dynarank_config")


def test_a_task_head_named_beside_encoder_targets_is_refused_saying_heads_are_never_adapted():
    with pytest.raises(ConfigError, match=r"\['classifier'\] match nothing .*'classifier' names a task head"):
        dynarank.attach(tiny_bert(), DynaRankConfig(r=2, target_modules=["query", "classifier"]))


def test_the_default_target_list_is_the_librarys_choice_and_is_not_checked_name_by_name():
    """DynaRankConfig's default (query and value) names BERT's projections; a model with only one of them is
    adapted where it matches, as before. A list the user gives is checked name by name."""
    model = torch.nn.Module()
    model.query = torch.nn.Linear(D, D)
    dynarank.attach(model, DynaRankConfig(r=2))
    assert list(dynarank.elastic_layers(model)) == ["query"]


def test_an_untied_lm_head_is_named_as_left_frozen_not_as_trained_in_full():
    """The default modules_to_save leaves the output embedding out, tied or not. Before, the note said an untied
    Llama lm_head was trained in full while attach left it frozen."""
    with pytest.raises(ConfigError) as info:
        dynarank.attach(tiny_llama(), DynaRankConfig(target_modules=["nope"]))
    message = str(info.value)
    assert "The LM head (lm_head) is never adapted, and it stays frozen" in message
    assert "trained in full" not in message
    model = dynarank.attach(tiny_llama(), DynaRankConfig(r=2, target_modules=["q_proj"]))
    assert not model.lm_head.weight.requires_grad and model.dynarank_modules_to_save == []


def test_an_lm_head_named_in_modules_to_save_is_named_as_trained_in_full_and_is():
    config = dict(target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match=r"Task heads \(lm_head\) are trained in full"):
        dynarank.attach(tiny_llama(), DynaRankConfig(**{**config, "target_modules": ["nope"]}))
    model = dynarank.attach(tiny_llama(), DynaRankConfig(r=2, **config))
    assert model.lm_head.weight.requires_grad


@pytest.mark.parametrize(
    "arguments, named",
    [
        (lambda: (tiny_llama(), {"method": "ard"}), r"got dict: .*DynaRankConfig\(\*\*fields\)"),
        (lambda: (tiny_llama(), None), "got NoneType: a config is needed"),
        (lambda: ("model", DynaRankConfig()), r"takes the model \(a torch.nn.Module\) first, got str"),
        (lambda: (DynaRankConfig(), tiny_llama()), r"takes the model \(a torch.nn.Module\) first, got FixedRankConfig"),
    ],
    ids=["a-dict", "none", "a-string", "swapped"],
)
def test_arguments_of_the_wrong_type_are_refused_with_a_type_error_that_says_what_attach_takes(arguments, named):
    """Before, each failed with an AttributeError deep inside attach ('dict' object has no attribute ...)."""
    with pytest.raises(TypeError, match=named):
        dynarank.attach(*arguments())


def test_a_gpt2_model_is_refused_with_the_reason_that_its_projections_are_conv1d():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=32))
    with pytest.raises(ValueError, match="Conv1D"):
        dynarank.attach(model, DynaRankConfig(target_modules="all-linear"))


@pytest.mark.parametrize("r", [0, -1, -8])
def test_a_non_positive_rank_is_rejected(r):
    with pytest.raises(ValueError, match="r: must be a positive integer"):
        DynaRankConfig(r=r)


def _snapshot(model):
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


def _assert_untouched(model, snapshot):
    assert not any(isinstance(m, ElasticLoRALinear) for m in model.modules())
    assert not hasattr(model, "dynarank_config")
    now = _snapshot(model)
    assert now.keys() == snapshot.keys()
    for name, (requires_grad, value) in snapshot.items():
        assert now[name][0] == requires_grad, name
        assert torch.equal(now[name][1], value), name


def test_a_head_count_that_does_not_divide_raises_and_leaves_the_model_untouched():
    model = tiny_bert()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="head"):
        dynarank.attach(model, DynaRankConfig(target_modules=BERT_ATTENTION, num_heads=5))
    _assert_untouched(model, snapshot)


def test_a_key_value_head_count_that_does_not_fit_leaves_the_model_untouched():
    model = tiny_llama()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match="heads"):  # q_proj (4 heads) is fine, v_proj with 3 kv heads is not
        dynarank.attach(model, DynaRankConfig(target_modules=["q_proj", "v_proj"], num_kv_heads=3))
    _assert_untouched(model, snapshot)


def test_attaching_twice_raises():
    model = dynarank.attach(tiny_bert(), DynaRankConfig(target_modules=["query"]))
    n_layers = len(dynarank.elastic_layers(model))
    with pytest.raises(ValueError, match="already"):
        dynarank.attach(model, DynaRankConfig(target_modules=["value"]))
    assert len(dynarank.elastic_layers(model)) == n_layers == 2


@pytest.mark.parametrize("targets", [["query", "value"], "all-linear"])
def test_a_model_already_carrying_peft_adapters_is_refused_and_left_untouched(targets):
    """dynarank would adapt around PEFT's layers (or adapt PEFT's own lora_A / lora_B) and freeze them."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="already carries PEFT adapters .*query is PEFT's peft"):
        dynarank.attach(wrapped, DynaRankConfig(r=2, target_modules=targets))
    assert not dynarank.elastic_layers(wrapped)
    assert {n for n, p in wrapped.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize("saved", ["query", "attention"])
def test_a_module_both_adapted_and_trained_whole_is_refused(saved):
    """Its frozen base would train beside the adapter, and no stock PEFT adapter holds both (it failed to load)."""
    model = tiny_bert()
    with pytest.raises(ConfigError, match="modules_to_save / target_modules: .*adapted"):
        dynarank.attach(model, DynaRankConfig(r=2, target_modules=["query"], modules_to_save=[saved, "classifier"]))
    assert not dynarank.elastic_layers(model)


def test_model_code_that_reads_a_targets_weight_still_runs():
    """T5 reads ``self.wo.weight.dtype`` in its forward pass: an adapted layer reads its base's weight and bias
    through, as stock PEFT's layers do (the first forward died with an AttributeError)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    ids = torch.randint(3, 100, (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).logits
    dynarank.attach(model, DynaRankConfig(method="dynarank-lora", r=2, target_modules=["wo", "q"]))
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert isinstance(wo, ElasticLoRALinear) and wo.weight is wo.base.weight and wo.bias is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, labels=ids).logits, before)  # a fresh adapter adds nothing
    model(input_ids=ids, labels=ids).loss.backward()
    assert wo.group_weight.grad is not None or wo.shared_weight.grad is not None


def test_a_fresh_attach_does_not_change_the_model_output():
    model = tiny_llama()
    ids = token_batch()
    with torch.no_grad():
        before = model(ids).logits
        dynarank.attach(model, DynaRankConfig(target_modules="all-linear", head_layout="shared", r=3))
        assert torch.equal(model(ids).logits, before)


def test_a_seed_makes_the_initialisation_reproducible():
    config = DynaRankConfig(target_modules=BERT_ATTENTION, seed=5)
    a = dynarank.elastic_layers(dynarank.attach(tiny_bert(), config))
    b = dynarank.elastic_layers(dynarank.attach(tiny_bert(), DynaRankConfig(target_modules=BERT_ATTENTION, seed=5)))
    assert all(torch.equal(a[n].shared_weight, b[n].shared_weight) for n in a)
    assert all(torch.equal(a[n].group_weight, b[n].group_weight) for n in a)


# ---------------------------------------------------------------- trainable-parameter counts


def _per_rank_formula(d_in, d_out, heads, head_dim, r, layout, split="rows"):
    """Hand-computed adapter size of one projection with `heads` groups at rank r each."""
    other = d_in if split == "rows" else d_out  # the shared side: A rows (rows) or B^T rows (cols)
    if heads == 1:
        return r * (d_in + d_out)
    if layout == "own":
        return heads * r * (other + head_dim)  # per head: r * (d_in + d_h)
    return r * other + heads * r * head_dim  # r * d_in + G * r * d_h


@pytest.mark.parametrize("granularity", ["head", "matrix"])
def test_bert_trainable_parameters_follow_the_formula(layout, granularity):
    r = 2
    per_head = {"head_layout": layout} if granularity == "head" else {}  # per matrix no layout is given (it is refused)
    config = DynaRankConfig(
        target_modules=BERT_ATTENTION + ["intermediate.dense"], r=r, granularity=granularity, **per_head
    )
    model = dynarank.attach(tiny_bert(), config)
    heads = HEADS if granularity == "head" else 1
    per_layer = (
        3 * _per_rank_formula(D, D, heads, D_H, r, layout)
        + _per_rank_formula(D, D, heads, D_H, r, layout, split="cols")
        + _per_rank_formula(D, 64, 1, 64, r, layout)
    )
    expected = 2 * 1472 if (granularity, layout) == ("head", "own") else 2 * 704  # shared == plain LoRA's price
    assert 2 * per_layer == expected
    assert dynarank.adapter_parameter_count(model) == expected
    assert dynarank.count_trainable(model) == expected + (D * 2 + 2)  # + the classifier


def test_llama_trainable_parameters_follow_the_formula(layout):
    r = 3
    model = dynarank.attach(tiny_llama(), DynaRankConfig(target_modules="all-linear", r=r, head_layout=layout))
    per_layer = (
        _per_rank_formula(D, D, 4, D_H, r, layout)  # q_proj: 4 query heads
        + 2 * _per_rank_formula(D, 16, 2, D_H, r, layout)  # k_proj, v_proj: 2 key-value heads
        + _per_rank_formula(D, D, 4, D_H, r, layout, split="cols")  # o_proj
        + 2 * _per_rank_formula(D, 48, 1, 48, r, layout)
        + _per_rank_formula(48, D, 1, D, r, layout)
    )
    assert per_layer == (2160 if layout == "own" else 1392)
    assert dynarank.adapter_parameter_count(model) == dynarank.count_trainable(model) == 2 * per_layer


# a list's "dense" matches classifier.dense too (a name that matches only inside a head is refused: test above)
@pytest.mark.parametrize("targets", ["all-linear", ["dense", "query"], r".*(dense|out_proj)"])
def test_nothing_inside_a_task_head_is_adapted_and_the_whole_head_stays_trainable(targets):
    # RoBERTa's head is a module with Linear layers of its own: classifier.dense and classifier.out_proj.
    model = dynarank.attach(tiny_roberta(), DynaRankConfig(target_modules=targets, r=2))
    adapted = dynarank.elastic_layers(model)
    assert adapted and not any(n.startswith("classifier") for n in adapted)
    assert model.dynarank_modules_to_save == ["classifier"]
    assert all(p.requires_grad for p in model.classifier.parameters())


def test_a_task_head_that_would_train_in_float16_is_warned_about(caplog):
    """AdamW's epsilon underflows in float16: a float16 head is non-finite after the first step (a bfloat16 one,
    with float32's range, trains)."""
    import logging

    with caplog.at_level(logging.WARNING):
        dynarank.attach(tiny_bert().to(torch.bfloat16), dynarank.DynaRankConfig(r=2, target_modules=["query"]))
    assert "float16" not in caplog.text
    with caplog.at_level(logging.WARNING):
        dynarank.attach(tiny_bert().half(), dynarank.DynaRankConfig(r=2, target_modules=["query"]))
    assert "classifier trains whole in float16" in caplog.text


def _bert2bert(encoder_heads: int = 2, decoder_heads: int = 4):
    from transformers import BertConfig, EncoderDecoderConfig, EncoderDecoderModel

    shape = dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, intermediate_size=48)
    encoder = BertConfig(**shape, num_attention_heads=encoder_heads)
    decoder = BertConfig(**shape, num_attention_heads=decoder_heads, is_decoder=True, add_cross_attention=True)
    return EncoderDecoderModel(config=EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder))


@pytest.mark.parametrize(
    "make, expected",
    [
        # one config holds both sides' counts (BART, Whisper): the decoder's own, cross-attention included
        (
            lambda: tiny_bart(decoder_heads=2),
            {"encoder.layers.0.self_attn": 4, "decoder.layers.0.self_attn": 2, "decoder.layers.0.encoder_attn": 2},
        ),
        # a config per tower (EncoderDecoderModel, CLIP, a vision-language model's vision tower)
        (_bert2bert, {"encoder.encoder.layer.0.attention": 2, "decoder.bert.encoder.layer.0.attention": 4}),
    ],
)
def test_every_attention_module_is_split_by_the_head_count_of_the_part_of_the_model_it_is_in(make, expected):
    """Before, one head count (the top config's, or its text config's) split every module: BART's decoder, with 2
    heads, had 4 rank groups of half a head each, and nothing said so."""
    torch.manual_seed(0)
    # one regex for both models' query projections (a list's names must each match in the model)
    model = dynarank.attach(make(), DynaRankConfig(method="ard", r=2, target_modules=r".*\.(q_proj|query)"))
    groups = {name: layer.n_groups for name, layer in dynarank.elastic_layers(model).items()}
    for part, heads in expected.items():
        found = [n for n in groups if part in n]
        assert found and all(groups[n] == heads for n in found), (part, {n: groups[n] for n in found})


def test_a_config_with_a_head_count_per_stage_is_refused_naming_one_group_per_matrix():
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=2)
    model = SwinForImageClassification(config)
    with pytest.raises(ConfigError, match=r"head count per stage \(\[2, 4\]\).*granularity='matrix'"):
        dynarank.attach(model, DynaRankConfig(method="ard", r=2, target_modules=["q_proj"]))
    dynarank.attach(model, DynaRankConfig(method="ard", r=2, target_modules=["q_proj"], granularity="matrix"))


def test_conv1d_modules_a_target_spec_matches_beside_linear_ones_are_named_as_left_unadapted(caplog):
    """A vision encoder with a GPT-2 decoder: 'all-linear' adapted the encoder and left the decoder's Conv1D
    projections frozen without a word."""
    import logging

    from transformers import GPT2Config, GPT2Model

    class TwoParts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Sequential(torch.nn.Linear(8, 32))
            self.decoder = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=100, n_positions=16))

    with caplog.at_level(logging.WARNING):
        model = dynarank.attach(TwoParts(), DynaRankConfig(r=2, target_modules="all-linear", granularity="matrix"))
    assert list(dynarank.elastic_layers(model)) == ["encoder.0"]
    assert "also matches 4 transformers Conv1D modules (decoder.h.0.attn.c_attn" in caplog.text


@pytest.mark.parametrize("method", ["ard", "elalora", "adalora-physical"])
def test_a_rank_learning_method_on_an_nn_sequential_is_refused_at_attach(method):
    """The controller keeps its parameters (the alphas, E) in a submodule, and nn.Sequential runs every submodule:
    before, the first forward after build_controller failed in torch ('missing the required forward function')."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with pytest.raises(ValueError, match=r"nn.Sequential .*Attach to the model inside it"):
        dynarank.attach(model, DynaRankConfig(method=method, r=4, target_modules="all-linear"))
    dynarank.attach(model, DynaRankConfig(method="dynarank-lora", r=4, target_modules="all-linear"))  # no controller


def test_an_exclusion_that_leaves_no_target_says_so():
    config = DynaRankConfig(target_modules=["query"], exclude_modules=["query"])
    with pytest.raises(ConfigError, match=r"exclude_modules=\['query'\] leaves out every module it matches"):
        dynarank.attach(tiny_bert(), config)


def test_targeting_only_a_tied_lm_head_says_it_stays_frozen():
    with pytest.raises(ConfigError, match=r"The LM head \(lm_head\) is tied to the input embeddings: it stays frozen"):
        dynarank.attach(tiny_llama_tied(), DynaRankConfig(target_modules=["lm_head"]))


def tiny_llama_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import TINY_DECODER

    return LlamaForCausalLM(LlamaConfig(**TINY_DECODER, vocab_size=100, tie_word_embeddings=True))


def test_fused_qkv_projections_are_named_as_one_group_per_matrix_under_per_head_granularity(caplog):
    """Phi-3's qkv_proj holds the heads of q, k and v in one matrix: it cannot be split per head, and before it got
    one group without a word while its o_proj was split per head."""
    import logging

    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, pad_token_id=0,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        model = dynarank.attach(Phi3ForCausalLM(config), DynaRankConfig(r=2, target_modules=["qkv_proj", "o_proj"]))
    groups = {n: layer.n_groups for n, layer in dynarank.elastic_layers(model).items()}
    assert groups["model.layers.0.self_attn.qkv_proj"] == 1 and groups["model.layers.0.self_attn.o_proj"] == 4
    assert "model.layers.0.self_attn.qkv_proj and 1 more compute q, k and v in one matrix" in caplog.text


def test_an_attention_output_projection_named_dense_is_split_per_head_as_o_proj_is():
    """Phi's self_attn.dense (Falcon's and Bloom's self_attention.dense, GPT-NeoX's attention.dense) is the
    attention's output projection: split per head by its input columns. Before, it got one group per matrix while
    its q, k and v were split per head."""
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(
        vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, pad_token_id=0,
    )  # fmt: skip
    targets = ["q_proj", "k_proj", "v_proj", "dense", "fc1"]
    model = dynarank.attach(PhiForCausalLM(config), DynaRankConfig(r=2, target_modules=targets))
    layers = {n.rsplit(".", 1)[-1]: layer for n, layer in dynarank.elastic_layers(model).items()}
    assert {n: (layer.n_groups, layer.split) for n, layer in layers.items()} == {
        "q_proj": (4, "rows"), "k_proj": (4, "rows"), "v_proj": (4, "rows"), "dense": (4, "cols"), "fc1": (1, "rows"),
    }  # fmt: skip
