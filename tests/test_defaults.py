"""The defaults a user gets without setting anything: one table per kind of task (classifiers, causal LMs), read
by the library, the loop, the CLI and the benchmarks; a model trains with its kind's rates; every run says which
rate it used and where it came from; a run too short for a method's schedule is said so, with its numbers, before
training."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dynarank
from dynarank import DynaRankConfig, attach
from dynarank.cli import main
from dynarank.config import ORTHO_WEIGHT, ConfigError
from dynarank.defaults import (
    BUDGET_LR,
    DEFAULT_ALPHA_AT,
    DEFAULT_LR,
    DEFAULT_ORTHO_WEIGHT,
    DEFAULT_SVD_INIT,
    DEFAULT_VALUES_LR_RATIO,
    MIDDLE_BUDGET,
    SOURCE,
    TASKS,
    default_lr,
    default_ortho_weight,
    default_values_lr_ratio,
    source,
    task_of,
)
from dynarank.training.loop import TrainSpec
from dynarank.training.methods import ALL_METHODS, DYNARANK_METHODS
from test_cli import train_args, write_csv
from tiny_models import tiny_bert, tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_the_table_is_the_one_the_defaults_study_chose():
    record = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/defaults.json").read_text())
    assert DEFAULT_LR == record["shipped"]
    assert MIDDLE_BUDGET == record["middle_budget"]
    by_budget = record["shipped_by_budget"]  # JSON keys: the budgets as strings
    assert BUDGET_LR == {
        k: {m: {int(b): lr for b, lr in rates.items()} for m, rates in t.items()} for k, t in by_budget.items()
    }


def test_ard_with_a_budget_starts_as_the_configuration_the_study_chose_for_each_kind():
    import quality

    record = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/defaults.json").read_text())
    config = DynaRankConfig(method="ard", target_params=10_000)
    data_start = quality.ABLATIONS["ard-data-scaled"][1]  # the data start's settings, as the benchmarks run it
    assert all(getattr(config, k) == v for k, v in data_start.items() if k != "rank_init")
    for kind, (variant, _rate) in record["choices"]["ard"]["shipped"].items():
        assert variant in ("ard", "ard-data-scaled"), kind  # quality.py's uniform start, or the data start
        assert config.data_start is (variant == "ard-data-scaled"), kind


@pytest.mark.parametrize("variant", ["ard", "ard-data-scaled"])
def test_ard_left_unset_has_the_head_layout_and_granularity_every_ard_record_of_the_study_ran(variant):
    """A user's `--method ard` gets the layout the study measured on real models (the heads of a projection sharing
    A's rows), not the field's default for the other methods (each head its own A rows)."""
    import quality

    spec = quality.train_spec(variant, 2, 82_944, 3e-3, 0, 126, quality.TASKS["minilm"], "query")
    default = DynaRankConfig(method="ard")
    assert (default.head_layout, default.granularity) == (spec.dynarank["head_layout"], "head") == ("shared", "head")
    assert DynaRankConfig(method="dynarank-lora").head_layout == "own"  # the other methods' default is unchanged


def test_the_svd_methods_orthogonality_weight_and_values_rate_are_the_configuration_the_study_chose_for_each_kind():
    import defaults as study
    import quality

    record = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/defaults.json").read_text())
    for method in ("elalora", "adalora-physical"):
        for kind, (variant, _rate) in record["choices"][method]["shipped"].items():
            assert variant in study.CONFIGURATIONS[method], kind
            # quality.py's method pins the papers' weight and E at the adapters' rate; its ablations change them
            pinned = {"ortho_weight": ORTHO_WEIGHT, "values_lr_ratio": 1.0, "svd_init": "adalora"}
            if method == "adalora-physical":
                pinned["alpha_at"] = "target"
            settings = {**pinned, **(quality.ABLATIONS[variant][1] if variant in quality.ABLATIONS else {})}
            assert quality.ABLATIONS.get(variant, (method,))[0] == method, (variant, kind)
            spec = quality.train_spec(variant, 2, 10_000, 1e-2, 0, 100, quality.TASKS["minilm"], "query")
            assert {k: spec.dynarank[k] for k in settings} == settings, variant  # what quality.py runs
            assert DEFAULT_ORTHO_WEIGHT[kind][method] == settings["ortho_weight"], (method, kind)
            assert DEFAULT_VALUES_LR_RATIO[kind][method] == settings["values_lr_ratio"], (method, kind)
            assert DEFAULT_SVD_INIT[kind][method] == settings["svd_init"], (method, kind)
            if method == "adalora-physical":
                assert DEFAULT_ALPHA_AT[kind][method] == settings["alpha_at"], (method, kind)


@pytest.mark.parametrize("method", ["elalora", "adalora-physical"])
@pytest.mark.parametrize(
    "build,kind,targets", [(tiny_bert, "classify", ["query", "value"]), (tiny_llama, "causal-lm", ["q_proj", "v_proj"])]
)
def test_an_svd_method_trains_with_its_kind_s_penalty_and_values_rate_unless_the_config_gives_them(
    method, build, kind, targets
):
    model = attach(build(), DynaRankConfig(method=method, r=2, seed=0, target_modules=targets))
    controller = dynarank.build_controller(model, total_steps=40)
    ratio = default_values_lr_ratio(method, kind)
    assert controller.ortho_weight == default_ortho_weight(method, kind) and controller.values_lr_ratio == ratio
    resolved = controller.settings_used()
    for name, value in (("ortho_weight", controller.ortho_weight), ("values_lr_ratio", ratio)):
        assert resolved[name] == value and resolved[f"{name}_source"] == f"{SOURCE}, {kind}"
        assert resolved["config"][name] is None  # what was asked: the default
    # E trains at the ratio times the adapters' rate: in a group of its own only at another rate
    e = model.dynarank_svd.values
    held = [g for g in controller.build_optimizer(lr=1e-3).param_groups if any(p is e for p in g["params"])]
    assert len(held) == 1 and held[0]["lr"] == pytest.approx(1e-3 * ratio)
    assert (len(held[0]["params"]) == 1) == (ratio != 1.0)

    config = DynaRankConfig(method=method, r=2, seed=0, target_modules=targets, ortho_weight=0.25, values_lr_ratio=30)
    given = attach(build(), config)
    controller = dynarank.build_controller(given, total_steps=40)
    resolved = controller.settings_used()
    assert controller.ortho_weight == 0.25 and resolved["ortho_weight_source"] == "config"
    assert resolved["values_lr_ratio_source"] == "config"
    groups = controller.param_groups(1e-3)
    e = given.dynarank_svd.values
    assert [(g["name"], g["lr"]) for g in groups] == [("adapter", 1e-3), ("E", pytest.approx(3e-2))]
    assert (
        len(groups[1]["params"]) == 1 and groups[1]["params"][0] is e and not any(p is e for p in groups[0]["params"])
    )


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True, "10"])
def test_a_ratio_of_the_singular_values_rate_that_is_not_a_finite_positive_number_is_refused(bad):
    with pytest.raises(ConfigError, match="values_lr_ratio"):
        DynaRankConfig(method="elalora", r=2, values_lr_ratio=bad)


def _validation_runs(tmp_path, val: dict):
    """A record store of runs at 1e-3 and budget 2: {(task, variant): [validation accuracy of seed 0, 1, ...]}."""
    import quality

    from records import RecordStore

    store = RecordStore(tmp_path / "runs.json", quality.record_key)
    for (task, variant), accs in val.items():
        for seed, acc in enumerate(accs):
            run = {"task": task, "method": variant, "budget_r": 2, "lr": 1e-3, "seed": seed, "steps": 10}
            store.add({**run, "val": {"acc": acc}})
    return store


def test_the_shipped_checks_take_each_method_s_choice_for_the_task_s_kind_and_the_left_out_checks_its_own(
    tmp_path, monkeypatch
):
    import defaults as study
    import quality

    spec = {"kind": "classify", "higher_is_better": True, "tune_budget": 2, "steps": 10, "metric": "acc"}
    monkeypatch.setattr(quality, "TASKS", {"a": spec, "lm": {**spec, "kind": "causal-lm", "tune_budget": 4}})
    monkeypatch.setattr(study, "CHOSEN", ["m"])
    monkeypatch.setattr(study, "BASELINES", [])
    choices = {"m": {"shipped": {"classify": ("m-x", 3e-2), "causal-lm": ("m", 1e-2)}, "left_out": {"a": ("m", 1e-3)}}}
    stores = {"a": None, "lm": None}
    shipped = study.shipped_jobs(choices, stores)
    assert shipped == {"a": [("m-x", 2, 3e-2, s) for s in study.SEEDS], "lm": [("m", 4, 1e-2, s) for s in study.SEEDS]}
    assert study.validation_jobs(choices, stores) == {"a": [("m", 2, 1e-3, s) for s in study.SEEDS], "lm": []}


def test_a_configuration_is_chosen_on_validation_over_seeds_not_on_one_seed_s_grid(tmp_path, monkeypatch):
    import defaults as study
    import quality

    monkeypatch.setattr(
        quality,
        "TASKS",
        {
            t: {"kind": "classify", "higher_is_better": True, "tune_budget": 2, "steps": 10, "metric": "acc"}
            for t in "ab"
        },
    )
    # seed 0 rates "u" a hair above "d" on both tasks; over seeds 0-2 "d" is ahead on a; b ran one seed of "d"
    val = {("a", "u"): [0.80, 0.70, 0.70], ("a", "d"): [0.79, 0.80, 0.80], ("b", "u"): [0.90], ("b", "d"): [0.89]}
    store = _validation_runs(tmp_path, val)
    monkeypatch.setattr(study, "CONFIGURATIONS", {"m": ["u", "d"]})
    scores = {t: study.relative({(v, 1e-3): val[t, v][0] for v in "ud"}, True) for t in "ab"}
    stores = {"a": store, "b": store}
    chosen, vote = study.choose_configuration(scores, stores, ["u", "d"], ["a", "b"])
    assert chosen == "d" and set(vote["votes"]) == {"u", "d"}  # b (one seed) does not vote
    assert study.choose_configuration(scores, stores, ["u", "d"], ["b"]) == ("u", {})  # nobody votes: the first
    assert study.choose(scores, ["a", "b"])[0] == ("u", 1e-3)  # what seed 0 alone would have shipped


def test_a_configuration_run_at_one_seed_neither_wins_nor_silences_the_votes_of_those_run_in_full(
    tmp_path, monkeypatch
):
    import defaults as study
    import quality

    spec = {"kind": "classify", "higher_is_better": True, "tune_budget": 2, "steps": 10, "metric": "acc"}
    monkeypatch.setattr(quality, "TASKS", {t: spec for t in "ab"})
    # "u" and "d" ran seeds 0-2 on both tasks ("d" ahead over the seeds); "new" ran seed 0 alone, best of all there
    val = {"u": [0.80, 0.70, 0.70], "d": [0.79, 0.80, 0.80], "new": [0.95]}
    store = _validation_runs(tmp_path, {(task, v): accs for task in "ab" for v, accs in val.items()})
    scores = {t: study.relative({(v, 1e-3): accs[0] for v, accs in val.items()}, True) for t in "ab"}
    stores = {"a": store, "b": store}
    chosen, vote = study.choose_configuration(scores, stores, ["u", "d", "new"], ["a", "b"])
    assert chosen == "d" and set(vote["votes"]) == {"u", "d"}
    assert study.choose_configuration(scores, stores, ["u", "new"], ["a", "b"]) == ("u", {})  # the only one in full


def test_a_configuration_with_the_penalty_wins_only_by_more_than_its_vote_s_standard_error(tmp_path, monkeypatch):
    import defaults as study
    import quality

    spec = {"kind": "classify", "higher_is_better": True, "tune_budget": 2, "steps": 10, "metric": "acc"}
    monkeypatch.setattr(quality, "TASKS", {t: spec for t in "ab"})
    monkeypatch.setattr(study, "penalised", lambda c: c.startswith("p"))  # "p...": the penalty's step cost
    # "p" ahead of "f" by 0.005 on average, seeds scattered by 0.03: level; "p-far" ahead by 0.05 on every seed
    val = {"p": [0.80, 0.86, 0.83], "f": [0.83, 0.80, 0.845], "p-far": [0.88, 0.85, 0.90]}
    store = _validation_runs(tmp_path, {(task, v): accs for task in "ab" for v, accs in val.items()})
    scores = {t: study.relative({(v, 1e-3): accs[0] for v, accs in val.items()}, True) for t in "ab"}
    stores = {"a": store, "b": store}
    chosen, vote = study.choose_configuration(scores, stores, ["p", "f"], ["a", "b"])
    gap = vote["votes"]["p"] - vote["votes"]["f"]
    assert 0 < gap <= vote["standard_error"]["f"] and chosen == vote["chosen"] == "f"
    chosen, vote = study.choose_configuration(scores, stores, ["p-far", "f"], ["a", "b"])
    assert vote["votes"]["p-far"] - vote["votes"]["f"] > vote["standard_error"]["f"] and chosen == "p-far"
    # without a cost to weigh, the better vote wins however small its lead
    monkeypatch.setattr(study, "penalised", lambda c: False)
    assert study.choose_configuration(scores, stores, ["p", "f"], ["a", "b"])[0] == "p"


def test_the_penalised_configurations_are_those_that_train_with_the_orthogonality_penalty():
    import defaults as study

    assert [c for c in study.CONFIGURATIONS["elalora"] if study.penalised(c)] == ["elalora", "elalora-e30"]
    assert [c for c in study.CONFIGURATIONS["adalora-physical"] if study.penalised(c)] == [
        "adalora-physical",
        "adalora-physical-e30",
    ]
    assert not any(study.penalised(c) for c in study.CONFIGURATIONS["ard"])


def test_a_rate_that_failed_at_another_budget_does_not_ship_however_it_scores_at_the_middle(tmp_path, monkeypatch):
    import defaults as study
    import quality

    from records import RecordStore

    spec = {"kind": "classify", "higher_is_better": True, "tune_budget": 2, "steps": 10, "metric": "acc"}
    monkeypatch.setattr(quality, "TASKS", {"a": spec})
    store = RecordStore(tmp_path / "runs.json", quality.record_key)
    runs = [  # (method, budget, rate, validation accuracy): 1e-2 is best at the middle budget and diverges at r=6
        ("lora", 2, 1e-2, 0.86),
        ("lora", 2, 3e-3, 0.85),
        ("lora", 6, 1e-2, 0.50),
        ("lora", 6, 3e-3, 0.87),
        ("adalora", 6, 3e-2, 0.62),  # 0.71 of the best at r=6: poor, not failed
    ]
    for method, budget, lr, acc in runs:
        store.add(
            {"task": "a", "method": method, "budget_r": budget, "lr": lr, "seed": 0, "steps": 10, "val": {"acc": acc}}
        )
    assert study.failed({"a": store}, ["a"]) == {("lora", 1e-2): ["a r=6 seed 0"]}
    found = study.study({"a": store})["lora"]
    assert found["scores"]["a"][("lora", 1e-2)] == 1.0  # the middle budget's best...
    assert found["shipped"] == {"classify": ("lora", 3e-3)}  # ...does not ship


def test_a_run_fails_against_the_best_of_its_own_seed_when_other_methods_ran_it(tmp_path, monkeypatch):
    """Every comparison of the study is paired by seed, and so is a failure: a seed hard for every method fails no
    run by being hard. A seed only one method ran is measured against the best of any seed."""
    import defaults as study
    import quality

    from records import RecordStore

    spec = {"kind": "causal-lm", "higher_is_better": False, "tune_budget": 4, "steps": 10, "metric": "loss"}
    monkeypatch.setattr(quality, "TASKS", {"a": spec})
    store = RecordStore(tmp_path / "runs.json", quality.record_key)
    runs = [  # (method, rate, seed, validation loss)
        ("lora", 1e-2, 0, 0.44),
        ("ard", 1e-2, 0, 0.45),
        ("lora", 1e-2, 1, 0.51),  # seed 1 is hard for every method
        ("ard", 1e-2, 1, 0.52),
        ("elalora", 1e-2, 1, 0.66),  # 0.67 of the best seed's loss, 0.77 of its own seed's: poor, not failed
        ("elalora", 3e-2, 1, 0.80),  # 0.64 of its own seed's best: failed
        ("dora", 1e-2, 2, 0.60),  # seed 2 ran by one method alone: 0.73 of the best of any seed
        ("dora", 3e-2, 2, 0.70),  # 0.63 of it: failed
    ]
    for method, lr, seed, loss in runs:
        store.add(
            {"task": "a", "method": method, "budget_r": 4, "lr": lr, "seed": seed, "steps": 10, "val": {"loss": loss}}
        )
    assert study.failed({"a": store}, ["a"]) == {("elalora", 3e-2): ["a r=4 seed 1"], ("dora", 3e-2): ["a r=4 seed 2"]}


def test_the_study_ships_the_rate_best_on_average_over_every_task():
    import defaults as study

    scores = {"a": {("m", 1e-3): 0.9, ("m", 1e-2): 1.0}, "b": {("m", 1e-3): 1.0, ("m", 1e-2): 0.5}}
    assert study.choose(scores, ["a", "b"])[0] == ("m", 1e-3)  # 0.95 on average against 0.75
    assert study.choose(scores, ["a"])[0] == ("m", 1e-2)  # b left out
    tied = {"a": {("m", 1e-3): 0.9, ("m", 1e-2): 1.0}, "b": {("m", 1e-3): 1.0, ("m", 1e-2): 0.9}}
    assert study.choose(tied, ["a", "b"])[0] == ("m", 1e-3)  # a tie goes to the lower rate


def test_the_study_chooses_each_kind_s_rate_on_that_kind_s_tasks_and_leaves_out_within_the_kind(monkeypatch):
    import defaults as study
    import quality

    kinds = {"c1": "classify", "c2": "classify", "lm": "causal-lm"}
    monkeypatch.setattr(quality, "TASKS", {t: {"kind": k, "higher_is_better": True} for t, k in kinds.items()})
    grids = {  # validation accuracy per rate of method m on each task
        "c1": {1e-3: 0.90, 1e-2: 0.80},
        "c2": {1e-3: 0.85, 1e-2: 0.70},
        "lm": {1e-3: 0.50, 1e-2: 0.90},
    }
    grid_of = lambda store, task, method: {(method, lr): v for lr, v in grids[task].items()}  # noqa: E731
    monkeypatch.setattr(study, "candidates", grid_of)
    found = study.study({t: None for t in kinds})["lora"]
    assert found["shipped"] == {"classify": ("lora", 1e-3), "causal-lm": ("lora", 1e-2)}
    assert found["left_out"] == {"c1": ("lora", 1e-3), "c2": ("lora", 1e-3), "lm": ("lora", 1e-3)}
    assert found["left_out_same_kind"] == {"c1": True, "c2": True, "lm": False}  # lm alone: chosen on the others


def test_every_run_method_has_a_default_rate_for_every_task_and_only_those_do():
    assert set(DEFAULT_LR) == set(TASKS)
    assert all(set(table) == set(ALL_METHODS) for table in DEFAULT_LR.values())


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_spec_without_a_rate_takes_its_task_s_table_and_says_so(method, task):
    spec = TrainSpec(method=method, r=2, task=task)
    assert (spec.lr, spec.lr_source) == (default_lr(method, task), source(task))
    given = TrainSpec(method=method, r=2, lr=0.123, task=task)
    assert (given.lr, given.lr_source) == (0.123, "given")


def test_a_spec_follows_the_kind_of_model_it_trains_unless_its_rate_was_given():
    spec = TrainSpec(method="ard", r=2)  # a classifier's default ...
    lm = spec.for_task("causal-lm")  # ... handed a causal LM (what train() does with the model it is given)
    assert (lm.lr, lm.lr_source) == (default_lr("ard", "causal-lm"), source("causal-lm"))
    assert default_lr("ard", "causal-lm") != default_lr("ard", "classify")  # so the switch matters
    given = TrainSpec(method="ard", r=2, lr=0.5).for_task("causal-lm")
    assert (given.lr, given.lr_source) == (0.5, "given")


def test_a_model_s_kind_is_whether_it_generates_text_bare_or_inside_peft():
    from peft import LoraConfig, get_peft_model

    assert task_of(tiny_bert()) == "classify"
    assert task_of(tiny_llama()) == "causal-lm"
    assert task_of(get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))) == "causal-lm"
    assert task_of(torch.nn.Linear(2, 2)) == "classify"  # anything else: the classifiers' table


@pytest.mark.parametrize("method", ["dynarank-lora", "ard", "elalora", "adalora-physical"])
@pytest.mark.parametrize("task", TASKS)
def test_the_library_s_optimizer_takes_the_rate_of_the_model_s_kind(method, task):
    base, target = (tiny_bert(), "query") if task == "classify" else (tiny_llama(), "q_proj")
    model = attach(base, DynaRankConfig(method=method, r=2, target_modules=[target]))
    controller = dynarank.build_controller(model, total_steps=100)
    rates = {g.get("name"): g["lr"] for g in controller.build_optimizer().param_groups}
    assert rates.pop("adapter") == default_lr(method, task)
    if method in ("elalora", "adalora-physical") and default_values_lr_ratio(method, task) != 1.0:
        assert rates.pop("E") == pytest.approx(default_lr(method, task) * default_values_lr_ratio(method, task))
    assert all(rate == default_lr(method, task) for rate in rates.values())  # any other group (ARD's alphas: none)


def test_the_benchmarks_take_the_table_s_rate_when_they_run_a_method_on_its_defaults():
    import quality

    spec = quality.train_spec("elalora", 2, 80_000, None, 0, 100, quality.TASKS["minilm"], "query")
    assert spec.lr == default_lr("elalora") and spec.lr_source == source("classify")


def test_a_cli_run_records_the_rate_it_used_and_where_it_came_from(tmp_path):
    from tiny_models import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "model")
    data = write_csv(tmp_path / "data.csv")
    assert main(train_args(model_dir, data, tmp_path / "default", "--method", "lora")) == 0
    record = yaml.safe_load((tmp_path / "default" / "config.yaml").read_text())
    assert (record["lr"], record["lr_source"]) == (default_lr("lora"), source("classify"))
    assert json.loads((tmp_path / "default" / "summary.json").read_text())["lr"] == default_lr("lora")
    assert main(train_args(model_dir, data, tmp_path / "given", "--method", "lora", "--lr", "0.05")) == 0
    record = yaml.safe_load((tmp_path / "given" / "config.yaml").read_text())
    assert (record["lr"], record["lr_source"]) == (0.05, "given")


def test_a_run_too_short_for_ards_schedule_is_warned_with_its_numbers_before_training(caplog):
    model = attach(tiny_bert(), DynaRankConfig(method="ard", r=2, target_modules=["query"]))
    with caplog.at_level(logging.WARNING):
        controller = dynarank.build_controller(model, total_steps=20)
    assert controller.step == 0 and controller.setup_warnings
    assert "active phase is 13 optimizer steps (warm-up 4, final phase 3 of 20)" in caplog.text
    quiet = attach(tiny_bert(), DynaRankConfig(method="ard", r=2, target_modules=["query"]))
    assert not dynarank.build_controller(quiet, total_steps=200).setup_warnings


@pytest.mark.parametrize("method", ["elalora", "adalora-physical"])
def test_a_run_with_too_few_reallocation_rounds_is_warned_with_its_numbers(method, caplog):
    model = attach(tiny_bert(), DynaRankConfig(method=method, r=4, target_modules=["query"], resize_every=60))
    with caplog.at_level(logging.WARNING):
        controller = dynarank.build_controller(model, total_steps=100)
    assert controller.setup_warnings and "reallocation round(s) in this run" in caplog.text
    assert "one every 60" in caplog.text


def test_a_causal_lm_cli_run_trains_and_records_the_causal_lm_default(tmp_path):
    from test_cli_causal_lm import train_args as causal_args
    from test_cli_causal_lm import write_pairs
    from tiny_models import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "llama", kind="llama")
    pairs = write_pairs(tmp_path / "pairs.csv", n=16)
    run = tmp_path / "run"
    options = ["--method", "ard", "--max-steps", "6", "--batch-size", "4", "--r0", "2", "--max-length", "24"]
    assert main(causal_args(model_dir, pairs, run, *options)) == 0
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert (record["lr"], record["lr_source"]) == (default_lr("ard", "causal-lm"), source("causal-lm"))
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["lr"], summary["lr_source"]) == (default_lr("ard", "causal-lm"), source("causal-lm"))


def test_lr_auto_is_compared_with_the_shipped_default_and_the_tuned_baselines_paired_by_seed(tmp_path, monkeypatch):
    import defaults as study
    import quality

    from records import RecordStore

    spec = {"kind": "classify", "higher_is_better": True, "tune_budget": 2, "steps": 10, "metric": "acc"}
    monkeypatch.setattr(quality, "TASKS", {"a": spec})
    monkeypatch.setattr(study, "CHOSEN", ["m"])
    monkeypatch.setattr(study, "BASELINES", ["lora"])
    monkeypatch.setattr(study, "baseline_rate", lambda store, task, method: 1e-2)
    store = RecordStore(tmp_path / "runs.json", quality.record_key)
    runs = [  # (method, rate, seed, test accuracy, lr used, seconds)
        ("m+auto", 3e-3, 0, 0.82, 1e-2, 30.0),
        ("m+auto", 3e-3, 1, 0.84, 3e-3, 40.0),
        ("m", 3e-3, 0, 0.80, 3e-3, 20.0),
        ("m", 3e-3, 1, 0.84, 3e-3, 15.0),
        ("m", 3e-3, 2, 0.10, 3e-3, 15.0),  # no auto run of seed 2: not paired
        ("lora", 1e-2, 0, 0.83, 1e-2, 10.0),
        ("lora", 1e-2, 1, 0.81, 1e-2, 10.0),
    ]
    for method, lr, seed, acc, used, seconds in runs:
        store.add(
            {
                "task": "a",
                "method": method,
                "budget_r": 2,
                "lr": lr,
                "seed": seed,
                "steps": 10,
                "test": {"acc": acc},
                "lr_used": used,
                "seconds": seconds,
                "adapter_parameters": 100,
                "lr_search": {"seconds": 12.0} if method.endswith("+auto") else None,
            }
        )
    choices = {"m": {"shipped": {"classify": ("m", 3e-3)}}}
    default, lora = study.auto_comparisons(choices, {"a": store})
    assert default["vs"] == "m 0.003 (the default)" and default["n"] == 2
    assert default["mean"] == pytest.approx(0.01) and default["chosen"] == [1e-2, 3e-3]
    assert default["search_share"] == pytest.approx((12 / 30 + 12 / 40) / 2)  # the search's share of each auto run
    assert lora["vs"] == "lora" and lora["mean"] == pytest.approx(0.01)


def test_lr_auto_at_another_budget_meets_the_baseline_at_its_best_rate_of_those_run_there(tmp_path, monkeypatch):
    import defaults as study
    import quality

    from records import RecordStore

    spec = {"kind": "classify", "higher_is_better": True, "tune_budget": 2, "steps": 10, "metric": "acc"}
    monkeypatch.setattr(quality, "TASKS", {"a": spec})
    monkeypatch.setattr(study, "CHOSEN", ["m"])
    monkeypatch.setattr(study, "BASELINES", ["lora"])
    store = RecordStore(tmp_path / "runs.json", quality.record_key)
    runs = [  # (method, budget, rate, seed, validation, test, lr used)
        ("m+auto", 6, 3e-3, 0, 0.9, 0.86, 1e-3),
        ("m+auto", 6, 3e-3, 1, 0.9, 0.88, 3e-3),
        ("m", 6, 3e-3, 0, 0.9, 0.87, 3e-3),
        ("m", 6, 3e-3, 1, 0.9, 0.86, 3e-3),
        ("lora", 6, 3e-3, 0, 0.88, 0.85, 3e-3),  # seed 0's best validation at r=6: the rate compared
        ("lora", 6, 3e-3, 1, 0.88, 0.84, 3e-3),
        ("lora", 6, 1e-2, 0, 0.50, 0.50, 1e-2),  # diverged: not the baseline's rate
        ("lora", 6, 1e-2, 1, 0.50, 0.50, 1e-2),
    ]
    for method, budget, lr, seed, val, test, used in runs:
        store.add(
            {
                "task": "a",
                "method": method,
                "budget_r": budget,
                "lr": lr,
                "seed": seed,
                "steps": 10,
                "val": {"acc": val},
                "test": {"acc": test},
                "lr_used": used,
                "seconds": 10.0,
                "adapter_parameters": 100,
                "lr_search": {"seconds": 5.0} if method.endswith("+auto") else None,
            }
        )
    choices = {"m": {"shipped": {"classify": ("m", 3e-3)}}}
    default, lora = study.auto_comparisons(choices, {"a": store})
    assert default["budget"] == 6 and not default["middle_budget"]
    assert default["mean"] == pytest.approx(0.005) and default["chosen"] == [1e-3, 3e-3]
    assert lora["vs"] == "lora 0.003" and lora["vs_rates_tried"] == [3e-3, 1e-2]
    assert lora["mean"] == pytest.approx(0.025)
    table = "\n".join(study.auto_markdown([default, lora]))
    assert "| a | 6 | m | lora 0.003 | 0.003, 0.01 | +0.0250 ± 0.0150 (n=2) |" in table
    # the shipped default itself against the baselines, away from the middle budget
    (fixed,) = study.auto_comparisons(choices, {"a": store}, fixed=True)
    assert (fixed["budget"], fixed["vs"], fixed["rate"]) == (6, "lora 0.003", 3e-3)
    assert fixed["mean"] == pytest.approx(0.02) and "search_share" not in fixed
    assert "| a | 6 | m (0.003) | lora 0.003 | 0.003, 0.01 | +0.0200 ± 0.0000 (n=2) |" in "\n".join(
        study.fixed_markdown([fixed])
    )


# ------------------------------------------------------------------------------------------- rates per budget
@pytest.fixture
def budget_tables(monkeypatch):
    """A table with rates chosen at r=1 and r=8 beside the middle budget's (r=2)."""
    import dynarank.defaults as defaults

    monkeypatch.setitem(defaults.DEFAULT_LR, "classify", {**defaults.DEFAULT_LR["classify"], "ard": 3e-3})
    monkeypatch.setattr(defaults, "MIDDLE_BUDGET", {"classify": 2, "causal-lm": 4})
    monkeypatch.setattr(defaults, "BUDGET_LR", {"classify": {"ard": {1: 1e-2, 8: 1e-3}}})
    return defaults


