"""How the read-out ranks move over training: changes and reversals per group (oscillation alarm)."""

from __future__ import annotations

import torch


class RankMotion:
    """Per group: the last read-out rank, the last direction it moved in, and how often it reversed.

    ``rank_changes`` counts every read-out change over all groups (the fewest possible, when every
    group falls monotonically to its final rank, is the sum of the falls).
    """

    def __init__(self) -> None:
        self.last: dict[str, torch.Tensor] = {}
        self.direction: dict[str, torch.Tensor] = {}
        self.flips: dict[str, torch.Tensor] = {}
        self.rank_changes = 0

    def track(self, readouts: dict[str, list[int]]) -> None:
        """Record one step's read-out ranks, by module."""
        for name, ranks in readouts.items():
            now = torch.tensor(ranks)
            last = self.last.get(name)
            if last is not None and last.shape == now.shape:
                move = torch.sign(now - last)
                prev = self.direction[name]
                self.flips[name] += ((move != 0) & (prev != 0) & (move != prev)).long()
                self.rank_changes += int((move != 0).sum())
                self.direction[name] = torch.where(move != 0, move, prev)
            else:
                self.direction[name] = torch.zeros_like(now)
                self.flips[name] = torch.zeros_like(now)
            self.last[name] = now

    def reversing_fraction(self) -> float:
        """Fraction of groups whose read-out rank reversed direction at least twice."""
        counts = [int((f >= 2).sum()) for f in self.flips.values()]
        total = sum(len(f) for f in self.flips.values())
        return sum(counts) / max(1, total)

    def state_dict(self) -> dict:
        return {
            "flips": {k: v.tolist() for k, v in self.flips.items()},
            "rank_changes": self.rank_changes,
            "last_readout": {k: v.tolist() for k, v in self.last.items()},
            "last_move": {k: v.tolist() for k, v in self.direction.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        def longs(key: str) -> dict[str, torch.Tensor]:
            return {k: torch.tensor(v, dtype=torch.long) for k, v in state[key].items()}

        self.flips = longs("flips")
        self.rank_changes = int(state["rank_changes"])
        self.last = longs("last_readout")
        self.direction = longs("last_move")
