"""The benchmarks' record store: a long study resumes its runs; a quick check starts fresh."""

from __future__ import annotations

import pytest
import torch

from records import RecordStore, machine_info


def key(record: dict) -> tuple:
    return (record["method"], record["seed"])


def test_a_store_resumes_the_runs_already_recorded(tmp_path):
    first = RecordStore(tmp_path / "study.json", key)
    first.add({"method": "ard", "seed": 0, "loss": 1.0})
    again = RecordStore(tmp_path / "study.json", key)
    assert again.has(("ard", 0)) and again.get(("ard", 0))["loss"] == 1.0


def test_a_fresh_store_forgets_earlier_runs_and_replaces_the_file_at_its_first_save(tmp_path):
    RecordStore(tmp_path / "study.json", key).add({"method": "ard", "seed": 0, "loss": 1.0})
    fresh = RecordStore(tmp_path / "study.json", key, fresh=True)
    assert not fresh.has(("ard", 0))  # measured again, not taken from an earlier version of the code
    fresh.add({"method": "lora", "seed": 0, "loss": 2.0})
    assert [key(r) for r in RecordStore(tmp_path / "study.json", key).runs] == [("lora", 0)]


def test_a_record_with_the_same_key_replaces_the_earlier_one(tmp_path):
    store = RecordStore(tmp_path / "study.json", key)
    store.add({"method": "ard", "seed": 0, "loss": 1.0})
    store.add({"method": "ard", "seed": 0, "loss": 0.5})
    assert [r["loss"] for r in RecordStore(tmp_path / "study.json", key).runs] == [0.5]


def test_superseded_records_leave_the_study_for_an_archive_that_says_why(tmp_path):
    store = RecordStore(tmp_path / "study.json", key)
    for method, seed in [("ard", 0), ("ard", 1), ("lora", 0)]:
        store.add({"method": method, "seed": seed, "loss": 1.0})
    archive = tmp_path / "study_superseded.json"
    assert store.move_out(lambda r: r["method"] == "ard", archive, "the method changed") == 2
    assert [key(r) for r in RecordStore(tmp_path / "study.json", key).runs] == [("lora", 0)]  # so they run again
    kept = RecordStore(archive, key).runs
    assert [key(r) for r in kept] == [("ard", 0), ("ard", 1)] and {r["superseded"] for r in kept} == {
        "the method changed"
    }
    assert store.move_out(lambda r: r["method"] == "ard", archive, "again") == 0  # nothing left to move
    store.add({"method": "ard", "seed": 0, "loss": 0.5})  # run again after the change, then changed once more
    assert store.move_out(lambda r: r["method"] == "ard", archive, "a second change") == 1
    kept = RecordStore(archive, key).runs
    assert [(key(r), r["loss"]) for r in kept] == [(("ard", 0), 1.0), (("ard", 1), 1.0), (("ard", 0), 0.5)]


def test_a_record_names_the_host_s_vector_instructions_and_library_versions():
    # The same seed is bitwise the same run on one kind of host only: torch's AVX2 and AVX512 kernels round sums
    # differently, and a 60-step LM run's loss moved by 0.011 from the host it was recorded on to another (same code).
    # A record says where it ran.
    import peft
    import transformers

    info = machine_info(torch_threads=2)
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (info["torch"], info["transformers"], info["peft"]) == (
        torch.__version__,
        transformers.__version__,
        peft.__version__,
    )
    assert info["torch_threads"] == 2 and info["nproc"] >= 1


def test_an_ablation_runs_at_its_base_method_s_learning_rate_with_only_its_setting_changed(tmp_path):
    import quality

    store = RecordStore(tmp_path / "study.json", quality.record_key)
    tune = dict(task="minilm", budget_r=quality.TASKS["minilm"]["tune_budget"], seed=0, steps=126)
    assert quality.tuning_jobs(store, "minilm", ["elalora-ortho0"], 126)[0][0] == "elalora"  # the base is tuned
    for lr, accuracy in zip(quality.ADAPTER_LRS, (0.7, 0.9, 0.8, 0.6)):
        store.add({**tune, "method": "elalora", "lr": lr, "val": {"accuracy": accuracy}})
    assert quality.tuning_jobs(store, "minilm", ["elalora-ortho0"], 126) == []
    assert quality.chosen_lr(store, "minilm", "elalora-ortho0", 126) == quality.ADAPTER_LRS[1]
    base = quality.train_spec("elalora", 1, 41_472, 3e-3, 0, 126, quality.TASKS["minilm"], "query")
    ablated = quality.train_spec("elalora-ortho0", 1, 41_472, 3e-3, 0, 126, quality.TASKS["minilm"], "query")
    assert ablated.dynarank == {**base.dynarank, "ortho_weight": 0.0}
    assert (ablated.method, ablated.r, ablated.lr) == (base.method, base.r, base.lr)