@pytest.mark.parametrize(
    "budget, rate",
    [(None, 3e-3), (0.25, 1e-2), (1, 1e-2), (1.4, 1e-2), (1.5, 3e-3), (2, 3e-3), (4, 3e-3), (4.5, 1e-3), (32, 1e-3)],
)
def test_a_budget_takes_the_rate_chosen_at_the_studied_budget_nearest_on_a_log_scale(budget_tables, budget, rate):
    assert budget_tables.default_lr("ard", "classify", budget) == rate
    assert budget_tables.default_lr("elalora", "classify", budget) == DEFAULT_LR["classify"]["elalora"]  # none studied


def test_a_tie_between_two_studied_budgets_goes_to_the_middle_one(budget_tables):
    assert budget_tables.default_lr("ard", "classify", 2**0.5) == 3e-3  # as far from r=1 as from r=2 (log scale)
    assert budget_tables.default_lr("ard", "classify", 4) == 3e-3  # as far from r=8 as from r=2


def test_a_budget_s_rate_says_where_it_came_from(budget_tables):
    assert budget_tables.source("classify", 1.0, "ard") == (
        "dynarank.defaults (docs/defaults.md), classify, chosen at plain LoRA r=1's budget (this run's: r=1)"
    )
    assert budget_tables.source("classify", 2.5, "ard") == source("classify")  # the middle table's
    with pytest.raises(ValueError, match="positive number of plain LoRA ranks"):
        budget_tables.default_lr("ard", "classify", 0)


