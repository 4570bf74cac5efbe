"""Data-driven starting ranks for ARD-LoRA (rank_init='data'): what the init measures, what it sets, and that every
way of training (a plain loop, the training loop, the Trainer, a resumed run) starts from it exactly once."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import dynarank
from dynarank import DynaRankConfig, attach, build_controller, elastic_layers, init_ranks
from dynarank.config import ConfigError
from dynarank.rank_init import RANK_INIT_ATTR, RELATIVE_STATISTICS, collect_statistics, init_batch_count
from dynarank.rank_spectra import allocate, layer_spectrum
from dynarank.training.loop import TrainSpec, train, train_classifier
from planted_task import DEFAULT_TRUE_RANKS, make_planted_task
from tiny_models import TokenDataset, WordTokenizer, examples, tiny_bert, tiny_llama, token_batch, training_args

MODELS = {"bert": tiny_bert, "llama": tiny_llama}  # llama: grouped-query attention, 4 query and 2 key-value heads


def token_batches(n: int = 4, seed: int = 1) -> list[dict]:
    """Batches a tiny model takes: next-token labels (llama) work as class labels' stand-in for bert below."""
    return [{"input_ids": token_batch(4, 9, seed=seed + i)} for i in range(n)]


def labelled(kind: str, batches: list[dict]) -> list[dict]:
    if kind == "llama":
        return [{**b, "labels": b["input_ids"]} for b in batches]
    return [{**b, "labels": (b["input_ids"][:, 0] > 50).long()} for b in batches]


def data_model(kind: str = "bert", layout: str = "own", budget: int = 1500, seed: int = 0, **options):
    options = {"target_modules": "all-linear", **options}
    config = DynaRankConfig(
        method="ard", r=4, head_layout=layout, rank_init="data", target_params=budget, seed=seed, **options
    )
    return attach(MODELS[kind](seed=seed), config)


def rank_prices(model) -> list[int]:
    """What one rank of one group of each layer can cost (the first user of a shared slot pays its A row)."""
    return [layer.group_size + layer.other_dim for layer in elastic_layers(model).values()]


# ---------------------------------------------------------------------------------------------- what it sets


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("layout", ["own", "shared"])
def test_the_starting_ranks_fill_the_requested_start_budget(kind, layout):
    model = data_model(kind, layout, init_rho=1.5)
    record = init_ranks(model, labelled(kind, token_batches()))
    size = dynarank.adapter_parameter_count(model)
    assert record.start_budget == int(1.5 * 1500)
    assert record.start_params == size
    # Filled to within one rank's price: the greedy stops only when nothing more fits.
    assert record.start_budget - max(rank_prices(model)) < size <= record.start_budget
    assert record.ranks == {name: layer.ranks for name, layer in elastic_layers(model).items()}
    assert len({tuple(r) for r in record.ranks.values()}) > 1  # not a uniform allocation


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("layout", ["own", "shared"])
@pytest.mark.parametrize("statistic", ["gradient", "gradient-relative", "activation", "gradient-relative, input scale"])
def test_the_function_at_step_0_is_the_base_models(kind, layout, statistic):
    ids = token_batch(3, 7, seed=5)
    with torch.no_grad():
        base = MODELS[kind]()(input_ids=ids).logits
    statistic, _, scale = statistic.partition(", ")
    model = data_model(kind, layout, init_statistic=statistic, init_scale="input" if scale else "norm")
    init_ranks(model, labelled(kind, token_batches()))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base)  # B = 0 everywhere: not one bit differs


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("layout", ["own", "shared"])
def test_without_a_budget_every_rank_stays_and_a_points_along_the_measured_directions(kind, layout, caplog):
    model = data_model(kind, layout, budget=None)
    fresh = {n: layer.shared_weight.detach().clone() for n, layer in elastic_layers(model).items()}
    uniform_size = dynarank.adapter_parameter_count(model)
    with caplog.at_level("INFO", logger="dynarank.rank_init"):
        record = init_ranks(model, labelled(kind, token_batches()))
    assert record.target_params is None and record.start_budget == record.start_params == uniform_size
    assert f"{uniform_size} adapter parameters (no budget)" in caplog.text  # not a ratio to a budget it does not have
    layers = elastic_layers(model)
    assert all(layer.ranks == [4] * layer.n_groups for layer in layers.values())  # the alphas decide the size
    moved = [not torch.allclose(layer.shared_weight, fresh[n]) for n, layer in layers.items()]
    assert any(moved)  # A rows written along the measured directions
    ctrl = build_controller(model, total_steps=40)
    assert ctrl.rank_init["start_params"] == uniform_size


@pytest.mark.parametrize("layout", ["own", "shared"])
def test_the_init_is_deterministic_for_a_seed(layout):
    first, second = data_model("llama", layout), data_model("llama", layout)
    init_ranks(first, labelled("llama", token_batches()))
    init_ranks(second, labelled("llama", token_batches()))
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert getattr(first, RANK_INIT_ATTR)["ranks"] == getattr(second, RANK_INIT_ATTR)["ranks"]


