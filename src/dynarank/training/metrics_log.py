"""The metrics log of a training run (one JSON object per line), kept consistent with the run's checkpoints: synced
to disk whenever one is written, cut back to the checkpoint's step when a run resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..files import RunFileError, naming, read_jsonl, replace_file


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended as training goes (each line handed to the OS as it is
    written, so a killed process loses none).

    ``sync()`` forces what was written to disk; the loop calls it before every checkpoint, so the log on disk
    always reaches at least the newest checkpoint's step. ``resume_at(step)`` cuts the log back to the lines of
    steps up to ``step`` (what the checkpoint holds; the final evaluation line and later steps are redone),
    atomically, and tolerates the torn last line of a kill.
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True) -> None:
        self.path = Path(path)
        self._file = None
        self.enabled = enabled

    def resume_at(self, step: int) -> None:
        """Keep the training-step lines of steps 1..``step``; drop everything after."""
        if not self.enabled:
            return
        kept = []
        if self.path.is_file():
            for record in read_jsonl(self.path):
                logged = record.get("step", 0)
                if not isinstance(logged, int) or isinstance(logged, bool):
                    raise RunFileError(f"{self.path}: a line has step {logged!r}, not a step number: it is damaged.")
                if logged <= step and "loss" in record:  # not the final evaluation line
                    kept.append(record)
        replace_file(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            with naming(self.path):
                self._file = self.path.open("a", encoding="utf-8")
        with naming(self.path):
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()  # a killed run keeps every line written (the OS holds it; sync() forces the disk)

    def sync(self) -> None:
        """Force every line written so far to disk."""
        if self._file is not None:
            with naming(self.path):
                self._file.flush()
                os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            with naming(self.path):
                self._file.close()
            self._file = None