def lora_r1_parameters(model, suffixes=("query", "value")) -> int:
    return sum(m.in_features + m.out_features for n, m in model.named_modules() if n.endswith(suffixes))


@pytest.mark.parametrize("budget_r", [1, 2], ids=["lora-r1-budget", "middle-budget"])
def test_the_library_s_optimizer_takes_the_rate_of_the_adapter_s_budget(budget_r):
    model = tiny_bert()
    target_params = budget_r * lora_r1_parameters(model)
    model = attach(
        model, DynaRankConfig(method="ard", r=4, target_modules=["query", "value"], target_params=target_params)
    )
    controller = dynarank.build_controller(model, total_steps=100)
    assert controller.budget_in_lora_ranks() == budget_r
    assert {g["lr"] for g in controller.build_optimizer().param_groups} == {default_lr("ard", "classify", budget_r)}
    assert default_lr("ard", "classify", 1) != default_lr("ard", "classify", 2)  # so the budget matters


@pytest.mark.parametrize(
    "budget_r, lr, expected",
    [(1.0, None, "r1"), (0.5, None, "r1"), (2.0, None, "middle"), (1.0, 3e-3, "given")],
    ids=["lora-r1-budget", "below-it", "the-middle-budget", "rate-given"],
)
def test_a_run_with_a_budget_trains_at_the_rate_chosen_at_that_budget_and_records_where_it_came_from(
    budget_r, lr, expected
):
    from dynarank.training.loop import train_classifier
    from tiny_models import WordTokenizer, examples

    model = tiny_bert()
    lora_r1 = lora_r1_parameters(model)
    spec = TrainSpec(
        method="ard",
        r=4,
        target_modules=["query", "value"],
        lr=lr,
        max_steps=4,
        batch_size=8,
        dynarank={"target_params": int(budget_r * lora_r1)},
    )
    metrics = train_classifier(model, WordTokenizer(), examples(32), spec).metrics
    rate = {"r1": BUDGET_LR["classify"]["ard"][1], "middle": DEFAULT_LR["classify"]["ard"], "given": lr}[expected]
    assert metrics["lr"] == rate
    if expected == "r1":
        assert metrics["lr_source"].endswith(f"chosen at plain LoRA r=1's budget (this run's: r={budget_r:.3g})")
    else:
        assert metrics["lr_source"] == ("given" if expected == "given" else source("classify"))