def test_the_alphas_start_at_the_ranks_over_r0_and_every_live_rank_is_on():
    model = data_model("llama", "shared")
    init_ranks(model, labelled("llama", token_batches()))
    gates = model.dynarank_ard
    for name, layer in elastic_layers(model).items():
        assert gates.of(name).tolist() == [r / 4 for r in layer.ranks]
        gate = layer.gate()  # ARD's mask, from the alphas
        if gate is not None and layer.max_rank:
            on = [int(gate[g, : layer.ranks[g]].sum()) for g in range(layer.n_groups)]
            assert on == layer.ranks


def outlier_llama(channel: int = 3, gain: float = 40.0):
    """Tiny llama whose attention inputs carry one channel ``gain`` times the others (real LMs' massive
    activations): the norm before every attention block scales that channel up."""
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[channel] *= gain
    return model


def inputs_of(model, batch: dict, suffix: str) -> torch.Tensor:
    """(tokens, d_in) the inputs of the first module named ``...suffix`` on ``batch``."""
    seen = []
    module = next(m for n, m in model.named_modules() if n.endswith(suffix))
    handle = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().reshape(-1, m.in_features)))
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    handle.remove()
    return seen[0].double()


@pytest.mark.parametrize("layout", ["own", "shared"])
def test_the_input_scale_makes_each_direction_read_what_a_default_row_reads(layout):
    batches = labelled("llama", token_batches(1))  # one batch: the sample the scale is measured on
    reads = {}
    for scale in ("norm", "input"):
        model = attach(outlier_llama(), data_config(layout, init_scale=scale, target_modules=["q_proj", "o_proj"]))
        init_ranks(model, batches)
        for name, layer in elastic_layers(model).items():
            x = inputs_of(model, batches[0], name)  # the fresh adapter's B = 0: the base model's inputs
            if layer.split == "rows":
                read = (x @ layer.shared_weight.double().t()).pow(2).mean(0)  # (S,)
                default = x.pow(2).sum(1).mean() / (3 * layer.in_features)
            else:  # o_proj: group g's columns read x's g-th slice
                d_g, offset, read, default = layer.group_size, 0, [], []
                for g, rank in enumerate(layer.ranks):
                    xg = x[:, g * d_g : (g + 1) * d_g]
                    read += (xg @ layer.group_weight.double()[:, offset : offset + rank]).pow(2).mean(0).tolist()
                    default += [xg.pow(2).sum(1).mean() / (3 * layer.in_features)] * rank
                    offset += rank
                read, default = torch.tensor(read), torch.tensor(default)
            reads[scale, name] = (read / default).sqrt()  # rms(w . x) over a default row's expected rms
    q_norm = torch.cat([v for (s, n), v in reads.items() if s == "norm" and n.endswith("q_proj")])
    assert q_norm.max() > 5  # at the default draw's norm, the top direction reads the outlier channel
    for (scale, _), ratio in reads.items():
        if scale == "input":
            torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=1e-4, atol=0.0)


def test_a_skipped_batch_gives_neither_statistics_nor_the_input_scales_sample():
    """A batch whose loss is not finite (every label -100) is skipped. Before, the input rows the scale is measured
    on were still taken from it, when it came last."""
    batches = labelled("llama", token_batches(3))
    bad = {**batches[2], "input_ids": batches[2]["input_ids"].flip(0)}
    bad["labels"] = torch.full_like(bad["labels"], -100)
    starts = []
    for measured in (batches[:2], [*batches[:2], bad]):
        model = data_model("llama", layout="shared", budget=900, init_batches=len(measured))
        record = init_ranks(model, measured)
        assert record.batches == 2
        starts.append({k: v.clone() for k, v in model.state_dict().items() if "lora" in k or "weight" in k})
    assert starts[0].keys() == starts[1].keys() and all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])


@pytest.mark.parametrize("layout", ["own", "shared"])
def test_input_gains_rate_each_candidate_by_what_its_rescaled_row_delivers(layout, monkeypatch):
    import dynarank.rank_init as rank_init

    batches = labelled("llama", token_batches(1))
    seen = {}
    allocate_, rescale = rank_init.allocate, rank_init.match_input_scale

    def spy_allocate(layers, spectra, *args):
        seen["gains"] = {name: sp.gains.clone() for name, sp in spectra.items()}
        return allocate_(layers, spectra, *args)

    def spy_rescale(layer, proj, norm):
        factor = rescale(layer, proj, norm)
        seen.setdefault("factors", []).append(factor)
        return factor

    monkeypatch.setattr(rank_init, "allocate", spy_allocate)
    monkeypatch.setattr(rank_init, "match_input_scale", spy_rescale)
    rated = {}
    for scale in ("input", "input-gains"):
        seen.clear()
        config = data_config(layout, budget=500, init_scale=scale, target_modules=["q_proj", "o_proj"])
        record = init_ranks(attach(outlier_llama(), config), batches)
        rated[scale] = (seen["gains"], seen["factors"], record.ranks)
    plain, factors, _ = rated["input"]
    for (name, gains), factor in zip(plain.items(), factors):
        expected = gains * factor.view(-1, gains.shape[1])  # shared q_proj: one factor per slot, for every head
        torch.testing.assert_close(rated["input-gains"][0][name], expected, rtol=1e-12, atol=0.0)
    assert rated["input"][2] != rated["input-gains"][2]  # the outlier-reading directions lose ranks


