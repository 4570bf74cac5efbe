"""A run directory: every file ``dynarank train`` writes, by name, with typed reads and writes whose errors name the
file. Nothing else in the CLI spells a file name of a run.

RUN_DIR/
  config.yaml          the options the run was started with (``--resume`` continues with them; ``--config`` starts the
                       same run again), and what it read or resolved: label names, data sha256, where the rate and
                       start rank came from, the learning-rate schedule and the weight decay
  metrics.jsonl        per step: loss, lr, trainable parameters, total rank; last line: eval metrics
  ranks.jsonl          rank of every group, at the start, at every resize and at the end
  summary.json         method, rate, schedule, parameters, metrics, final rank of every module (no rank: null), wall
                       time, peak memory, and what the rank controller resolved (``settings``)
  adapter/             plain PEFT adapter (stock PeftModel.from_pretrained loads it), and dynarank_run.json
  dynarank_adapter/    native adapter with its rank layout (dynarank methods)
  model/               the full model (method 'full')
  checkpoints/         the whole training state every --save-every steps (dynarank.checkpoint)
  training_curves.png, ranks_heatmap.png, ranks_over_time.png
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .. import checkpoint
from ..defaults import TASKS
from ..files import RunFileError, read_json, read_jsonl, read_yaml, replace_file, sha256_of
from ..safe_load import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..training.methods import ALL_METHODS
from ..training.metrics_log import MetricsLog
from ..training.models import QUANTIZATIONS

# Beside every PEFT adapter dynarank writes (a run's, or an export): the base model, task, labels and method to load
# it with, and the sha256 of its weights file.
ADAPTER_INFO = "dynarank_run.json"
_INFO_TYPES = {
    "model": str,
    "task": str,
    "method": str,
    "adapter_sha256": str,
    "max_length": int,
    "label_names": list,
    "quantize": str,
}


def new_directory(out: str | Path | None, prefix: str) -> Path:
    """The directory to create (default ``runs/<prefix>-<time>``): it must not exist (an existing directory is
    refused even when empty, so that nothing of the user's is ever written into or removed), and no file may stand
    in its way."""
    path = Path(out) if out else Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() or path.is_symlink():
        hint = ""
        if RunDir(path).holds_a_stopped_run():
            hint = (
                f" It holds a run that stopped before it finished: `dynarank train --resume {path}` continues it "
                "(from its last checkpoint, or from the start if it has none), or delete it."
            )
        raise FileExistsError(f"{path} already exists; choose another --out (nothing is written into it).{hint}")
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise NotADirectoryError(f"{path} cannot be created: {blocker} is a file, not a directory.")
    return path


def first_missing(path: Path) -> Path:
    """The outermost directory that creating ``path`` creates (what a failed command removes)."""
    missing = path
    for parent in path.parents:
        if parent.exists():
            break
        missing = parent
    return missing


class RunDir:
    """The files of one run directory."""

    OPTIONS: ClassVar[str] = "config.yaml"
    METRICS: ClassVar[str] = "metrics.jsonl"
    RANKS: ClassVar[str] = "ranks.jsonl"
    SUMMARY: ClassVar[str] = "summary.json"
    ADAPTER: ClassVar[str] = "adapter"
    NATIVE_ADAPTER: ClassVar[str] = "dynarank_adapter"
    FULL_MODEL: ClassVar[str] = "model"
    CURVES: ClassVar[str] = "training_curves.png"
    HEATMAP: ClassVar[str] = "ranks_heatmap.png"
    EVOLUTION: ClassVar[str] = "ranks_over_time.png"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def of(cls, run: RunDir | str | Path) -> RunDir:
        return run if isinstance(run, RunDir) else cls(run)

    # ------------------------------------------------------------------ where things are
    @property
    def adapter(self) -> Path:
        """The plain PEFT adapter (every method but 'full')."""
        return self.path / self.ADAPTER

    @property
    def native_adapter(self) -> Path:
        """The native adapter with its rank layout (dynarank methods)."""
        return self.path / self.NATIVE_ADAPTER

    @property
    def full_model(self) -> Path:
        """The fine-tuned model (method 'full')."""
        return self.path / self.FULL_MODEL

    def file(self, name: str) -> Path:
        """The run's file ``name`` (one of the names above: RunDir.CURVES, ...)."""
        return self.path / name

    def metrics_log(self, enabled: bool = True) -> MetricsLog:
        return MetricsLog(self.path / self.METRICS, enabled=enabled)

    # ------------------------------------------------------------------ what it holds
    def is_bare_adapter(self) -> bool:
        """A PEFT adapter directory handed in place of a run."""
        return (self.path / ADAPTER_CONFIG).is_file() and not (self.path / self.SUMMARY).is_file()

    def holds_a_stopped_run(self) -> bool:
        """The options of a run, and no summary: a run that stopped before it finished."""
        return (self.path / self.OPTIONS).is_file() and not (self.path / self.SUMMARY).is_file()

    def checkpoint_step(self) -> int | None:
        """The step of the newest complete checkpoint; None when there is none."""
        if not checkpoint.list_checkpoints(self.path):
            return None
        return checkpoint.latest(self.path)[1]["step"]

    def has_checkpoints(self) -> bool:
        return bool(checkpoint.list_checkpoints(self.path))

    # ------------------------------------------------------------------ reads and writes
    def read_options(self) -> dict[str, Any]:
        """The options the run was started with (errors name the file)."""
        path = self.path / self.OPTIONS
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a dynarank run directory (no {self.OPTIONS}); nothing to resume."
            )
        return read_yaml(path)

    @property
    def options_file(self) -> Path:
        return self.path / self.OPTIONS

    def write_options(self, options: dict[str, Any]) -> None:
        replace_file(self.path / self.OPTIONS, yaml.safe_dump(options, sort_keys=True).encode())

    def recorded_max_length(self, summary: dict) -> int | None:
        """The truncation the run trained with (summary.json; config.yaml of runs written before it was there)."""
        if summary.get("max_length"):
            return summary["max_length"]
        path = self.path / self.OPTIONS
        if not path.is_file():
            return None
        value = read_yaml(path).get("max_length")
        if value is not None and not _positive_int(value):
            raise RunFileError(f"{path} is damaged: its max_length is {value!r}.")
        return value

    def read_summary(self) -> dict[str, Any]:
        """summary.json, checked for what the commands read from it (errors name the file)."""
        path = self.path / self.SUMMARY
        if not path.is_file():
            raise FileNotFoundError(f"{self.path} is not a dynarank run directory (no {self.SUMMARY}).")
        summary = read_json(path)
        problem = None
        if summary.get("method") not in ALL_METHODS:
            problem = f"its method is {summary.get('method')!r}"
        elif summary.get("task", "classify") not in TASKS:
            problem = f"its task is {summary.get('task')!r}"
        elif summary.get("task") != "causal-lm" and not _names(summary.get("label_names")):
            problem = "it lists no label names"
        elif summary["method"] != "full" and not isinstance(summary.get("model"), str):
            problem = "it names no base model"
        elif summary.get("quantize") not in (None, *QUANTIZATIONS):
            problem = f"its quantize is {summary.get('quantize')!r}"
        elif summary.get("max_length") is not None and not _positive_int(summary["max_length"]):
            problem = f"its max_length is {summary['max_length']!r}"
        if problem:
            raise RunFileError(f"{path} is damaged: {problem}.")
        return summary

    def resolved_settings(self) -> dict[str, Any]:
        """What the run's rank controller resolved from its config, by config field (e.g. ARD's ard_lambda when none
        was given): summary.json's ``settings`` (the controller's resolved values; the config as given left out);
        {} before the run has finished, and for a method without a controller."""
        path = self.path / self.SUMMARY
        settings = read_json(path).get("settings") if path.is_file() else None
        if not isinstance(settings, dict):
            return {}
        resolved = settings.get("resolved")  # ARD nests them; the SVD methods list them beside the config
        flat = {k: v for k, v in settings.items() if k not in ("config", "resolved")}
        return {**flat, **(resolved if isinstance(resolved, dict) else {})}

    def write_summary(self, summary: dict[str, Any]) -> None:
        replace_file(self.path / self.SUMMARY, json.dumps(summary, indent=1).encode())

    def write_ranks(self, history: list[dict]) -> None:
        replace_file(self.path / self.RANKS, "".join(json.dumps(s) + "\n" for s in history).encode())

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl ([] when there is none)."""
        return _read_log(self.path / self.METRICS)

    def read_ranks(self) -> list[dict]:
        """ranks.jsonl ([] when there is none)."""
        return _read_log(self.path / self.RANKS)


def _read_log(path: Path) -> list[dict]:
    return read_jsonl(path) if path.is_file() else []


def _names(value) -> bool:
    return isinstance(value, list) and len(value) >= 2 and all(isinstance(v, str) for v in value)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# ---------------------------------------------------------------------------- beside a PEFT adapter
def write_adapter_info(adapter_dir: Path, summary: dict) -> None:
    """dynarank_run.json beside a PEFT adapter: what to load it with (the base quantized as it trained, when the run
    had ``--quantize``), and the sha256 of its weights file."""
    info = {k: summary.get(k) for k in ("model", "task", "label_names", "method", "max_length")}
    if summary.get("quantize") is not None:
        info["quantize"] = summary["quantize"]
    weights = Path(adapter_dir) / ADAPTER_WEIGHTS
    info["adapter_sha256"] = sha256_of(weights) if weights.is_file() else None
    replace_file(Path(adapter_dir) / ADAPTER_INFO, json.dumps(info, indent=1).encode())


def read_adapter_info(adapter_dir: Path) -> dict:
    """dynarank_run.json of a PEFT adapter directory ({} when there is none), checked (errors name the file)."""
    path = Path(adapter_dir) / ADAPTER_INFO
    if not path.is_file():
        return {}
    info = read_json(path)
    mistyped = (k for k, kind in _INFO_TYPES.items() if info.get(k) is not None and not isinstance(info[k], kind))
    wrong = next(mistyped, None)
    if wrong is None and info.get("task") not in (None, *TASKS):
        wrong = "task"
    if wrong is None and info.get("quantize") not in (None, *QUANTIZATIONS):
        wrong = "quantize"
    if wrong is None and info.get("label_names") is not None and not _names(info["label_names"]):
        wrong = "label_names"
    if wrong is not None:
        raise RunFileError(f"{path} is damaged: its {wrong} is {info[wrong]!r}.")
    return info