@pytest.mark.parametrize(
    "method, knobs, budget",
    [
        ("lora", {}, "r"),  # a fixed rank: r itself
        ("dora", {}, "r"),
        ("eva", {}, "r"),
        ("dynarank-lora", {}, "r"),
        ("adalora", {}, "r"),  # stock AdaLoRA prunes to r on average
        ("elalora", {}, "r"),  # ElaLoRA conserves its total rank
        ("adalora-physical", {"target_rank": 0.5}, 0.5),  # ends at target_rank per matrix
        ("ard", {}, None),  # ARD's r is where it starts, not a budget
        ("ard", {"target_params": "lora r=1"}, 1.0),
        ("elalora", {"target_params": "lora r=1"}, 1.0),
        ("elalora", {"granularity": "head"}, None),  # a rank per head is not plain LoRA's rank
        ("full", {}, None),
    ],
)
@pytest.mark.parametrize("r", [1, 2])
def test_a_run_s_budget_is_its_fixed_rank_or_its_controller_s_target_in_plain_lora_ranks(method, knobs, budget, r):
    model = tiny_bert()
    lora_r1 = lora_r1_parameters(model)
    knobs = {k: lora_r1 if v == "lora r=1" else v for k, v in knobs.items()}
    if method == "ard" and "target_params" in knobs:
        r += 1  # ARD prunes into its budget: at r=1 its shared A rows are LoRA r=1's size already
    spec = TrainSpec(method=method, r=r, target_modules=["query", "value"], dynarank=knobs)
    expected = float(r) if budget == "r" else budget
    assert spec.budget_on(model) == expected
    trained = spec.for_model(model)
    assert (trained.lr, trained.budget_r) == (default_lr(method, "classify", expected), expected)
    if method == "lora":  # stock LoRA at r=1 takes the rate chosen there (BUDGET_LR), at r=2 the middle one
        assert trained.lr == (BUDGET_LR["classify"]["lora"][1] if r == 1 else DEFAULT_LR["classify"]["lora"])
    if method in DYNARANK_METHODS:  # the controller of the attached adapter says the same
        attach(model, DynaRankConfig(method=method, **trained.config_fields()))
        assert dynarank.build_controller(model, total_steps=100).budget_in_lora_ranks() == expected


