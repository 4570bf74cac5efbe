"""A config read back from a dict: ``from_dict`` refuses what the constructor refuses (a knob the method lacks, a
knob the rest of the config leaves without effect), naming it, and a method's own class refuses another method's
dict. A *record* (what ``to_dict`` wrote, now or in an earlier version: saved adapters hold one) is read as the
version that wrote it meant it, by named rules only: method names before 0.2, version 0.1's one flat config, fields
retired at the value that did what this version does, and knobs recorded before they were refused as inert."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

import dynarank
from dynarank import DynaRankConfig
from dynarank.config import CONFIG_CLASSES, ARDConfig, ConfigError, ElaLoRAConfig, FixedRankConfig, fields_of
from tiny_models import tiny_llama


def record(method: str, **changed) -> dict:
    """What this version's ``to_dict`` writes for ``method``'s defaults, with ``changed`` written over it (a value
    accepted when the record was saved)."""
    return {**DynaRankConfig(method=method).to_dict(), **changed}


def constructor_error(**values) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        DynaRankConfig(**values)
    return info.value


# ---------------------------------------------------------------------------- from_dict validates as the constructor
@pytest.mark.parametrize(
    ("data", "fields"),
    [
        ({"method": "ard", "init_rho": 3.0}, ("init_rho",)),  # inert without a budget
        ({"method": "ard", "k_candidates": 3, "target_rank": 2.0}, ("k_candidates", "target_rank")),  # ElaLoRA's
        ({"method": "elalora", "k_candidate": 3}, ("k_candidate",)),  # no dynarank setting
        ({"method": "elalora", "head_layout": "shared"}, ("head_layout",)),  # inert per matrix
        ({"method": "adalora-physical", "warmup_frac": 0.1, "t_init_steps": 3}, ("warmup_frac", "t_init_steps")),
        ({"method": "dynarank-lora", "r": "4"}, ("r",)),
    ],
)
def test_from_dict_refuses_what_the_constructor_refuses_with_the_same_error(data, fields):
    with pytest.raises(ConfigError) as info:
        DynaRankConfig.from_dict(data)
    assert info.value.fields == fields
    assert str(info.value) == str(constructor_error(**data))


def test_a_legacy_method_name_is_refused_outside_a_record_as_the_constructor_refuses_it():
    with pytest.raises(ConfigError, match="stock PEFT baseline's name"):
        DynaRankConfig.from_dict({"method": "lora", "r": 4})


@pytest.mark.parametrize("method", list(CONFIG_CLASSES))
def test_every_method_s_config_round_trips_through_its_dict(method):
    knobs = {"ard": {"target_params": 1000, "init_rho": 2.0}, "elalora": {"target_rank": 2.5}}.get(method, {})
    config = DynaRankConfig(method=method, r=4, **knobs)
    assert DynaRankConfig.from_dict(config.to_dict()) == config
    assert type(config).from_dict(config.to_dict()) == config
    assert type(config).from_dict({key: value for key, value in config.to_dict().items() if key != "method"}) == config


@pytest.mark.parametrize(
    ("cls", "method"),
    [(ARDConfig, "elalora"), (ElaLoRAConfig, "adalora-physical"), (FixedRankConfig, "ard"), (ARDConfig, "lora")],
)
def test_a_method_s_class_refuses_the_dict_of_another_method(cls, method):
    """ARDConfig.from_dict(an ElaLoRA dict) returned an ElaLoRAConfig."""
    recorded = record(method) if method in CONFIG_CLASSES else {**record("dynarank-lora"), "method": method}
    for data in ({"method": method}, recorded):
        with pytest.raises(ConfigError) as info:
            cls.from_dict(data)
        assert info.value.fields == ("method",)
    assert cls.__name__ in str(info.value)  # the record's method read (a name of before 0.2 too), then refused


# ---------------------------------------------------------------------------- records of earlier versions
def version_0_1_record(method: str, **changed) -> dict:
    """What version 0.1's to_dict wrote: one flat config, every field for every method, at its defaults."""
    flat = {
        "method": method,
        "target_modules": ["query", "value"],
        "r": 8,
        "lora_alpha": None,
        "lora_dropout": 0.0,
        "granularity": "head",
        "head_layout": "own",
        "num_heads": None,
        "num_kv_heads": None,
        "head_dim": None,
        "modules_to_save": None,
        "exclude_modules": [],
        "seed": None,
        "rank_floor": 0,
        "resize_every": None,
        "preset": "default",
        "ard_lambda": None,
        "lambda_mode": "relative",
        "ard_beta": None,
        "tv_form": "step",
        "lr_alpha": None,
        "alpha_travel": 2.0,
        "warmup_frac": 0.2,
        "final_frac": 0.15,
        "readout": "ceil",
        "mask": "hard",
        "target_rank": None,
        "target_params": None,
        "t_init_steps": None,
        "t_final_steps": None,
        "k_candidates": 2,
        "b_changes": 4,
        "ortho_weight": 0.1,
        "importance_beta1": 0.85,
        "importance_beta2": 0.85,
        "switch_off": False,
        "reset_optimizer_on_resize": False,
    }
    return {**flat, **changed}