def data_config(layout: str, budget: int = 1500, **options) -> DynaRankConfig:
    return DynaRankConfig(method="ard", r=4, head_layout=layout, rank_init="data", target_params=budget, **options)


def test_with_the_norm_scale_a_directions_are_unit_vectors_at_the_norm_of_the_default_draw():
    model = data_model("bert", "own", target_modules=["query"], init_scale="norm")
    init_ranks(model, labelled("bert", token_batches()))
    for layer in elastic_layers(model).values():
        norms = layer.shared_weight.norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, (1 / 3) ** 0.5))


# ---------------------------------------------------------------------------------------------- the statistic


def planted(floor: int = 0, statistic: str | None = None, noise: float = 0.0):
    """The starting ranks of the planted task's 8 heads (``statistic`` None: the default one)."""
    knobs = {} if statistic is None else {"init_statistic": statistic}
    task = make_planted_task(seed=0, noise=noise)
    model = task.student()
    attach(
        model,
        DynaRankConfig(
            method="ard",
            r=8,
            target_modules=["query"],
            rank_init="data",
            target_params=1920,  # the oracle's size: the planted ranks cost exactly this
            head_layout="own",  # the planted heads read independent input directions: each its own A rows
            init_rho=1.0001,
            rank_floor=floor,
            **knobs,
        ),
    )
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(64, 64, generator=g) for _ in range(4)]
    batches = [{"x": x, "y": task.targets(x, g)} for x in xs]
    init_ranks(model, batches, loss_fn=lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean())
    return elastic_layers(model)["query"].ranks


@pytest.mark.parametrize("statistic", [None, "gradient", "gradient-relative"])
def test_the_gradient_statistics_find_the_planted_ranks(statistic):
    # Each head's loss gradient is -Delta_h x: its rank is the head's planted rank, whatever the base. One module:
    # dividing its gains by its own norm ('gradient-relative', the default) changes no comparison between its heads.
    assert planted(statistic=statistic) == list(DEFAULT_TRUE_RANKS)


@pytest.mark.parametrize("statistic, moves", [("gradient", True), ("gradient-relative", False)])
def test_relative_gains_do_not_see_a_modules_scale(statistic, moves):
    # The same two modules' statistics, one of them scaled by 100: the absolute gradient gives the loud module
    # more ranks; the relative one compares how concentrated each module's statistic is, and does not move.
    model = data_model("bert", "own", target_modules=["query", "value"], init_statistic=statistic)
    layers = elastic_layers(model)
    stats, _, _ = collect_statistics(model, labelled("bert", token_batches()), 4, "gradient")
    loud = next(name for name in layers if name.endswith("value"))

    def ranks(scale: float) -> dict:
        spectra = {
            n: layer_spectrum(layer, stats[n] * (scale if n == loud else 1.0), statistic in RELATIVE_STATISTICS)
            for n, layer in layers.items()
        }
        keep, _ = allocate(layers, spectra, 1500, 0)
        return {n: [len(k) for k in groups] for n, groups in keep.items()}

    assert (ranks(1.0) != ranks(100.0)) is moves


def test_the_activation_statistic_cannot_see_the_planted_change():
    # The outputs are those of the frozen random base: every head looks alike (docs/ard.md, the measurement).
    ranks = planted(statistic="activation")
    assert ranks != list(DEFAULT_TRUE_RANKS) and max(ranks) - min(ranks) <= 2


def test_a_head_whose_statistics_are_all_zero_gets_rank_zero_or_the_floor():
    # Heads 0 and 5 have no planted change: with noiseless targets their gradient is exactly zero.
    assert [planted()[h] for h in (0, 5)] == [0, 0]
    assert [planted(floor=1)[h] for h in (0, 5)] == [1, 1]


def test_statistics_that_are_zero_everywhere_are_refused_with_the_reason():
    model = data_model("bert", target_modules=["query"])
    with pytest.raises(ValueError, match="zero for every adapted module"):
        init_ranks(model, labelled("bert", token_batches()), loss_fn=lambda m, b: m(**b).logits.sum() * 0.0)