def test_a_fixed_rank_controller_s_budget_is_its_rank():
    model = attach(tiny_bert(), DynaRankConfig(method="dynarank-lora", r=1, target_modules=["query"]))
    controller = dynarank.build_controller(model, total_steps=10)
    assert controller.budget_in_lora_ranks() == 1.0
    assert (
        controller.default_lr()
        == default_lr("dynarank-lora", "classify", 1)
        == BUDGET_LR["classify"]["dynarank-lora"][1]
    )


def test_a_cli_run_with_a_budget_records_the_rate_chosen_at_that_budget(tmp_path):
    from tiny_models import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "model")
    data = write_csv(tmp_path / "data.csv")
    model = dynarank.training.models.load_classifier(model_dir, ["neg", "pos"])[0]
    from dynarank.training.estimate import lora_parameters
    from dynarank.training.loop import default_target_modules

    lora_r1 = lora_parameters(model, default_target_modules(model), 1)
    options = ["--method", "ard", "--target-params", str(lora_r1), "--r0", "4"]
    assert main(train_args(model_dir, data, tmp_path / "run", *options)) == 0
    record = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert record["lr"] == default_lr("ard", "classify", 1) == BUDGET_LR["classify"]["ard"][1]
    assert "chosen at plain LoRA r=1's budget" in record["lr_source"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["lr"], summary["lr_source"]) == (record["lr"], record["lr_source"])