@pytest.mark.parametrize(
    ("method", "read_as"),
    [("lora", "dynarank-lora"), ("ard", "ard"), ("elalora", "elalora"), ("adalora", "adalora-physical")],
)
def test_a_version_0_1_record_loads_as_its_method_without_the_other_methods_fields(method, read_as):
    """Version 0.1 recorded every field for every method; ElaLoRA's records failed on ARD's fields."""
    config = DynaRankConfig.from_dict(version_0_1_record(method, r=4, seed=3))
    assert (config.method, config.r, config.seed, config.granularity) == (read_as, 4, 3, "head")


def test_a_version_0_1_record_without_switch_off_loads_too():
    """switch_off came last in version 0.1: its earlier records lack it."""
    data = version_0_1_record("elalora", switch_off=None)
    del data["switch_off"]
    assert DynaRankConfig.from_dict(data).switch_off is False


def test_a_record_of_method_none_loads_as_the_default_method_it_configured():
    """DynaRankConfig(method=None) once kept None in its field (and so in its record) while building the default."""
    assert DynaRankConfig.from_dict({**record("dynarank-lora", r=2), "method": None}) == DynaRankConfig(r=2)


def test_a_record_that_holds_a_field_no_version_had_is_refused_naming_it():
    with pytest.raises(ConfigError) as info:
        DynaRankConfig.from_dict(record("elalora", k_candidate=3))
    assert info.value.fields == ("k_candidate",)
    with pytest.raises(ConfigError) as info:
        DynaRankConfig.from_dict(version_0_1_record("ard", k_candidate=3))
    assert "k_candidate" in info.value.fields


def test_a_record_of_a_retired_field_loads_at_the_value_that_did_what_this_version_does():
    """init_uniform (a share of ARD's data start spread as LoRA's; removed) at 0 left the data to allocate it all."""
    config = DynaRankConfig.from_dict(record("ard", target_params=1000, init_uniform=0.0))
    assert config == DynaRankConfig(method="ard", r=8, target_params=1000)
    with pytest.raises(ConfigError) as info:
        DynaRankConfig.from_dict(record("ard", target_params=1000, init_uniform=0.5))
    assert info.value.fields == ("init_uniform",) and "retired" in str(info.value)


@pytest.mark.parametrize(
    ("method", "inert", "kept"),
    [
        ("elalora", {"head_layout": "shared"}, {}),
        ("dynarank-lora", {"num_heads": 4}, {"granularity": "matrix"}),
        ("elalora", {"warmup_frac": 0.5}, {"t_init_steps": 3}),
        ("adalora-physical", {"final_frac": 0.3}, {"t_final_steps": 3}),
        ("elalora", {"switch_off": True}, {"rank_floor": 1}),
        ("ard", {"init_rho": 4.0, "alpha_travel": 8.0}, {"lr_alpha": 0.05}),
    ],
)
def test_a_record_saved_with_a_knob_that_acted_on_nothing_loads_without_it_and_says_so(method, inert, kept, caplog):
    """Saved before such knobs were refused: they changed nothing, so the config is read at their defaults."""
    with caplog.at_level(logging.WARNING, logger="dynarank"):
        config = DynaRankConfig.from_dict(record(method, **inert, **kept))
    assert config == DynaRankConfig(method=method, **kept)
    assert all(name in caplog.text for name in inert)


def test_a_partial_dict_is_not_a_record_so_an_inert_knob_in_it_is_refused():
    """A record holds every field of the shared base (what every to_dict wrote); a dict written by hand does not."""
    data = record("elalora", head_layout="shared")
    del data["seed"]
    with pytest.raises(ConfigError) as info:
        DynaRankConfig.from_dict(data)
    assert info.value.fields == ("head_layout",)


def test_an_adapter_saved_with_a_knob_that_acted_on_nothing_still_loads(tmp_path):
    """An adapter of ElaLoRA per matrix saved with head_layout='shared' (accepted then, attached as 'own') loads as
    it was trained."""
    model = dynarank.attach(tiny_llama(), DynaRankConfig(method="elalora", target_modules=["q_proj"], r=2))
    dynarank.save_adapter(model, tmp_path / "adapter")
    layout_file = tmp_path / "adapter" / "dynarank_adapter.json"
    layout = json.loads(layout_file.read_text())
    layout["config"]["head_layout"] = "shared"
    for checksum in ("layout_sha256", "weights_sha256"):  # as an adapter saved before the checksums were
        layout.pop(checksum, None)
    layout_file.write_text(json.dumps(layout))
    loaded = dynarank.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert loaded.dynarank_config == model.dynarank_config
    assert {layer.layout for layer in dynarank.elastic_layers(loaded).values()} == {"own"}


def test_records_are_recognised_by_the_fields_every_version_wrote():
    """The shared base's fields are what every to_dict since 0.1 has written: a record holds them all; version 0.1's
    flat config is the one the library names."""
    from dynarank.config import FLAT_FIELDS_0_1

    assert set(FLAT_FIELDS_0_1) == set(version_0_1_record("ard"))
    base = {spec.name for spec in dataclasses.fields(DynaRankConfig)}
    assert base <= set(FLAT_FIELDS_0_1)
    assert all(base <= set(fields_of(cls)) for cls in CONFIG_CLASSES.values())
