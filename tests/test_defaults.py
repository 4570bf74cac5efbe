"""The defaults a user gets without setting anything: one table, read by the library, the loop, the CLI and the
benchmarks; every run says which rate it used and where it came from; a run too short for a method's schedule is
said so, with its numbers, before training."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import yaml

import dynarank
from dynarank import DynaRankConfig, attach
from dynarank.cli import main
from dynarank.defaults import DEFAULT_LR, SOURCE, default_lr
from dynarank.training.loop import TrainSpec
from dynarank.training.methods import ALL_METHODS
from test_cli import train_args, write_csv
from tiny_models import tiny_bert

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_the_table_is_the_one_the_defaults_study_chose():
    record = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/results/defaults.json").read_text())
    assert DEFAULT_LR == record["shipped"]


def test_the_study_ships_the_rate_best_on_average_over_every_task():
    import defaults as study

    scores = {"a": {("m", 1e-3): 0.9, ("m", 1e-2): 1.0}, "b": {("m", 1e-3): 1.0, ("m", 1e-2): 0.5}}
    assert study.choose(scores, ["a", "b"])[0] == ("m", 1e-3)  # 0.95 on average against 0.75
    assert study.choose(scores, ["a"])[0] == ("m", 1e-2)  # b left out


def test_every_run_method_has_a_default_rate_and_only_those_do():
    assert set(DEFAULT_LR) == set(ALL_METHODS)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_spec_without_a_rate_takes_the_table_s_and_says_so(method):
    spec = TrainSpec(method=method, r=2)
    assert (spec.lr, spec.lr_source) == (default_lr(method), SOURCE)
    given = TrainSpec(method=method, r=2, lr=0.123)
    assert (given.lr, given.lr_source) == (0.123, "given")


@pytest.mark.parametrize("method", ["dynarank-lora", "ard", "elalora", "adalora-physical"])
def test_the_library_s_optimizer_takes_the_table_s_rate(method):
    model = attach(tiny_bert(), DynaRankConfig(method=method, r=2, target_modules=["query"]))
    controller = dynarank.build_controller(model, total_steps=100)
    assert {g["lr"] for g in controller.build_optimizer().param_groups} == {default_lr(method)}


def test_the_benchmarks_take_the_table_s_rate_when_they_run_a_method_on_its_defaults():
    import quality

    spec = quality.train_spec("elalora", 2, 80_000, None, 0, 100, quality.TASKS["minilm"], "query")
    assert spec.lr == default_lr("elalora") and spec.lr_source == SOURCE


def test_a_cli_run_records_the_rate_it_used_and_where_it_came_from(tmp_path):
    from tiny_models import save_tiny_model_dir

    model_dir = save_tiny_model_dir(tmp_path / "model")
    data = write_csv(tmp_path / "data.csv")
    assert main(train_args(model_dir, data, tmp_path / "default", "--method", "lora")) == 0
    record = yaml.safe_load((tmp_path / "default" / "config.yaml").read_text())
    assert (record["lr"], record["lr_source"]) == (default_lr("lora"), SOURCE)
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
