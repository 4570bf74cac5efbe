"""Config validation, field by field: every value a method cannot use is a ConfigError that names its field, when the
config is built (never a raw TypeError / re.error later, never a NaN that trains silently), and a knob the rest of the
config makes inert is refused as a knob of another method is, while its default stays accepted."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import yaml

import dynarank
from dynarank import DynaRankConfig, attach
from dynarank.cli import main
from dynarank.config import CONFIG_CLASSES, ConfigError, fields_of
from tiny_models import tiny_bert, tiny_llama

NAN, INF = float("nan"), float("inf")
# Every field annotated float (or float | None) of every method's config, and the method that has it.
FLOAT_FIELDS = sorted(
    {
        (name, next(m for m, c in CONFIG_CLASSES.items() if name in fields_of(c)))
        for cls in CONFIG_CLASSES.values()
        for name, spec in fields_of(cls).items()
        if str(spec.type).split(" | ")[0] == "float"
    }
)


PHASES = ("warmup_frac", "final_frac")  # checked together: their sum must leave an active phase


def named(name: str) -> str | tuple[str, ...]:
    """The field(s) a refusal of ``name`` names."""
    return PHASES if name in PHASES else name


def refused(fields: str | tuple[str, ...], method: str = "dynarank-lora", **values) -> ConfigError:
    """Build the config; it must raise a ConfigError whose fields are exactly ``fields``."""
    with pytest.raises(ConfigError) as info:
        DynaRankConfig(method=method, **values)
    assert info.value.fields == ((fields,) if isinstance(fields, str) else fields), str(info.value)
    return info.value


# ---------------------------------------------------------------------------- numbers: finite, and in their range
def test_the_float_fields_checked_below_are_every_float_field_of_every_config():
    assert {name for name, _ in FLOAT_FIELDS} == {
        "lora_alpha",
        "lora_dropout",
        "warmup_frac",
        "final_frac",
        "ard_lambda",
        "ard_beta",
        "lr_alpha",
        "alpha_travel",
        "init_rho",
        "target_rank",
        "ortho_weight",
        "values_lr_ratio",
        "importance_beta1",
        "importance_beta2",
    }


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(("name", "method"), FLOAT_FIELDS, ids=[n for n, _ in FLOAT_FIELDS])
def test_nan_and_infinity_are_refused_for_every_float_field_naming_it(name, method, value):
    err = refused(named(name), method, **{name: value})
    assert "nan" in str(err) or "inf" in str(err)


def _no_number_cases() -> list:
    """(name, method, value) for every float field and a value that is no number: text, a bool, a list, and None
    where None is not the field's own value (the method's default)."""
    cases = []
    for name, method in FLOAT_FIELDS:
        none_is_default = fields_of(CONFIG_CLASSES[method])[name].default is None or name in PHASES
        for label, value in (("text", "8"), ("bool", True), ("list", [1.0]), ("none", None)):
            if value is not None or not none_is_default:
                cases.append(pytest.param(name, method, value, id=f"{name}-{label}"))
    return cases


@pytest.mark.parametrize(("name", "method", "value"), _no_number_cases())
def test_a_float_field_given_no_number_is_refused_naming_it(name, method, value):
    refused(named(name), method, **{name: value})


@pytest.mark.parametrize(
    ("name", "method", "outside", "inside"),
    [
        ("lora_alpha", "dynarank-lora", [0, -1.0], [1e-6, 16, 0.5]),
        ("lora_dropout", "dynarank-lora", [-0.1, 1.0], [0, 0.0, 0.99]),
        ("ard_lambda", "ard", [-1e-9], [0, 0.0, 3.0]),
        ("ard_beta", "ard", [-1.0], [0.0, 10.0]),
        ("lr_alpha", "ard", [-1e-5], [0.0, 5e-5]),
        ("alpha_travel", "ard", [0.0, -2.0], [0.25, 8.0]),
        ("init_rho", "ard", [1.0, 0.5], [1.0001, 2.0]),
        ("ortho_weight", "elalora", [-0.1], [0.0, 0.1]),
        ("values_lr_ratio", "adalora-physical", [0.0, -1.0], [1.0, 30.0]),
        ("importance_beta1", "elalora", [0.0, 1.0], [0.5, 0.85]),
        ("importance_beta2", "adalora-physical", [0.0, 1.0], [0.5, 0.85]),
    ],
)
def test_a_float_field_refuses_values_outside_its_range_and_accepts_those_inside(name, method, outside, inside):
    extra = {"target_params": 1000} if name == "init_rho" else {}  # init_rho sizes the budget's start
    for value in outside:
        refused(name, method, **extra, **{name: value})
    for value in inside:
        assert getattr(DynaRankConfig(method=method, **extra, **{name: value}), name) == value


def test_a_numpy_number_is_accepted_and_kept_as_a_python_float():
    config = DynaRankConfig(method="ard", lora_alpha=np.float32(16), ard_lambda=np.float64(0.5))
    assert type(config.lora_alpha) is float and config.lora_alpha == 16.0 and config.ard_lambda == 0.5


# Every numeric field, the method that has it, a numpy value it accepts and the settings that value needs. np.float64
# is a subclass of float and np.int64 no int at all: kept as they are, both reach json.dumps and yaml.safe_dump, which
# write neither.
NUMPY_VALUES = {
    "r": ("dynarank-lora", np.int64(4), {}),
    "lora_alpha": ("dynarank-lora", np.float64(8.0), {}),
    "lora_dropout": ("ard", np.float64(0.1), {}),
    "num_heads": ("dynarank-lora", np.int64(4), {}),
    "num_kv_heads": ("dynarank-lora", np.int32(2), {}),
    "head_dim": ("dynarank-lora", np.int64(8), {}),
    "seed": ("dynarank-lora", np.int64(7), {}),
    "rank_floor": ("ard", np.int64(1), {}),
    "resize_every": ("ard", np.int64(5), {}),
    "warmup_frac": ("ard", np.float64(0.1), {}),
    "final_frac": ("adalora-physical", np.float32(0.25), {}),
    "target_params": ("ard", np.int64(1000), {}),
    "ard_lambda": ("ard", np.float64(2.0), {}),
    "ard_beta": ("ard", np.float64(0.5), {}),
    "lr_alpha": ("ard", np.float64(0.01), {}),
    "alpha_travel": ("ard", np.float64(3.0), {}),
    "init_rho": ("ard", np.float64(2.0), {"target_params": 1000}),
    "init_batches": ("ard", np.int64(3), {"rank_init": "data"}),
    "target_rank": ("elalora", np.int64(2), {"r": 4}),
    "t_init_steps": ("elalora", np.int64(3), {}),
    "t_final_steps": ("adalora-physical", np.int64(3), {}),
    "ortho_weight": ("elalora", np.float64(0.1), {}),
    "values_lr_ratio": ("adalora-physical", np.float64(3.0), {}),
    "importance_beta1": ("elalora", np.float64(0.8), {}),
    "importance_beta2": ("adalora-physical", np.float32(0.75), {}),
    "k_candidates": ("elalora", np.int64(3), {}),
    "b_changes": ("elalora", np.uint8(2), {}),
}


def test_the_numpy_cases_below_cover_every_numeric_field_of_every_config():
    numeric = {
        name
        for cls in CONFIG_CLASSES.values()
        for name, spec in fields_of(cls).items()
        if str(spec.type).split(" | ")[0] in ("int", "float")
    }
    assert set(NUMPY_VALUES) == numeric


@pytest.mark.parametrize("name", sorted(NUMPY_VALUES))
def test_a_numpy_number_in_any_numeric_field_ends_as_the_python_number_it_equals(name):
    method, value, needs = NUMPY_VALUES[name]
    config = DynaRankConfig(method=method, **needs, **{name: value})
    expected = int(value) if isinstance(value, np.integer) else float(value)
    assert type(getattr(config, name)) is type(expected) and getattr(config, name) == expected
    json.dumps(config.to_dict())  # what save_adapter writes
    yaml.safe_dump(config.to_dict())  # what a YAML config file holds


def test_an_adapter_configured_with_numpy_numbers_saves_and_loads(tmp_path):
    config = DynaRankConfig(
        method="elalora", target_modules=["q_proj"], r=4, target_rank=np.int64(2), lora_dropout=np.float64(0.1)
    )
    model = attach(tiny_llama(), config)
    dynarank.save_adapter(model, tmp_path / "adapter")
    loaded = dynarank.load_adapter(tiny_llama(), tmp_path / "adapter").dynarank_config
    assert (loaded.target_rank, loaded.lora_dropout) == (2, 0.1) and loaded == config


@pytest.mark.parametrize(
    ("name", "value"),
    [("seed", "x"), ("seed", 1.5), ("seed", True), ("seed", 2**64), ("r", True), ("num_heads", True), ("r", 2.0)]
    + [("r", np.bool_(True)), ("r", np.float64(2.0)), ("num_heads", np.bool_(True)), ("seed", np.float32(1))],
)
def test_integer_fields_refuse_text_floats_booleans_and_out_of_range_values(name, value):
    refused(name, **{name: value})


@pytest.mark.parametrize("seed", [None, 0, 1234, -1, 2**62])
def test_seeds_torch_accepts_are_accepted(seed):
    assert DynaRankConfig(seed=seed).seed == seed


@pytest.mark.parametrize(("method", "name"), [("elalora", "switch_off"), ("elalora", "reset_optimizer_on_resize")])
def test_boolean_fields_take_only_booleans(method, name):
    refused(name, method, **{name: 1})


@pytest.mark.parametrize("method", [["ard"], 3, 1.5])
def test_a_method_that_is_not_a_name_is_refused_naming_method(method):
    refused("method", method=method)


def test_method_none_is_the_default_method_as_leaving_it_out():
    """It built the default class but kept method=None: from_dict(to_dict()) failed and build_controller raised
    KeyError(None)."""
    config = DynaRankConfig(method=None, r=2)
    assert config.method == DynaRankConfig().method == "dynarank-lora"
    assert DynaRankConfig.from_dict(config.to_dict()) == config
    model = dynarank.attach(tiny_bert(), config)
    assert dynarank.build_controller(model, total_steps=10).config.method == "dynarank-lora"


# ---------------------------------------------------------------------------- lists of module names
@pytest.mark.parametrize("name", ["exclude_modules", "modules_to_save"])
def test_a_single_string_where_a_list_of_names_is_due_is_refused_with_the_list_to_write(name):
    err = refused(name, **{name: "o_proj"})
    assert "['o_proj']" in str(err)


@pytest.mark.parametrize("name", ["target_modules", "exclude_modules", "modules_to_save"])
@pytest.mark.parametrize("value", [["query", ""], ["query", 3], {"query": 1}, 3], ids=["empty", "int", "dict", "num"])
def test_a_list_of_names_holds_only_non_empty_strings(name, value):
    refused(name, **{name: value})


@pytest.mark.parametrize("name", ["target_modules", "exclude_modules", "modules_to_save"])
def test_a_set_of_names_is_taken_as_its_sorted_list_and_a_tuple_as_its_list(name):
    assert getattr(DynaRankConfig(**{name: {"value", "query"}}), name) == ["query", "value"]
    assert getattr(DynaRankConfig(**{name: ("value", "query")}), name) == ["value", "query"]


def test_a_string_target_is_a_regex_and_one_that_does_not_compile_is_refused_naming_target_modules():
    err = refused("target_modules", target_modules="(query")
    assert "regex" in str(err)
    assert DynaRankConfig(target_modules=r".*\.(query|value)").target_modules == r".*\.(query|value)"
    assert DynaRankConfig(target_modules="all-linear").target_modules == "all-linear"


@pytest.mark.parametrize("value", ["", [], set()], ids=["empty-string", "empty-list", "empty-set"])
def test_an_empty_target_is_refused(value):
    refused("target_modules", target_modules=value)


def test_an_empty_modules_to_save_means_no_module_is_trained_whole():
    assert DynaRankConfig(modules_to_save=[]).modules_to_save == []


def test_exclude_modules_given_as_a_list_of_one_name_excludes_it():
    model = attach(tiny_llama(), DynaRankConfig(target_modules="all-linear", exclude_modules=["o_proj"]))
    names = list(dynarank.elastic_layers(model))
    assert names and not any(n.endswith("o_proj") for n in names)


def test_an_adapter_attached_with_a_set_of_targets_saves_and_loads(tmp_path):
    model = attach(tiny_bert(), DynaRankConfig(target_modules={"value", "query"}, seed=0))
    dynarank.save_adapter(model, tmp_path / "adapter")
    loaded = dynarank.load_adapter(tiny_bert(), tmp_path / "adapter")
    assert loaded.dynarank_config.target_modules == ["query", "value"]


# ---------------------------------------------------------------------------- ARD knobs made inert by the rest
@pytest.mark.parametrize(
    ("knob", "value"),
    [("init_rho", 4.0), ("init_batches", 3), ("init_statistic", "activation"), ("init_margin", "gains")]
    + [("init_scale", "norm")],
)
def test_a_data_start_knob_is_refused_with_the_uniform_start(knob, value):
    err = refused(knob, "ard", rank_init="uniform", target_params=1000, **{knob: value})
    assert "rank_init='uniform'" in str(err) and str(err).startswith(f"{knob}: not used by method 'ard'")


@pytest.mark.parametrize(
    ("knob", "value"), [("init_batches", 3), ("init_statistic", "activation"), ("init_margin", "gains")]
)
@pytest.mark.parametrize(
    "start",
    [{"rank_init": "auto", "target_params": 1000}, {"rank_init": "data"}, {"rank_init": "data", "target_params": 1000}],
)
def test_a_data_start_knob_is_accepted_where_the_start_is_measured(start, knob, value):
    """'data' measures; 'auto' measures with a budget (once dynarank.init_ranks runs): a knob of the data start is
    the user's to set under them."""
    config = DynaRankConfig(method="ard", **start, **{knob: value})
    assert getattr(config, knob) == value and config.data_start


