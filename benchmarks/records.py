"""What the benchmark scripts share: a JSON record store, a two-core process pool, the projection type of a
module (the rows of their rank tables), and the machine a record ran on.

A study is a list of records, one per (configuration, seed) run, kept in one JSON file with the
commands that produced them. A run already recorded is not run again (unless forced), so a long
study can be stopped and continued, and its tables are redrawn from every record.
"""

from __future__ import annotations

import concurrent.futures as futures
import json
import multiprocessing
import os
import platform
from collections.abc import Callable, Iterable
from pathlib import Path

# Module-name fragment -> projection type (MiniLM / SmolLM2 names); the first fragment a name holds wins.
PROJECTION_OF = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn-out",
    "intermediate.dense": "ffn-in",
    "output.dense": "ffn-out",
    "q_proj": "query",
    "k_proj": "key",
    "v_proj": "value",
    "o_proj": "attn-out",
}
PROJECTIONS = tuple(dict.fromkeys(PROJECTION_OF.values()))  # query, key, value, attn-out, ffn-in, ffn-out


def projection(module: str) -> str:
    """The projection type of an adapted module ('bert.encoder.layer.3.attention.output.dense' -> 'attn-out')."""
    return next(kind for fragment, kind in PROJECTION_OF.items() if fragment in module)


def machine_info(**extra) -> dict:
    """What a record's numbers depend on beyond the code: the CPU (its model, and the vector instructions torch's
    kernels dispatch to: AVX2 and AVX512 round sums differently, so the same seed gives bitwise-equal runs on one kind
    of host but not across kinds), core count and library versions; ``extra`` is added as given."""
    import peft
    import torch
    import transformers

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        **extra,
    }


class RecordStore:
    """Records of one study in ``path`` (JSON: {"commands": [...], "runs": [...], ...})."""

    def __init__(self, path: Path, key: Callable[[dict], tuple], *, fresh: bool = False) -> None:
        """Resume the records in ``path``, or with ``fresh`` start empty (the file is replaced at the first save)."""
        self.path = Path(path)
        self.key = key
        resume = self.path.is_file() and not fresh
        self.data = json.loads(self.path.read_text()) if resume else {"commands": [], "runs": []}

    @property
    def runs(self) -> list[dict]:
        return self.data["runs"]

    def has(self, key: tuple) -> bool:
        return any(self.key(r) == key for r in self.runs)

    def get(self, key: tuple) -> dict | None:
        return next((r for r in self.runs if self.key(r) == key), None)

    def add(self, record: dict) -> None:
        """Add ``record``, replacing an earlier record with the same key; saved at once."""
        key = self.key(record)
        self.data["runs"] = [r for r in self.runs if self.key(r) != key] + [record]
        self.save()

    def move_out(self, which: Callable[[dict], bool], archive: Path, reason: str) -> int:
        """Move the records ``which`` picks to ``archive`` (another store's file, appended to, with ``reason``):
        kept for comparison, no longer part of this study. Returns how many moved."""
        moving = [r for r in self.runs if which(r)]
        if not moving:
            return 0
        old = RecordStore(archive, lambda r: (*self.key(r), r.get("superseded")))  # one version per reason
        for record in moving:
            old.add({**record, "superseded": reason})
        self.data["runs"] = [r for r in self.runs if not which(r)]
        self.save()
        return len(moving)

    def note_command(self, command: str) -> None:
        if command not in self.data["commands"]:
            self.data["commands"].append(command)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def run_pool(
    fn: Callable[..., dict],
    jobs: Iterable[tuple],
    n_workers: int,
    on_result: Callable[[tuple, dict], None],
) -> list[tuple]:
    """Run ``fn(*args)`` for every ``args`` in ``jobs`` in ``n_workers`` fresh processes (spawned, so each
    sets its own thread count); ``on_result(args, record)`` as each finishes. Returns the failed jobs
    (their exceptions are printed; the other runs go on)."""
    failed = []
    context = multiprocessing.get_context("spawn")
    # One process per run: peak memory (ru_maxrss) and imports are the run's own.
    with futures.ProcessPoolExecutor(max_workers=n_workers, mp_context=context, max_tasks_per_child=1) as pool:
        pending = {pool.submit(fn, *args): args for args in jobs}
        for job in futures.as_completed(pending):
            args = pending[job]
            try:
                record = job.result()
            except Exception as exc:  # keep the other runs going; report at the end
                print(f"FAILED {args}: {exc!r}", flush=True)
                failed.append(args)
                continue
            on_result(args, record)
    return failed