def test_the_study_chooses_a_rate_at_a_budget_where_every_task_of_the_kind_ran_a_grid(tmp_path, monkeypatch):
    import defaults as study
    import quality

    from records import RecordStore

    spec = {"kind": "classify", "higher_is_better": True, "tune_budget": 2, "steps": 10, "metric": "acc"}
    monkeypatch.setattr(quality, "TASKS", {t: spec for t in "abc"})
    monkeypatch.setattr(study, "CHOSEN", ["m"])
    store = RecordStore(tmp_path / "runs.json", quality.record_key)
    runs = {  # (task, budget): validation accuracy per rate of m's shipped configuration, seed 0
        ("a", 1): {3e-3: 0.70, 1e-2: 0.80, 3e-2: 0.30},  # 3e-2 fails on a (0.375 of the best)
        ("b", 1): {3e-3: 0.75, 1e-2: 0.78, 3e-2: 0.79},
        ("c", 1): {3e-3: 0.60, 1e-2: 0.70, 3e-2: 0.72},
        ("a", 6): {3e-3: 0.90, 1e-2: 0.50},  # only a ran a grid at r=6: no choice there
        ("b", 6): {3e-3: 0.90},
    }
    for (task, budget), grid in runs.items():
        for lr, acc in grid.items():
            store.add(
                {"task": task, "method": "m", "budget_r": budget, "lr": lr, "seed": 0, "steps": 10, "val": {"acc": acc}}
            )
    stores = {t: store for t in "abc"}
    choices = {"m": {"shipped": {"classify": ("m", 3e-3)}}}
    found = study.budget_study(choices, stores)
    assert set(found["classify"]["m"]) == {1}
    at_r1 = found["classify"]["m"][1]
    assert at_r1["shipped"] == ("m", 1e-2)  # 3e-2 failed on a, so it cannot ship however it scores elsewhere
    # without a, its failure is unknown: b and c alone choose 3e-2; a and b, or a and c, choose 1e-2
    assert at_r1["left_out"] == {"a": ("m", 3e-2), "b": ("m", 1e-2), "c": ("m", 1e-2)}
    assert study.budget_rates(found) == {"classify": {"m": {1: 1e-2}}}
    assert study.shipped_rate_at(choices, found, "m", "a", 1) == ("m", 1e-2)
    assert study.shipped_rate_at(choices, found, "m", "a", 6) == ("m", 3e-3)  # nearer the middle budget


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"budget": "2"}, "budget"),
        ({"budget": True}, "budget"),
        ({"budget": float("nan")}, "budget"),
        ({"budget": float("inf")}, "budget"),
        ({"budget": -1}, "budget"),
        ({"budget": [2]}, "budget"),
        ({"method": ["ard"]}, "method"),
        ({"method": "nope"}, "method"),
        ({"task": None}, "task"),
        ({"task": "classification"}, "task"),
    ],
)
def test_a_bad_argument_of_default_lr_is_a_value_error_that_names_it(arguments, named):
    """budget='2' raised a bare TypeError from a comparison inside."""
    with pytest.raises(ValueError, match=rf"^{named}\b") as info:
        default_lr(**{"method": "ard", "task": "classify", **arguments})
    assert str(info.value) == info.value.args[0]  # the message as written (a KeyError's str would quote it)