@pytest.mark.parametrize(
    ("start", "why"),
    [({"rank_init": "auto"}, "without a budget (target_params)")]
    + [({"rank_init": "auto", "target_params": 1000, "preset": "paper"}, "under preset='paper'")],
)
@pytest.mark.parametrize(("knob", "value"), [("init_batches", 3), ("init_statistic", "activation")])
def test_a_data_start_knob_is_refused_where_auto_starts_uniform(start, why, knob, value):
    """'auto' without a budget, or under the paper preset, starts every group at r: never measured."""
    assert not DynaRankConfig(method="ard", **start).data_start
    err = refused(knob, "ard", **start, **{knob: value})
    assert f"rank_init='auto' starts every group at r {why}" in str(err)


@pytest.mark.parametrize("rank_init", ["auto", "data"])
def test_init_rho_needs_a_budget_whatever_the_start(rank_init):
    err = refused("init_rho", "ard", rank_init=rank_init, init_rho=2.0)
    assert "target_params" in str(err)
    assert DynaRankConfig(method="ard", rank_init=rank_init, init_rho=2.0, target_params=1000).init_rho == 2.0


def test_cap_order_needs_a_budget():
    refused("cap_order", "ard", cap_order="margin-per-parameter")
    config = DynaRankConfig(method="ard", cap_order="margin-per-parameter", target_params=1000)
    assert config.cap_order == "margin-per-parameter"


