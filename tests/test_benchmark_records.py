"""The benchmarks' record store: a long study resumes its runs; a quick check starts fresh."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from records import RecordStore  # noqa: E402


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