@pytest.mark.parametrize("r", [1, 2, 4, 12])
def test_the_study_runs_adalora_style_at_the_library_s_phases_and_output_scale(r):
    """The study starts AdaLoRA-style as stock AdaLoRA (1.5r) at the budget of LoRA r and leaves its phases to the
    library, whose defaults are stock AdaLoRA's (tests/test_adalora.py): what the study measures is what a user who
    sets nothing gets. Its lora_alpha is pinned at the target (stock AdaLoRA's, the classifiers' default), where
    every record of the method ran; "-scale1" puts it at the start, the causal LMs' default."""
    import quality

    from dynarank.defaults import DEFAULT_ALPHA_AT
    from dynarank.training.methods import stock_adalora_schedule

    spec = quality.train_spec("adalora-physical", r, 1000 * r, 3e-2, 0, 126, quality.TASKS["minilm"], "query")
    left = {"lora_alpha", "warmup_frac", "final_frac", "t_init_steps", "t_final_steps", "resize_every"}
    assert not left & set(spec.dynarank)
    assert spec.dynarank["alpha_at"] == DEFAULT_ALPHA_AT["classify"]["adalora-physical"] == "target"
    assert (spec.r, spec.dynarank["target_params"]) == (stock_adalora_schedule(r, 126)["init_r"], 1000 * r)


@pytest.mark.parametrize("method", ["ard", "elalora", "adalora-physical"])
def test_the_start_rank_the_library_names_is_the_one_the_study_runs(method):
    """dynarank.defaults.studied_start_rank (what the CLI tells a user who gives a budget without --r) is quality.py's
    rule at every studied budget."""
    import quality

    from dynarank.defaults import studied_start_rank

    for r in range(1, 13):
        spec = quality.train_spec(method, r, 1000 * r, 3e-2, 0, 126, quality.TASKS["minilm"], "query")
        assert studied_start_rank(method, float(r)) == spec.r, r


def run_record(method: str, seed: int, accuracy: float) -> dict:
    """The fields of a quality record that the summary reads."""
    return {
        "method": method,
        "budget_r": 2,
        "lr": 3e-2,
        "seed": seed,
        "test": {"accuracy": accuracy, "macro_f1": accuracy},
        "val": {"accuracy": accuracy},
        "adapter_parameters": 100,
        "adapter_parameters_start": 100,
        "adapter_parameters_mean_over_training": 100,
        "budget_parameters": 100,
        "state_bytes_start": 1,
        "state_bytes_end": 1,
        "seconds_per_step": 1.0,
        "peak_rss_mb": 1.0,
    }


def test_a_summary_lists_each_seed_beside_its_own_result_whatever_order_the_runs_finished_in():
    import quality

    runs = [run_record("elalora", 4, 0.84), run_record("elalora", 0, 0.80), run_record("elalora", 3, 0.83)]
    (row,) = quality.summarise(runs, "minilm", None)
    assert dict(zip(row["seeds"], row["by_seed"])) == {0: 0.80, 3: 0.83, 4: 0.84}