def test_batches_without_labels_are_refused_saying_the_model_returned_no_loss_and_what_to_pass():
    """Before, the pass failed in torch.isfinite(None), a TypeError that named neither the loss nor the labels."""
    model = data_model("llama")
    with pytest.raises(ValueError, match=r"the model returned no loss.*batches with labels.*loss_fn") as info:
        init_ranks(model, token_batches())
    assert "['input_ids']" in str(info.value)  # what the batch held
    assert init_ranks(model, labelled("llama", token_batches())).batches > 0  # the same model, given labels


def test_the_pass_reads_the_first_k_batches_and_leaves_no_gradient_and_no_training_mode_behind():
    model = data_model("bert", init_batches=2)
    model.train()
    seen = []

    def batches():
        for i, batch in enumerate(labelled("bert", token_batches(5))):
            seen.append(i)
            yield batch

    record = init_ranks(model, batches())
    assert record.batches == 2 and seen == [0, 1]
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_the_pass_puts_back_every_modules_own_mode():
    """A module kept in eval inside a model in training (a frozen BatchNorm, embeddings without dropout) stays so.
    Before, the pass ended with model.train(True), which turned every module to training."""
    model = data_model("bert")
    model.train()
    model.bert.embeddings.eval()
    modes = {name: module.training for name, module in model.named_modules()}
    init_ranks(model, labelled("bert", token_batches()))
    after = {name: module.training for name, module in model.named_modules()}
    assert {name: after[name] for name in modes} == modes  # the alphas' holder (dynarank_ard) is new
    assert not model.bert.embeddings.dropout.training


class TwoBranches(torch.nn.Module):
    """A model whose first adapted module (in module order) a text-only batch does not reach, as a vision tower
    before the language model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image_proj = torch.nn.Linear(16, 16)
        self.body = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x, labels):
        return torch.nn.functional.cross_entropy(self.head(torch.tanh(self.body(x))).reshape(-1, 4), labels.reshape(-1))


def test_a_first_module_the_batches_do_not_reach_leaves_the_others_measured_and_itself_at_rank_zero():
    """Before, the tokens were counted at the first adapted module in module order only: unreached, it counted
    none, and the pass refused as if the statistic were zero everywhere."""
    config = DynaRankConfig(method="ard", r=8, target_params=200, target_modules=["image_proj", "body"])
    model = attach(TwoBranches(), config)
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(2, 5, 16, generator=g), "labels": torch.randint(0, 4, (2, 5), generator=g)}]
    record = init_ranks(model, batches * 2, loss_fn=lambda m, b: m(**b), total_steps=60)
    assert record.tokens == 2 * 10
    assert record.ranks["image_proj"] == [0] and record.ranks["body"][0] > 0


def test_a_start_at_or_below_the_target_from_too_small_an_init_rho_names_init_rho():
    """init_rho just above 1 fills the start to within one rank's cost of init_rho x the target, which can land at or
    under it. Before, the controller named the budget and r as the remedy."""
    model = data_model("bert", budget=600, init_rho=1.01)
    assert init_ranks(model, labelled("bert", token_batches())).start_params <= 600
    with pytest.raises(ConfigError, match=r"^init_rho / target_params: .*init_rho=1.01 .*raise init_rho"):
        build_controller(model, total_steps=40)


def test_activation_statistics_skip_padding():
    model = data_model("bert", init_statistic="activation")
    batch = token_batches(1)[0]
    mask = torch.ones_like(batch["input_ids"])
    mask[:, 5:] = 0
    padded = {"input_ids": batch["input_ids"].clone(), "attention_mask": mask}
    padded["input_ids"][:, 5:] = 7  # what padding holds must not count
    other = {"input_ids": padded["input_ids"].clone(), "attention_mask": mask}
    other["input_ids"][:, 5:] = 42
    a, tokens, _ = collect_statistics(model, [padded], 1, "activation", lambda m, b: m(**b).logits)
    b, _, _ = collect_statistics(model, [other], 1, "activation", lambda m, b: m(**b).logits)
    assert tokens == 4 * 5
    name = "bert.encoder.layer.0.attention.self.query"
    torch.testing.assert_close(a[name], b[name])


def test_the_activation_statistic_sums_the_positions_a_causal_lms_loss_scores_with_or_without_an_attention_mask():
    """A causal LM shifts its labels inside: the output at position t is scored by the label at t + 1. Before, the
    positions whose own label counted were summed (one off), and without an attention_mask (padding-free batches)
    the labels were not read at all."""
    model = data_model("llama", init_statistic="activation")
    ids = token_batch(2, 8)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt: positions 5-7 are the response
    name = "model.layers.0.self_attn.q_proj"
    seen = []
    handle = elastic_layers(model)[name].register_forward_hook(lambda m, a, out: seen.append((a[0], out)))
    with torch.no_grad():
        model.eval()(input_ids=ids)
    handle.remove()
    x, y = (t[:, 4:7].reshape(-1, t.shape[-1]) for t in seen[0])  # outputs 4-6 predict tokens 5-7
    for batch in ({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)},
                  {"input_ids": ids, "labels": labels}):  # fmt: skip
        stats, tokens, _ = collect_statistics(model, [batch], 1, "activation")
        assert tokens == 2 * 3
        torch.testing.assert_close(stats[name], y.t() @ x, rtol=1e-5, atol=1e-5)


def test_an_encoder_decoders_activation_statistic_masks_each_side_by_its_own_positions():
    """BART: the encoder's modules by the input's attention mask, the decoder's by the labels. Before, one mask
    (the attention mask narrowed by the labels) was laid on whichever module had its shape: the encoder's statistic
    moved with the decoder's label padding."""
    from tiny_models import tiny_bart

    config = DynaRankConfig(
        method="ard", r=2, target_modules=["q_proj"], target_params=300, init_statistic="activation"
    )
    model = attach(tiny_bart(), config).eval()
    ids = token_batch(2, 6)
    labels = token_batch(2, 6, seed=3)
    padded = labels.clone()
    padded[:, 3:] = -100
    a, _, _ = collect_statistics(model, [{"input_ids": ids, "labels": labels}], 1, "activation")
    b, _, _ = collect_statistics(model, [{"input_ids": ids, "labels": padded}], 1, "activation")
    encoder, decoder = "model.encoder.layers.0.self_attn.q_proj", "model.decoder.layers.0.self_attn.q_proj"
    torch.testing.assert_close(a[encoder], b[encoder], rtol=0, atol=0)  # the labels are the decoder's
    c, _, _ = collect_statistics(model, [{"input_ids": ids, "labels": labels[:, :3].contiguous()}], 1, "activation")
    torch.testing.assert_close(b[decoder], c[decoder], rtol=1e-5, atol=1e-5)  # padded labels count as unpadded