@pytest.mark.parametrize("fixing", [{"lr_alpha": 0.05}, {"lr_alpha": 0.0}, {"preset": "paper"}])
def test_alpha_travel_is_refused_when_the_alphas_learning_rate_is_fixed(fixing):
    err = refused("alpha_travel", "ard", alpha_travel=8.0, **fixing)
    assert ("lr_alpha is given" if "lr_alpha" in fixing else "preset='paper'") in str(err)


@pytest.mark.parametrize(
    ("name", "value"),
    [("ard_lambda", 0.5), ("mask", "soft"), ("rank_floor", 1), ("tv_form", "anchor"), ("warmup_frac", 0.1)],
)
def test_a_knob_the_paper_preset_sets_is_refused_beside_it(name, value):
    """preset='paper' sets its fields to the paper's values: a value given beside it was overridden without a word."""
    err = refused(name, "ard", preset="paper", **{name: value})
    assert "preset='paper' sets" in str(err)


def test_the_paper_preset_refuses_exactly_the_ard_fields_its_table_sets():
    from dynarank.config import ARD_PAPER_PRESET, PAPER_PRESET_FIELDS
    from dynarank.controllers.ard_settings import PAPER

    assert PAPER is ARD_PAPER_PRESET  # one table: what the settings apply is what the check refuses
    assert set(PAPER_PRESET_FIELDS) == set(ARD_PAPER_PRESET) - {"lr"}  # lr is the run's, not a config field
    assert set(PAPER_PRESET_FIELDS) <= set(fields_of(CONFIG_CLASSES["ard"]))


