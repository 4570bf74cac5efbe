"""lr='auto': the range test's candidates, its held-out split, its choice, what the run records, and its resume;
and the loop's gradient clipping (max_grad_norm)."""

from __future__ import annotations

import math

import pytest
import torch

from dynarank.config import ConfigError
from dynarank.defaults import default_lr
from dynarank.training import loop
from dynarank.training.loop import NonFiniteError, TrainSpec, train_classifier
from dynarank.training.lr_search import candidates_around, probe_steps, rung, search_rate, split_held_out
from tiny_models import WordTokenizer, examples, tiny_bert


def spec(method: str = "ard", lr="auto", steps: int = 24, **changed) -> TrainSpec:
    return TrainSpec(
        method=method, r=4, target_modules=["query", "value"], lr=lr, max_steps=steps, batch_size=8, **changed
    )


# ------------------------------------------------------------------------------------------- the candidates
def test_the_ladder_runs_in_half_decades_of_one_and_three():
    assert [rung(k) for k in range(-6, -1)] == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


@pytest.mark.parametrize(
    "centre, expected",
    [(3e-3, [1e-3, 3e-3, 1e-2]), (1e-2, [3e-3, 1e-2, 3e-2]), (3e-2, [1e-2, 3e-2, 1e-1]), (3e-4, [1e-4, 3e-4, 1e-3])],
)
def test_the_candidates_are_the_default_and_its_two_neighbours(centre, expected):
    assert candidates_around(centre) == pytest.approx(expected)


def test_a_default_off_the_ladder_is_searched_around_its_nearest_rung():
    assert candidates_around(2.5e-3) == pytest.approx([1e-3, 3e-3, 1e-2])
    assert candidates_around(1.2e-2) == pytest.approx([3e-3, 1e-2, 3e-2])


def test_a_probe_is_a_quarter_of_the_run_at_least_twenty_steps_and_never_longer_than_the_run():
    assert probe_steps(400) == 100
    assert probe_steps(40) == 20
    assert probe_steps(12) == 12


def test_the_held_out_examples_are_a_tenth_drawn_with_the_seed_and_never_probed_on():
    fit, held = split_held_out(1000, seed=0, batch_size=16)
    assert len(held) == 100 and len(fit) == 900 and not set(fit) & set(held)
    assert split_held_out(1000, seed=0, batch_size=16) == (fit, held)
    assert split_held_out(1000, seed=1, batch_size=16)[1] != held
    assert len(split_held_out(100, 0, 8)[1]) == 32  # at least 32
    assert len(split_held_out(20_000, 0, 8)[1]) == 512  # at most 512


def test_too_few_examples_to_hold_some_out_is_refused_naming_lr():
    with pytest.raises(ConfigError, match="lr.*'auto' holds out 32 of the 50"):
        split_held_out(50, 0, 8)


# ------------------------------------------------------------------------------------------- the choice
class FakeProbes:
    """A stand-in for the training loop: each probe's model scores the loss the test gives its rate."""

    def __init__(self, loss_of_rate: dict[float, float]) -> None:
        self.loss_of_rate, self.seen = loss_of_rate, []

    def __call__(self, model, probe_set, probe_spec, stop_after):
        self.seen.append((probe_spec.lr, probe_spec.max_steps, stop_after, len(probe_set["input_ids"])))
        loss = self.loss_of_rate[probe_spec.lr]
        if loss is None:
            raise NonFiniteError("diverged")
        model.fixed_loss = loss
        return model