# ---------------------------------------------------------------------------------------------- ARD from there


@pytest.mark.parametrize("layout", ["own", "shared"])
def test_gain_margins_order_the_alphas_by_the_measured_gain_of_each_groups_last_rank(layout):
    model = data_model("llama", layout, init_margin="gains")
    batches = labelled("llama", token_batches())
    init_ranks(model, batches)
    # The same measurement on a twin, done by hand: each group's last kept rank and its gain per parameter.
    twin = data_model("llama", layout)
    layers = elastic_layers(twin)
    stats, _, _ = collect_statistics(twin, batches, init_batch_count(None, None), "gradient-relative")
    spectra = {name: layer_spectrum(layer, stats[name], True) for name, layer in layers.items()}
    keep, _ = allocate(layers, spectra, int(1.5 * 1500), 0)
    tails, margins = [], []
    ctrl = build_controller(model, total_steps=40)
    for name, layer in elastic_layers(model).items():
        scaled = (4 * model.dynarank_ard.of(name)).tolist()
        for g, kept in enumerate(keep[name]):
            if kept:
                tails.append(float(spectra[name].gains[g, kept[-1]]) / layers[name].costs.rank_price())
                margins.append(scaled[g] - (layer.ranks[g] - 1))
            else:
                assert scaled[g] == 0.0
        assert ctrl.readout(name) == layer.ranks  # every started rank reads as started...
        gate = layer.gate()
        if layer.max_rank:
            assert [int(gate[g, : layer.ranks[g]].sum()) for g in range(layer.n_groups)] == layer.ranks  # ...and is on
    assert min(margins) == pytest.approx(0.75) and max(margins) == pytest.approx(1.0)
    by_gain = [m for _, m in sorted(zip(tails, margins))]
    assert by_gain == sorted(by_gain)  # a stronger last rank never starts nearer its switch-off point
    assert len(set(margins)) > 2


def test_the_budgets_first_cut_takes_the_last_rank_the_data_rated_lowest():
    from dynarank.controllers.ard_budget import cap_to_budget, prefix_cost

    model = data_model("llama", "shared", init_margin="gains")
    init_ranks(model, labelled("llama", token_batches()))
    layers = elastic_layers(model)
    scaled = {name: (4 * model.dynarank_ard.of(name)).tolist() for name in layers}
    ranks = {name: list(layer.ranks) for name, layer in layers.items()}
    cap_to_budget(layers, ranks, scaled, 0, prefix_cost(layers, ranks) - 1)
    cut = [(n, g) for n, layer in layers.items() for g in range(layer.n_groups) if ranks[n][g] < layer.ranks[g]]
    assert len(cut) == 1
    name, g = cut[0]
    lowest = min(s - (layers[n].ranks[i] - 1) for n in layers for i, s in enumerate(scaled[n]) if layers[n].ranks[i])
    assert scaled[name][g] - (layers[name].ranks[g] - 1) == lowest == pytest.approx(0.75)


