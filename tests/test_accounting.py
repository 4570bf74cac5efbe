"""What a run reports about its size: trainable parameters and training-state bytes at start, peak, mean, end;
and, for ARD, which resizes its alphas decided and which its budget forced."""

from __future__ import annotations

import torch

from dynarank.training.loop import TrainSpec, train_classifier, training_state_bytes
from tiny_models import WordTokenizer, examples, tiny_bert


def run(method: str, **options) -> dict:
    spec = TrainSpec(
        method=method, r=4, target_modules=["query", "value"], lr=1e-2, max_steps=30, batch_size=8, dynarank=options
    )
    return train_classifier(tiny_bert(), WordTokenizer(), examples(), spec)


def test_a_shrinking_run_reports_its_peak_at_the_start_and_a_mean_between_start_and_end():
    result = run("ard", head_layout="shared", ard_lambda=3.0)
    metrics = result.metrics
    # The alphas' own AdamW moments appear when warm-up ends (they are frozen before): a few bytes per group.
    alphas = list(result.model.dynarank_ard.parameters())
    alpha_moments = sum(2 * 4 * p.numel() + 4 for p in alphas)  # exp_avg, exp_avg_sq and a float32 step each
    assert metrics["state_bytes_peak"] <= metrics["state_bytes_start"] + alpha_moments
    assert metrics["state_bytes_start"] > metrics["state_bytes_end"]
    assert metrics["state_bytes_end"] < metrics["state_bytes_mean"] < metrics["state_bytes_peak"]
    peak, mean, end = (metrics[f"trainable_parameters{k}"] for k in ("_peak", "_mean", ""))
    assert peak >= mean > end


def test_svd_methods_count_their_importance_scores_while_they_hold_them():
    result = run("adalora-physical", target_rank=2)
    model, controller, optimizer_free = result.model, result.controller, torch.optim.SGD([torch.zeros(1)])
    # After the run the scores are freed: the end state is the parameters and AdamW's two moments, no more.
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert controller.held_bytes() == 0
    assert training_state_bytes(model, optimizer_free, controller) == params
    # While training, two EMAs per scored element were held on top of parameters and moments (4 copies).
    assert result.metrics["state_bytes_start"] > 3 * result.metrics["trainable_parameters_start"] * 4


def test_stock_adalora_counts_its_allocator_scores():
    result = run("adalora")
    trainable = result.metrics["trainable_parameters_start"] * 4
    assert result.metrics["state_bytes_start"] > 3 * trainable  # parameters, two moments, and the allocator's EMAs


def test_budgeted_ard_reports_how_many_ranks_its_alphas_and_its_budget_cut():
    result = run("ard", head_layout="shared", target_params=500)
    controller = result.controller
    resizes = [r for r in controller.records if r.resized]
    assert resizes and controller.cuts["alpha"] + controller.cuts["budget"] > 0
    assert controller.cuts == {
        "alpha": sum(r.cut_by_alpha for r in controller.records),
        "budget": sum(r.cut_by_budget for r in controller.records),
        "held": sum(r.held_by_budget for r in controller.records),
    }
    start = controller.history[0]["total_rank"]
    assert start - controller.total_rank() == controller.cuts["alpha"] + controller.cuts["budget"]


def test_a_controller_counts_its_own_parameters_and_forgets_them_when_it_folds_them():
    """The sizes are cached per layout; E (SVD methods) and the alphas (ARD) are counted while they exist."""
    result = run("elalora", granularity="matrix")
    controller, model = result.controller, result.model
    assert controller.finalized
    assert controller.trainable_parameters() == sum(p.numel() for p in model.parameters() if p.requires_grad)
    ard = run("ard")
    assert ard.controller.trainable_parameters() == sum(p.numel() for p in ard.model.parameters() if p.requires_grad)
    assert any("dynarank_ard" in n for n, p in ard.model.named_parameters() if p.requires_grad)
