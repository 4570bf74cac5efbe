"""When the SVD-form methods (ElaLoRA, AdaLoRA) reallocate ranks, and by how much.

Time ``t`` counts COMPLETED optimizer steps (1..T). PEFT's AdaLoRA indexes the step just done
from 0 (``s = t - 1``); its ``tinit``/``tfinal`` equal our ``t_init - 1`` / ``t_final + 1``.

    end = T - t_final
    p(t) = clamp((t - t_init) / (end - t_init), 0, 1)              # progress of the budgeting phase
    budget(t) = floor(target + (start - target) * (1 - p)^3)        # AdaLoRA: cubic, start -> target
    b(t) = round(b0 * (1 - p^3))                                    # ElaLoRA: changes per round

Rounds run at ``t_init < t <= end`` when ``(t - t_init) % interval == 0``; AdaLoRA also forces
one at ``t == end`` so that the target is reached exactly there. Nothing changes in warm-up
(``t <= t_init``) or after ``end``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ConfigError

ROUNDS_WHEN_UNSET = 20  # resize_every=None: about this many rounds over the budgeting phase


def stock_adalora_phases(total_steps: int) -> dict[str, int]:
    """Stock PEFT AdaLoRA's phases as dynarank sets them for a run of ``total_steps`` (T) steps, in PEFT's terms:
    ``tinit`` = 10% and ``tfinal`` = 20% of the run, a round every ``deltaT`` = T / 40 steps (each at least 1).
    dynarank's AdaLoRA-style takes the same phases when its config leaves them unset: ``t_init = tinit + 1`` and
    ``t_final = tfinal - 1`` in this module's count (PEFT counts the step just done from 0). The same number of rounds
    and the same last one; where ``tinit`` is not a multiple of ``deltaT`` the others fall one or two steps apart, since
    :meth:`BudgetSchedule.is_round` counts the interval from the end of the warm-up and PEFT from the run's start
    (T = 130: rounds at steps 17, 20, 23, ... here, 16, 19, 22, ... in PEFT)."""
    return {
        "tinit": max(1, total_steps // 10),
        "tfinal": max(1, total_steps // 5),
        "deltaT": max(1, total_steps // 40),
    }


@dataclass(frozen=True)
class BudgetSchedule:
    """The phases of an SVD-form run, validated against the run length.

    Attributes:
        total_steps: T, optimizer steps of the run.
        t_init: steps of warm-up (scores are gathered, ranks do not change).
        t_final: steps at the end with ranks fixed.
        interval: steps between reallocation rounds.
    """

    total_steps: int
    t_init: int
    t_final: int
    interval: int

    @classmethod
    def resolve(
        cls,
        total_steps: int | None,
        *,
        warmup_frac: float,
        final_frac: float,
        t_init_steps: int | None = None,
        t_final_steps: int | None = None,
        interval: int | None = None,
        method: str = "ElaLoRA",
        need_interior_round: bool = True,
        defaulted: tuple[str, ...] = (),
    ) -> BudgetSchedule:
        """Turn fractions / step counts into a schedule, or raise a ValueError that says what to change.

        Args:
            total_steps: T; None raises (a data set of unknown length needs ``max_steps``).
            warmup_frac, final_frac: t_init and t_final as fractions of T (used when the steps are None).
            t_init_steps, t_final_steps: exact step counts (override the fractions).
            interval: steps between rounds (None: phase // 20, at least 1: 20 to 39 rounds).
            method: name used in the messages.
            need_interior_round: refuse an interval longer than the budgeting phase (ElaLoRA would
                then never reallocate; AdaLoRA still prunes once, at ``end``).
            defaulted: which of ``t_init_steps``, ``t_final_steps`` and ``interval`` the method filled in itself
                (the user gave none of them): a run too short for them is refused as too short, naming its length.
        """
        if total_steps is None:
            raise ConfigError(
                "total_steps",
                f"{method} needs the run's length in optimizer steps (its warm-up, reallocation rounds and final "
                "phase are placed in the run); a data set of unknown length needs it given.",
            )
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError("total_steps", f"must be a positive integer, got {total_steps!r}.")
        t_init = t_init_steps if t_init_steps is not None else round(warmup_frac * total_steps)
        t_final = t_final_steps if t_final_steps is not None else round(final_frac * total_steps)
        phase = total_steps - t_final - t_init
        steps_given = [
            name for name, v in (("t_init_steps", t_init_steps), ("t_final_steps", t_final_steps)) if v is not None
        ]
        if phase < 1:
            given = tuple(name for name in steps_given if name not in defaulted)
            if steps_given and not given:  # the method's own phases (AdaLoRA-style's stock ones): the run is short
                raise ConfigError(
                    "total_steps",
                    f"a run of {_steps(total_steps)} is too short for {method}'s default phases: its warm-up and final "
                    f"phase take {t_init} + {t_final} steps and leave no step to change ranks in. Train longer, or "
                    "give warmup_frac / final_frac.",
                )
            raise ConfigError(
                given or ("warmup_frac", "final_frac"),
                f"{method} has no budgeting phase: t_init ({t_init}) + t_final ({t_final}) >= total_steps "
                f"({total_steps}). Lower them, or train longer.",
            )
        unset = interval is None or "interval" in defaulted
        if interval is None:
            interval = max(1, phase // ROUNDS_WHEN_UNSET)
        if need_interior_round and interval >= phase:
            if unset:  # the interval is the method's own (1 here): the phase is what is too short
                raise ConfigError(
                    "total_steps",
                    f"a run of {_steps(total_steps)} is too short for {method}: its warm-up and final phase leave "
                    f"{phase} step(s) between t_init={t_init} and T - t_final={total_steps - t_final}, too few for a "
                    "reallocation round. Train longer, or lower warmup_frac / final_frac.",
                )
            raise ConfigError(
                "resize_every",
                f"{interval} is not shorter than {method}'s budgeting phase ({phase} steps between t_init={t_init} "
                f"and T - t_final={total_steps - t_final}): no reallocation round would run. Lower it (e.g. "
                f"{max(1, phase // ROUNDS_WHEN_UNSET)}) or widen the phase.",
            )
        return cls(total_steps=total_steps, t_init=t_init, t_final=t_final, interval=interval)

    @property
    def end(self) -> int:
        """T - t_final: the last step at which ranks may change."""
        return self.total_steps - self.t_final

    def progress(self, t: int) -> float:
        """p(t) in [0, 1]: 0 up to t_init, 1 from T - t_final on."""
        return min(1.0, max(0.0, (t - self.t_init) / (self.end - self.t_init)))

    def phase(self, t: int) -> str:
        """'warmup' (t <= t_init), 'active' (ranks may change) or 'final' (t > T - t_final)."""
        if t <= self.t_init:
            return "warmup"
        return "active" if t <= self.end else "final"

    def is_round(self, t: int, force_end: bool = False) -> bool:
        """Whether step ``t`` ends with a reallocation round (``force_end``: also at ``t == end``)."""
        if not self.t_init < t <= self.end:
            return False
        return (t - self.t_init) % self.interval == 0 or (force_end and t == self.end)

    def rounds(self, force_end: bool = False) -> list[int]:
        """Every step that runs a round."""
        return [t for t in range(self.t_init + 1, self.end + 1) if self.is_round(t, force_end)]


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def cubic_budget(schedule: BudgetSchedule, t: int, start: float, target: float) -> int:
    """AdaLoRA's budget: ``floor(target + (start - target) * (1 - p(t))^3)``; ``start`` in warm-up."""
    if t <= schedule.t_init:
        return math.floor(start)
    if t >= schedule.end:
        return math.floor(target)
    return math.floor(target + (start - target) * (1.0 - schedule.progress(t)) ** 3)


def cubic_changes(schedule: BudgetSchedule, t: int, b0: int) -> int:
    """ElaLoRA's changes per round: ``round(b0 * (1 - p(t)^3))`` (b0 at the start, 0 at the end)."""
    return round(b0 * (1.0 - schedule.progress(t) ** 3))