def test_an_unknown_method_or_task_of_default_lr_is_still_a_key_error_naming_the_choices():
    with pytest.raises(KeyError, match="elalora"):
        default_lr("nope")
    with pytest.raises(KeyError, match="causal-lm"):
        default_lr("ard", "classification")


def test_a_budget_given_as_a_numpy_number_takes_the_rate_of_the_python_number():
    import numpy as np

    assert default_lr("ard", "classify", budget=np.float64(1.0)) == default_lr("ard", "classify", budget=1)


def test_the_orthogonality_default_names_the_choices_for_an_unknown_method_or_task():
    with pytest.raises(KeyError, match="elalora"):
        dynarank.default_ortho_weight("ard", "classify")  # not an SVD method: the message lists the ones there are
    with pytest.raises(KeyError, match="causal-lm"):
        dynarank.default_ortho_weight("elalora", "regression")


# ---------------------------------------------------------------- the start rank
STUDIED_START = {  # at b plain LoRA ranks (docs/defaults.md, "What the study ran is what ships")
    "ard": lambda b: max(8, 2 * b),
    "elalora": lambda b: b,
    "adalora-physical": lambda b: max(b + 1, round(1.5 * b)),
}


@pytest.mark.parametrize("method", list(STUDIED_START))
@pytest.mark.parametrize("b", [1, 2, 4])
def test_a_budget_without_r_starts_where_the_study_started_the_method_at_that_budget(method, b):
    """attach() (the library, the Trainer integrations) and TrainSpec.for_model() (the training loop, the CLI) take
    an unset r from the budget, as quality.py ran every method; the rank a user gives is used as given."""
    targets = ["query", "value"]
    per_rank = 2 * 2 * (32 + 32)  # plain LoRA r=1 on query and value of the tiny BERT's two layers
    knobs = {"target_params": b * per_rank}
    config = DynaRankConfig(method=method, target_modules=targets, **knobs)
    assert config.r is None  # resolved against the model's targets when attached
    model = attach(tiny_bert(), config)
    assert model.dynarank_config.r == STUDIED_START[method](b)
    assert all(max(layer.ranks) == STUDIED_START[method](b) for layer in dynarank.elastic_layers(model).values())
    spec = TrainSpec(method=method, target_modules=targets, dynarank=knobs).for_model(tiny_bert())
    assert spec.r == STUDIED_START[method](b) and spec.r_source.startswith("the defaults study's start at this budget")
    given = TrainSpec(method=method, r=5, target_modules=targets, dynarank=knobs).for_model(tiny_bert())
    assert (given.r, given.r_source) == (5, "given")


def test_without_a_budget_r_is_8_and_says_it_is_the_default():
    assert DynaRankConfig(method="ard").r == DynaRankConfig(method="elalora").r == 8
    assert DynaRankConfig(method="dynarank-lora").r == 8
    spec = TrainSpec(method="elalora", target_modules=["query", "value"]).for_model(tiny_bert())
    assert (spec.r, spec.r_source) == (8, "default")
    assert (TrainSpec(method="lora").r, TrainSpec(method="lora").r_source) == (8, "default")


def test_a_studied_start_beyond_what_the_model_can_hold_is_capped_there():
    """ARD at 6 plain LoRA ranks starts at 12 in the study; the tiny BERT's heads are 8 wide, so 8 is its start."""
    config = DynaRankConfig(method="ard", target_modules=["query", "value"], target_params=6 * 256)
    assert attach(tiny_bert(), config).dynarank_config.r == 8


def test_a_rank_floor_above_the_budgets_start_is_refused_when_the_start_is_known():
    config = DynaRankConfig(method="elalora", target_modules=["query", "value"], target_params=256, rank_floor=2)
    with pytest.raises(ConfigError, match="rank_floor"):
        attach(tiny_bert(), config)  # ElaLoRA's start at 1 plain LoRA rank is r=1
