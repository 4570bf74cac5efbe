"""How the read-out ranks move over training: changes and reversals per group (oscillation alarm).

Kept as flat (N,) tensors over every group of the model, on the alphas' device: tracking a step is a
handful of tensor operations and never waits for the device; counts are read only when asked for.
"""

from __future__ import annotations

import torch


class RankMotion:
    """Per group: the last read-out rank, the last direction it moved in, and how often it reversed.

    ``rank_changes`` counts every read-out change over all groups (the fewest possible, when every
    group falls monotonically to its final rank, is the sum of the falls).
    """

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None  # (N,) long
        self.direction: torch.Tensor | None = None  # (N,) long: -1, 0 (not moved yet), +1
        self.flips: torch.Tensor | None = None  # (N,) long
        self._changes: torch.Tensor | int = 0  # a device scalar while tracking

    def track(self, readout: torch.Tensor) -> None:
        """Record one step's read-out ranks of every group, (N,) long."""
        if self.last is None or self.last.shape != readout.shape:
            self.direction = torch.zeros_like(readout)
            self.flips = torch.zeros_like(readout)
        else:
            last = self.last.to(readout.device)
            move = torch.sign(readout - last)
            prev = self.direction.to(readout.device)
            self.flips = self.flips.to(readout.device) + ((move != 0) & (prev != 0) & (move != prev)).long()
            self._changes = self._changes + (move != 0).sum()
            self.direction = torch.where(move != 0, move, prev)
        self.last = readout.clone()

    @property
    def rank_changes(self) -> int:
        return int(self._changes)

    def reversals(self) -> int:
        """Direction reversals summed over groups."""
        return 0 if self.flips is None else int(self.flips.sum())

    def reversing_fraction(self) -> float:
        """Fraction of groups whose read-out rank reversed direction at least twice."""
        if self.flips is None or not self.flips.numel():
            return 0.0
        return float((self.flips >= 2).sum()) / self.flips.numel()

    def state_dict(self) -> dict:
        def listed(t: torch.Tensor | None) -> list[int] | None:
            return None if t is None else t.tolist()

        return {
            "flips": listed(self.flips),
            "rank_changes": self.rank_changes,
            "last_readout": listed(self.last),
            "last_move": listed(self.direction),
        }

    def load_state_dict(self, state: dict) -> None:
        def longs(key: str) -> torch.Tensor | None:
            value = state.get(key)
            return None if value is None else torch.tensor(value, dtype=torch.long)

        self.flips = longs("flips")
        self._changes = int(state["rank_changes"])
        self.last = longs("last_readout")
        self.direction = longs("last_move")