def test_every_inert_knob_is_named_in_one_error():
    err = refused(
        ("init_rho", "init_scale", "cap_order", "alpha_travel"),
        "ard",
        rank_init="uniform",
        init_rho=3.0,
        init_scale="norm",
        cap_order="margin-per-parameter",
        lr_alpha=0.01,
        alpha_travel=4.0,
    )
    assert str(err).endswith("unset them.")


@pytest.mark.parametrize(
    "settings",
    [
        {"rank_init": "uniform"},
        {"rank_init": "uniform", "init_rho": 1.5, "init_batches": None, "init_statistic": "gradient-relative"},
        {"rank_init": "uniform", "init_margin": "equal", "init_scale": "input", "cap_order": "margin"},
        {"lr_alpha": 0.05, "alpha_travel": 2.0},
        {"preset": "paper"},
        {"rank_init": "data"},
        {},
    ],
)
def test_knobs_left_at_their_defaults_are_never_refused(settings):
    DynaRankConfig(method="ard", **settings)


# ---------------------------------------------------------------------------- knobs made inert, every method
def _other_layout(method: str) -> str:
    """The head layout a method does not default to (ARD's default is 'shared', the others' 'own')."""
    return "own" if method == "ard" else "shared"


@pytest.mark.parametrize("method", list(CONFIG_CLASSES))
@pytest.mark.parametrize("knob", ["head_layout", "num_heads", "num_kv_heads", "head_dim"])
def test_a_per_head_knob_is_refused_under_one_rank_group_per_matrix(method, knob):
    """granularity='matrix' makes one rank group per module: there are no heads to lay out or count."""
    value = _other_layout(method) if knob == "head_layout" else 2
    err = refused(knob, method, granularity="matrix", **{knob: value})
    assert "granularity='matrix'" in str(err) and str(err).startswith(f"{knob}: not used by method {method!r}")
    assert getattr(DynaRankConfig(method=method, granularity="head", **{knob: value}), knob) == value