class Scored(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.fixed_loss = 0.0

    def forward(self, input_ids, attention_mask, labels):
        return type("Out", (), {"loss": torch.tensor(self.fixed_loss)})()


def encoded(n: int = 100) -> dict:
    return {"input_ids": [[1, 2, 3]] * n, "labels": [i % 2 for i in range(n)]}


def test_the_rate_whose_probe_scores_the_lowest_held_out_loss_is_chosen():
    probes = FakeProbes({1e-3: 0.9, 3e-3: 0.7, 1e-2: 0.5})
    found = search_rate(Scored(), encoded(), 0, spec(), probes, total_steps=200)
    assert found.chosen == 1e-2 and found.candidates == pytest.approx([1e-3, 3e-3, 1e-2])
    assert found.held_out_loss == pytest.approx([0.9, 0.7, 0.5])
    assert found.centre == default_lr("ard", "classify")
    # the run's 200-step schedule stopped after a quarter of it, on the 100 - 32 examples not held out
    assert [s[1:] for s in probes.seen] == [(200, 50, 68)] * 3


def test_a_probe_that_diverges_scores_infinity_and_is_not_chosen():
    found = search_rate(Scored(), encoded(), 0, spec(), FakeProbes({1e-3: 0.9, 3e-3: 0.7, 1e-2: None}), 80)
    assert found.chosen == 3e-3 and math.isinf(found.held_out_loss[2])


def test_a_tie_goes_to_the_lower_rate():
    found = search_rate(Scored(), encoded(), 0, spec(), FakeProbes({1e-3: 0.9, 3e-3: 0.5, 1e-2: 0.5}), 80)
    assert found.chosen == 3e-3


def test_when_every_probe_diverges_the_search_stops_and_says_to_give_a_rate():
    with pytest.raises(NonFiniteError, match="every candidate rate .* diverged"):
        search_rate(Scored(), encoded(), 0, spec(), FakeProbes({1e-3: None, 3e-3: None, 1e-2: None}), 80)


def test_the_causal_lm_search_is_centred_on_the_causal_lm_default():
    probes = FakeProbes({3e-3: 0.9, 1e-2: 0.8, 3e-2: 0.85})
    found = search_rate(Scored(), encoded(), 0, spec(task="causal-lm"), probes, 80)
    assert found.centre == default_lr("ard", "causal-lm") == 1e-2 and found.chosen == 1e-2


def test_the_search_is_centred_on_the_default_at_the_run_s_budget():
    from dynarank.defaults import BUDGET_LR

    probes = FakeProbes({3e-3: 0.9, 1e-2: 0.8, 3e-2: 0.85})
    found = search_rate(Scored(), encoded(), 0, spec(budget_r=1.0), probes, 80)
    assert found.centre == default_lr("ard", "classify", 1.0) == BUDGET_LR["classify"]["ard"][1]
    assert found.centre != default_lr("ard", "classify")  # the middle budget's: so the budget moved the centre
    assert found.candidates == pytest.approx([3e-3, 1e-2, 3e-2])


# ------------------------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def auto_run():
    return train_classifier(tiny_bert(), WordTokenizer(), examples(96), spec())


def test_an_auto_run_records_the_search_and_trains_at_its_choice(auto_run):
    metrics = auto_run.metrics
    search = metrics["lr_search"]
    assert metrics["lr"] == search["chosen"] in search["candidates"]
    assert metrics["lr_source"].startswith("auto: lowest held-out loss of a 20-step probe")
    assert search["held_out_examples"] == 32 and search["probe_examples"] == 64 and search["probe_steps"] == 20
    assert all(math.isfinite(v) for v in search["held_out_loss"])
    assert search["chosen"] == search["candidates"][min(range(3), key=lambda i: search["held_out_loss"][i])]


def test_an_auto_run_equals_a_run_given_the_chosen_rate(auto_run):
    """The search leaves no trace on the run: same start, same data order, same result as giving the rate."""
    given = train_classifier(tiny_bert(), WordTokenizer(), examples(96), spec(lr=auto_run.metrics["lr"]))
    for (name, a), b in zip(auto_run.model.named_parameters(), given.model.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("changed", [{}, {"values_lr_ratio": 30.0}], ids=["default", "values-30x"])
def test_a_causal_lm_auto_run_of_elalora_equals_a_run_given_the_chosen_rate(changed):
    """The causal-LM loop with ElaLoRA's defaults there (the LoRA start), and with E in an optimizer group of its
    own at a multiple of the rate."""
    import fsdp_worker
    from dynarank.training.loop import train_causal_lm
    from tiny_models import tiny_llama

    def run(lr):
        knobs = {"t_init_steps": 6, "t_final_steps": 4, "resize_every": 1, **changed}
        spec = TrainSpec(
            method="elalora", r=2, target_modules="all-linear", lr=lr, max_steps=24, batch_size=4, dynarank=knobs
        )
        return train_causal_lm(tiny_llama(), fsdp_worker.Tokenizer(), fsdp_worker.pairs(120), spec)

    auto = run("auto")
    given = run(auto.metrics["lr"])
    for (name, a), b in zip(auto.model.named_parameters(), given.model.parameters()):
        assert torch.equal(a, b), name


def test_the_same_seed_searches_to_the_same_losses_bitwise(auto_run):
    again = train_classifier(tiny_bert(), WordTokenizer(), examples(96), spec())
    assert again.metrics["lr_search"]["held_out_loss"] == auto_run.metrics["lr_search"]["held_out_loss"]


def test_a_resumed_auto_run_reads_its_rate_from_the_checkpoint_without_searching(tmp_path, monkeypatch, auto_run):
    class Stop(Exception):
        pass

    def stop_at_10(record):
        if record["step"] == 10:
            raise Stop

    with pytest.raises(Stop):
        train_classifier(
            tiny_bert(), WordTokenizer(), examples(96), spec(), run_dir=tmp_path, save_every=5, on_step=stop_at_10
        )
    monkeypatch.setattr(loop, "search_rate", lambda *a, **k: pytest.fail("searched again"))
    resumed = train_classifier(tiny_bert(), WordTokenizer(), examples(96), spec(), run_dir=tmp_path, resume=True)
    timeless = lambda search: {k: v for k, v in search.items() if k != "seconds"}  # noqa: E731
    assert timeless(resumed.metrics["lr_search"]) == timeless(auto_run.metrics["lr_search"])
    for a, b in zip(resumed.model.parameters(), auto_run.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", ["fast", "", True])
def test_a_rate_that_is_neither_a_number_nor_auto_is_refused(bad):
    with pytest.raises(ValueError, match="lr must be a positive number, 'auto' or None"):
        spec(lr=bad)


# ------------------------------------------------------------------------------------------- clipping
def test_clipping_bounds_the_gradient_norm_the_optimizer_sees(monkeypatch):
    norms = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    train_classifier(tiny_bert(), WordTokenizer(), examples(), spec("lora", lr=1e-2, steps=6, max_grad_norm=1e-3))
    clipped = norms[:]
    norms.clear()
    train_classifier(tiny_bert(), WordTokenizer(), examples(), spec("lora", lr=1e-2, steps=6))
    assert max(clipped) <= 1e-3 * (1 + 1e-5) < min(norms)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_a_clip_norm_that_is_not_positive_is_refused(bad):
    with pytest.raises(ValueError, match="max_grad_norm must be a positive number"):
        spec("lora", lr=1e-2, max_grad_norm=bad)


def test_a_setting_the_run_cannot_take_is_refused_as_itself_before_any_probe_trains():
    """The probes run the run's own schedule: its errors are the run's, named as without 'auto'."""
    with pytest.raises(ConfigError, match=r"^resize_every: 100 is not shorter than ElaLoRA's budgeting phase"):
        train_classifier(
            tiny_bert(), WordTokenizer(), examples(96), spec("elalora", steps=40, dynarank={"resize_every": 100})
        )