def test_ard_starts_its_budget_from_the_init_and_scales_the_alpha_speed_to_the_start():
    model = data_model("bert", "shared")
    record = init_ranks(model, labelled("bert", token_batches()))
    ctrl = build_controller(model, total_steps=40)
    assert ctrl.start_params == record.start_params == ctrl.budget_at(0)
    assert ctrl.budget_at(40) == 1500
    started = [r for ranks in record.ranks.values() for r in ranks if r > 0]
    active = ctrl.settings.final_start - ctrl.settings.warmup_steps
    assert ctrl.settings.lr_alpha == pytest.approx(2.0 * (sum(started) / len(started) / 4) / active)
    assert ctrl.state_dict()["rank_init"] == getattr(model, RANK_INIT_ATTR)


def test_a_controller_built_before_the_init_is_refused_with_what_to_call():
    model = data_model("bert")
    with pytest.raises(ConfigError, match=r"dynarank.init_ranks\(model, batches\)"):
        build_controller(model, total_steps=40)


def test_the_init_runs_once_and_only_on_a_fresh_adapter():
    model = data_model("bert")
    init_ranks(model, labelled("bert", token_batches()))
    with pytest.raises(ValueError, match="once per run"):
        init_ranks(model, labelled("bert", token_batches()))
    uniform = attach(tiny_bert(), DynaRankConfig(method="ard", r=4, target_params=1500, rank_init="uniform"))
    with pytest.raises(ConfigError, match="rank_init='data'"):
        init_ranks(uniform, labelled("bert", token_batches()))


@pytest.mark.parametrize(
    "options, fields",
    [
        ({"init_rho": 1.0, "target_params": 100}, "init_rho"),
        ({"init_batches": 0}, "init_batches"),
        ({"init_statistic": "weights"}, "init_statistic"),
        ({"init_margin": "random"}, "init_margin"),
        ({"init_scale": "rms"}, "init_scale"),
        ({"init_scale": "gains"}, "init_scale"),
        ({"rank_init": "svd"}, "rank_init"),
    ],
)
def test_bad_init_settings_are_refused_naming_the_fields(options, fields):
    with pytest.raises(ConfigError) as info:
        DynaRankConfig(method="ard", **options)
    assert str(info.value).startswith(fields + ":")


def test_a_plain_loop_trains_from_the_init(tmp_path):
    model = data_model("bert", "shared")
    batches = labelled("bert", token_batches(8))
    init_ranks(model, batches)
    controller = build_controller(model, total_steps=16)
    optimizer = controller.build_optimizer(lr=1e-2)
    for batch in batches * 2:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert controller.step == 16 and controller.adapter_parameters() <= 1500


# ---------------------------------------------------------------------------------------------- the training loop


def loop_spec(steps: int = 24, **options) -> TrainSpec:
    return TrainSpec(
        method="ard",
        r=4,
        target_modules=["query", "key", "value", "dense"],
        lr=1e-2,
        max_steps=steps,
        batch_size=8,
        dynarank={"target_params": 1500, "head_layout": "shared", "rank_init": "data", **options},
    )


def test_the_training_loop_measures_the_first_batches_it_trains_on(monkeypatch):
    import dynarank.training.loop as loop

    measured = []
    original = loop.init_ranks
    monkeypatch.setattr(
        loop, "init_ranks", lambda model, batches, **kw: original(model, measured.append(1) or batches, **kw)
    )
    done = train_classifier(tiny_bert(), WordTokenizer(), examples(), loop_spec())
    assert measured == [1]
    record = done.metrics["rank_init"]
    assert record["batches"] == 1  # 24 steps: one measured batch (init_batches=None: total_steps // 20, 1 to 4)
    assert record["start_params"] == done.controller.history[0]["adapter_parameters"]
    assert done.controller.history[0]["ranks"] == record["ranks"]
    assert done.metrics["adapter_parameters"] <= 1500


@pytest.mark.parametrize(
    ("options", "starts_from_data"),
    [
        ({"target_params": 1500}, True),  # the default, rank_init='auto', with a budget
        ({"target_params": None}, False),  # without a budget there is no start size to fill
        ({"target_params": 1500, "preset": "paper"}, False),  # the paper's uniform start
        ({"target_params": 1500, "rank_init": "uniform"}, False),
        ({"target_params": 1500, "rank_init": "data"}, True),
    ],
)
def test_the_default_start_is_measured_from_data_when_there_is_a_budget(options, starts_from_data):
    config = DynaRankConfig(method="ard", r=4, **options)
    assert config.data_start is starts_from_data
    done = train_classifier(tiny_bert(), WordTokenizer(), examples(), loop_spec(**{"rank_init": "auto", **options}))
    assert ("rank_init" in done.metrics) is starts_from_data
    used = done.metrics["settings"]  # what the run records: the config as attached, the start it took
    assert used["config"]["rank_init"] == options.get("rank_init", "auto")
    assert used["start"] == ("data" if starts_from_data else "uniform")
    first = done.controller.history[0]["ranks"]
    assert (set(first["bert.encoder.layer.0.attention.self.query"]) == {4}) is not starts_from_data