@pytest.mark.parametrize("method", ["elalora", "adalora-physical"])
def test_the_svd_methods_default_to_one_group_per_matrix_so_a_head_layout_alone_is_refused(method):
    """It attached with layout 'own' (one group per matrix), as if head_layout had not been given."""
    refused("head_layout", method, head_layout="shared")
    config = DynaRankConfig(method=method, granularity="head", head_layout="shared", target_modules=["q_proj"], r=2)
    model = attach(tiny_llama(), config)
    assert {layer.layout for layer in dynarank.elastic_layers(model).values()} == {"shared"}


@pytest.mark.parametrize("method", ["elalora", "adalora-physical"])
@pytest.mark.parametrize(("fraction", "steps"), [("warmup_frac", "t_init_steps"), ("final_frac", "t_final_steps")])
def test_a_phase_given_both_as_a_fraction_of_the_run_and_in_steps_is_refused_naming_both(method, fraction, steps):
    err = refused((fraction, steps), method, **{fraction: 0.05, steps: 3})
    assert "give one" in str(err)
    assert getattr(DynaRankConfig(method=method, **{steps: 3}), steps) == 3  # the steps alone
    assert getattr(DynaRankConfig(method=method, **{fraction: 0.05}), fraction) == 0.05  # the fraction alone


def test_switch_off_is_refused_where_the_rank_floor_keeps_every_group_s_last_rank():
    err = refused("switch_off", "elalora", switch_off=True, rank_floor=1)
    assert "rank_floor=1" in str(err)
    assert DynaRankConfig(method="elalora", switch_off=True).switch_off