def test_paired_differences_take_each_seed_against_the_same_seed_of_the_baseline():
    import quality

    ours = {0: 0.86, 1: 0.84, 2: 0.85, 3: 0.90}  # seed 3 has no baseline run: left out
    theirs = {2: 0.84, 0: 0.85, 1: 0.84}
    runs = [run_record("elalora", s, a) for s, a in ours.items()] + [
        run_record("adalora", s, a) for s, a in theirs.items()
    ]
    rows = quality.summarise(runs, "minilm", None)
    (pair,) = [p for p in quality.paired(rows, quality.TASKS["minilm"]) if p["method"] == "elalora"]
    assert pair["n"] == 3 and (pair["won"], pair["tied"], pair["lost"]) == (2, 1, 0)
    assert abs(pair["mean"] - 0.02 / 3) < 1e-9  # (+0.01, 0, +0.01) / 3
    assert abs(pair["stderr"] - 0.005773502691896258 / 3**0.5) < 1e-9  # stdev(0.01, 0, 0.01) / sqrt(3)
    assert "| 2 | elalora | adalora | 3 | +0.0067 ± 0.0033 | 2 / 1 / 0 |" in quality.paired_table([pair], "minilm")


def test_for_a_loss_a_lower_value_counts_as_a_win():
    import quality

    task = {**quality.TASKS["minilm"], "higher_is_better": False}
    rows = [
        {"method": "elalora", "budget_r": 4, "seeds": [0, 1], "by_seed": [1.20, 1.30]},
        {"method": "adalora", "budget_r": 4, "seeds": [0, 1], "by_seed": [1.25, 1.28]},
    ]
    (pair,) = quality.paired(rows, task, baselines=("adalora",))
    assert (pair["won"], pair["lost"]) == (1, 1) and abs(pair["mean"] - 0.015) < 1e-9


def test_elalora_from_above_starts_at_stock_adalora_s_rank_with_the_same_parameter_budget():
    import quality

    task = quality.TASKS["minilm"]
    for r, start in ((1, 2), (2, 3), (6, 9)):
        base = quality.train_spec("elalora", r, 1000 * r, 3e-2, 0, 126, task, "query")
        above = quality.train_spec("elalora-from-above", r, 1000 * r, 3e-2, 0, 126, task, "query")
        assert above.dynarank == {**base.dynarank, "r": start} and base.dynarank["target_params"] == 1000 * r


def test_a_long_list_of_diverged_runs_is_named_below_the_plot_without_squashing_it(tmp_path, monkeypatch):
    import matplotlib.figure
    import quality

    rows = [{"method": "full", "mean": 0.87, "std": 0.0, "adapter_parameters": 1, "budget_r": 0}]
    rows += [
        {"method": "lora", "mean": 0.86, "std": 0.01, "adapter_parameters": 41_472 * r, "budget_r": r} for r in (1, 2)
    ]
    rows += [  # twelve diverged variants: the note naming them runs far wider than the figure
        {"method": f"elalora-variant-{i}", "mean": 0.5, "std": 0.0, "adapter_parameters": 82_944, "budget_r": 2}
        for i in range(12)
    ]
    heights = []
    original = matplotlib.figure.Figure.savefig

    def record_axes(figure, *args, **kwargs):
        heights.append(figure.axes[0].get_position().height)
        texts = [t.get_text() for t in figure.texts]
        assert any("elalora-variant-11" in t for t in texts)  # every diverged run is still named
        return original(figure, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record_axes)
    quality.plot(rows, "minilm", tmp_path / "plot.png")
    assert (tmp_path / "plot.png").exists()
    assert heights and heights[0] > 0.6  # the axes keep most of the figure (squashed to a sliver before)


def test_the_fresh_data_set_is_built_the_same_every_time_with_no_text_in_two_splits(tmp_path):
    """benchmarks/fresh_data.py's held-out check: five categories of the packaged Italian and Spanish chatterbot files,
    60 / 20 / 20, deterministic, each utterance in one split under one label (one found in two categories, left out;
    the first build kept it under each, in two splits)."""
    import csv

    import fresh_data

    sizes = fresh_data.build_data(tmp_path / "a")
    assert sizes == fresh_data.build_data(tmp_path / "b") == {"train": 853, "val": 284, "test": 284}
    read = {name: list(csv.DictReader((tmp_path / "a" / f"{name}.csv").open(encoding="utf-8"))) for name in sizes}
    assert (tmp_path / "a" / "train.csv").read_bytes() == (tmp_path / "b" / "train.csv").read_bytes()
    texts = [{row["text"] for row in rows} for rows in read.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert {row["label"] for rows in read.values() for row in rows} == set(fresh_data.CATEGORIES)