def test_auto_without_the_data_pass_starts_uniform_and_says_so():
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=4, target_params=800, head_layout="shared"))
    controller = build_controller(model, total_steps=40)
    assert controller.rank_init is None
    assert all(set(layer.ranks) == {4} for layer in elastic_layers(model).values())
    assert any("init_ranks" in w and "r = 4" in w for w in controller.setup_warnings)


@pytest.mark.parametrize(
    ("init_batches", "total_steps", "measured"),
    [
        (None, 10, 1),
        (None, 24, 1),
        (None, 60, 3),
        (None, 79, 3),
        (None, 80, 4),
        (None, 5000, 4),
        (None, None, 4),
        (2, 5000, 2),
        (7, 10, 7),
    ],
)
def test_unset_init_batches_scale_with_the_run_so_the_pass_stays_near_a_twentieth_of_it(
    init_batches, total_steps, measured
):
    assert init_batch_count(init_batches, total_steps) == measured


def test_an_unset_init_batches_measures_one_batch_per_twenty_steps_of_the_run():
    model = data_model("bert")
    record = init_ranks(model, labelled("bert", token_batches(5)), total_steps=40)
    assert record.batches == 2


def test_resume_after_the_init_restores_the_same_ranks_without_measuring_again(tmp_path, monkeypatch):
    import dynarank.training.loop as loop

    class Crash(Exception):
        pass

    def crash(record):
        if record["step"] == 13:
            raise Crash

    def run(path, **control):
        return train_classifier(
            tiny_bert(), WordTokenizer(), examples(), loop_spec(), run_dir=path, save_every=5, **control
        )

    full = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", on_step=crash)

    def no_second_init(*args, **kwargs):
        raise AssertionError("a resumed run measured its starting ranks again")

    monkeypatch.setattr(loop, "init_ranks", no_second_init)
    resumed = run(tmp_path / "b", resume=True)
    timeless = [{k: v for k, v in c.rank_init.items() if k != "seconds"} for c in (resumed.controller, full.controller)]
    assert timeless[0] == timeless[1]  # the record of the killed run's init, restored; the same ranks as run a's
    assert resumed.controller.settings.lr_alpha == full.controller.settings.lr_alpha
    assert resumed.controller.history == full.controller.history
    expected, got = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_the_loop_trains_a_gqa_causal_lm_from_the_init():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 100, (int(n),), generator=g).tolist() for n in torch.randint(5, 12, (24,), generator=g)]
    encoded = {"input_ids": ids, "labels": [[-100] * 3 + s[3:] for s in ids]}  # the loss on all but a prompt
    spec = TrainSpec(
        method="ard",
        r=4,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        lr=1e-2,
        max_steps=12,
        batch_size=8,
        dynarank={"rank_init": "data", "target_params": 800},
    )
    done = train(tiny_llama(), encoded, 0, spec)
    ranks = done.metrics["rank_init"]["ranks"]
    assert len(ranks["model.layers.0.self_attn.k_proj"]) == 2  # one group per key-value head
    assert done.metrics["adapter_parameters"] <= 800


# ---------------------------------------------------------------------------------------------- the Trainer


def make_trainer(tmp_path, model, steps: int = 12, **arguments):
    from transformers import Trainer

    args = training_args(tmp_path, max_steps=steps, seed=0, **arguments)
    callback = dynarank.DynaRankCallback(model)
    return Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[callback]), callback


def test_the_trainer_callback_measures_on_its_train_dataloader_and_rebinds_the_optimizer(tmp_path):
    model = attach(
        tiny_bert(),
        DynaRankConfig(method="ard", r=4, target_modules=["query", "value"], rank_init="data", target_params=900),
    )
    trainer, callback = make_trainer(tmp_path, model)
    trainer.train()
    ctrl = callback.controller
    assert ctrl.rank_init is not None and ctrl.history[0]["ranks"] == ctrl.rank_init["ranks"]
    assert ctrl.start_params == ctrl.rank_init["start_params"] and ctrl.adapter_parameters() <= 900
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in held for p in model.parameters() if p.requires_grad)  # no stale tensor trains instead


def test_a_trainer_run_resumed_from_a_checkpoint_does_not_measure_again(tmp_path, monkeypatch):
    import dynarank.integrations.transformers as integration

    def build():
        config = DynaRankConfig(
            method="ard", r=4, target_modules=["query", "value"], rank_init="data", target_params=900, seed=0
        )
        return attach(tiny_bert(), config)

    full_model = build()
    trainer, callback = make_trainer(tmp_path / "a", full_model, save_strategy="steps", save_steps=6)
    trainer.train()
    monkeypatch.setattr(integration, "init_ranks", lambda *a, **k: pytest.fail("measured again on resume"))
    model = build()
    resumed, again = make_trainer(tmp_path / "a", model, save_strategy="steps", save_steps=6)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-6"))
    assert again.controller.rank_init == callback.controller.rank_init
    assert again.controller.ranks() == callback.controller.ranks()