def test_k_candidates_is_refused_where_no_round_swaps_a_rank():
    err = refused("k_candidates", "elalora", k_candidates=3, b_changes=0)
    assert "b_changes=0" in str(err)
    assert DynaRankConfig(method="elalora", k_candidates=3, b_changes=1).k_candidates == 3


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("dynarank-lora", {"granularity": "matrix", "head_layout": "own", "num_heads": None}),
        ("ard", {"granularity": "matrix", "head_layout": "shared"}),
        ("elalora", {"warmup_frac": 0.2, "final_frac": 0.15, "t_init_steps": 3, "t_final_steps": 3}),
        ("elalora", {"switch_off": False, "rank_floor": 1, "k_candidates": 2, "b_changes": 0}),
        ("adalora-physical", {"head_layout": "own", "t_init_steps": 3, "t_final_steps": 3}),
    ],
)
def test_knobs_left_at_their_defaults_beside_what_makes_them_inert_are_never_refused(method, settings):
    DynaRankConfig(method=method, **settings)


def test_a_config_recorded_with_an_inert_knob_still_loads_without_it():
    """Adapters and checkpoints saved before inert knobs were refused record them; they acted on nothing."""
    recorded = dataclasses.asdict(DynaRankConfig(method="ard", rank_init="uniform"))
    recorded.update(init_rho=4.0, init_statistic="activation", lr_alpha=0.05, alpha_travel=8.0)
    config = DynaRankConfig.from_dict(recorded)
    assert (config.init_rho, config.init_statistic, config.alpha_travel, config.lr_alpha) == (
        1.5,
        "gradient-relative",
        2.0,
        0.05,
    )


def test_a_config_round_trips_through_its_dict():
    config = DynaRankConfig(method="ard", target_params=1000, init_rho=2.0, cap_order="margin-per-parameter")
    assert DynaRankConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--init-rho", "2"], "--init-rho"),
        (["--rank-init", "uniform", "--target-params", "1000", "--init-statistic", "activation"], "--init-statistic"),
        (["--lr-alpha", "0.01", "--alpha-travel", "3"], "--alpha-travel"),
        (["--cap-order", "margin-per-parameter"], "--cap-order"),
    ],
)
def test_the_command_line_refuses_an_inert_knob_in_one_line_naming_its_flag(tmp_path, capsys, argv, flag):
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["train", "--method", "ard", *argv, "--data", str(tmp_path / "absent.csv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"error: {flag}: not used by method 'ard'" in err, err
    assert not out.exists()


# ---------------------------------------------------------------------------- a config changed after it was built
@pytest.mark.parametrize(
    ("name", "value", "fields"),
    [
        ("granularity", "block", "granularity"),
        ("r", "4", "r"),
        ("r", -3, "r"),
        ("lora_dropout", 5.0, "lora_dropout"),
        ("method", "ard", "method"),
        ("head_layout", "shared", "head_layout"),  # inert: the config is per matrix
    ],
)
def test_a_field_changed_after_construction_is_checked_by_validate_and_before_attach_uses_it(name, value, fields):
    config = DynaRankConfig(target_modules=["q_proj"], r=2, granularity="matrix")
    setattr(config, name, value)
    with pytest.raises(ConfigError) as info:
        config.validate()
    assert info.value.fields == (fields,)
    model = tiny_llama()
    with pytest.raises(ConfigError) as info:
        attach(model, config)
    assert info.value.fields == (fields,)
    assert not dynarank.elastic_layers(model)  # refused before anything was attached


def test_validate_keeps_a_valid_config_as_it_is_and_makes_a_numpy_number_set_later_a_python_one():
    config = DynaRankConfig(method="elalora", target_modules=["q_proj"], r=4, target_rank=2)
    config.validate()
    assert config == DynaRankConfig(method="elalora", target_modules=["q_proj"], r=4, target_rank=2)
    config.lora_dropout = np.float64(0.1)
    attach(tiny_llama(), config)
    assert type(config.lora_dropout) is float