# ---------------------------------------------------------------------------------------------- two workers


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_statistics_on_two_gloo_workers_equal_one_process_with_the_same_global_batches():
    import rank_init_ddp_worker
    from test_distributed import biggest_difference, torchrun

    first, second = torchrun("rank_init_ddp_worker.py")["workers"]
    for kind in ("gradient", "activation"):
        single = rank_init_ddp_worker.run(kind)
        assert first[kind]["stats"] == second[kind]["stats"]  # the all-reduce gives both workers the same bits
        assert first[kind]["tokens"] == single["tokens"]
        scale = max(max(abs(v) for v in m) for m in single["stats"].values())
        # Float summation order differs across the all-reduce (measured: 3.6e-7 gradient, 1.8e-7 activation).
        assert biggest_difference(first[kind]["stats"], single["stats"]) < 1e-5 * scale
        assert first[kind]["ranks"] == second[kind]["ranks"] == single["ranks"]
    # init_scale='input': the last batch's sampled inputs (every row: the tiny batch holds fewer than the sample)
    # are reduced, so every worker rescales its directions by the same factors, those of one process.
    kind = "gradient, input scale"
    single = rank_init_ddp_worker.run("gradient", "input")
    assert first[kind]["energies"] == second[kind]["energies"]
    assert len(single["energies"]) == len(single["ranks"])  # one rescale per adapted module
    for ours, theirs in zip(first[kind]["energies"], single["energies"]):
        ours, theirs = torch.tensor(ours), torch.tensor(theirs)
        n = len(ours) // 2
        # What the inputs hold (||x||^2 sums) is one process's up to the shards' float rounding; what each direction
        # reads is compared for the top one only: lower directions of near-equal singular values turn with the
        # statistic's rounding (measured: 0.6% apart in one layer), though the ranks kept are the same.
        torch.testing.assert_close(ours[n:], theirs[n:], rtol=1e-5, atol=0.0)
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-4, atol=0.0)
    assert first[kind]["ranks"] == single["ranks"]


def test_on_train_begin_receives_the_train_dataloader_whose_batches_the_model_takes(tmp_path):
    from transformers import TrainerCallback

    class Seen(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
            self.batch = next(iter(train_dataloader))
            self.loss = model(**self.batch).loss

    model = attach(tiny_bert(), DynaRankConfig(method="dynarank-lora", r=2, target_modules=["query"]))
    trainer, _ = make_trainer(tmp_path, model, steps=1)
    seen = Seen()
    trainer.add_callback(seen)
    trainer.train()
    assert seen.batch["input_ids"].shape == (8, 8) and torch.isfinite(seen.loss)


@pytest.mark.slow
@pytest.mark.parametrize("start", [{"rank_init": "data"}, {}])  # asked for, and the default with a budget
def test_trl_sft_trainer_starts_ard_from_data_ranks(tmp_path, start):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from tiny_models import save_tiny_model_dir

    path = save_tiny_model_dir(tmp_path / "model", kind="llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.eos_token = "[SEP]"  # the packaged BERT tokenizer names none; TRL appends it to every text
    model = AutoModelForCausalLM.from_pretrained(path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    attach(model, DynaRankConfig(method="ard", r=4, target_modules=targets, target_params=800, **start))
    callback = dynarank.DynaRankCallback(model)
    data = Dataset.from_dict({"text": [f"this is sentence number {i} about cats" for i in range(64)]})
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=8,
        per_device_train_batch_size=8,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        max_length=32,
        learning_rate=1e-2,
        disable_tqdm=True,
    )
    SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[callback]).train()
    ctrl = callback.controller
    assert ctrl.rank_init["batches"] == 1  # max_steps=8 reached the init: one batch per 20 steps, at least 1
    assert ctrl.step == 8 and ctrl.history[0]["ranks"] == ctrl.rank_init["ranks"]
    assert ctrl.start_params == ctrl.rank_init["start_params"] > 800 >= ctrl.adapter_parameters()


# ---------------------------------------------------------------------------------------------- the command line


def test_dynarank_train_starts_from_data_ranks_with_and_without_a_budget(tmp_path):
    from dynarank.cli import main
    from test_cli import train_args, write_csv
    from tiny_models import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "model")
    data = write_csv(tmp_path / "data.csv")
    free = tmp_path / "no-budget"
    assert main(train_args(model_dir, data, free, "--rank-init", "data", "--init-batches", "1")) == 0
    measured = json.loads((free / "summary.json").read_text())["rank_init"]
    assert measured["target_params"] is None
    # One small batch measures fewer directions than r in some groups: those keep what was measured.
    assert 0 < measured["start_params"] <= measured["start_budget"]
    run = tmp_path / "run"
    argv = train_args(model_dir, data, run, "--rank-init", "data", "--target-params", "1200", "--init-batches", "2")
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rank_init"]["batches"] == 2 and summary["rank_init"]["start_params"] > 1200
    assert summary["adapter_parameters"] <= 1200
