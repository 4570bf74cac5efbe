"""The failure signatures the ARD-LoRA paper names, checked at every resize: rank collapse (lambda too
high), rank explosion (lambda too low), frozen alphas (lr_alpha too small) and oscillating ranks (beta
too low). Each becomes one warning that names the knob to turn."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import StepRecord

if TYPE_CHECKING:
    from .ard import ARDController

COLLAPSE_FRACTION = 0.8  # groups at the floor, early in the active phase
EXPLOSION_FRACTION = 0.8  # groups pinned at their capacity, late in the active phase
OSCILLATION_FRACTION = 0.25  # groups that reversed direction twice or more


def check_signatures(ard: ARDController, record: StepRecord) -> None:
    """Warn (once each) about the signatures that show at this resize."""
    s = ard.settings
    progress = (ard.step - s.warmup_steps) / max(1, s.final_start - s.warmup_steps)
    ranks = ard.group_ranks  # (N,) live ranks, CPU
    n = max(1, ranks.numel())
    budgeted = s.target_params is not None  # the budget, not lambda, sets the size: no collapse/explosion
    at_floor = float((ranks <= s.rank_floor).sum()) / n
    if not budgeted and progress <= 0.5 and at_floor >= COLLAPSE_FRACTION:
        ard.warn_once(
            "collapse",
            f"rank collapse: {at_floor:.0%} of groups at the floor ({s.rank_floor}) after {progress:.0%} of the "
            f"active phase; lambda is too high (ard_lambda={s.ard_lambda:g}): lower it.",
            record,
        )
    alpha = ard.gates.alpha.detach().float().cpu()
    pinned = float(((ranks >= s.r0) & (alpha * s.r0 > s.r0 - 0.5)).sum()) / n  # never cut, top slot still on
    if not budgeted and progress >= 0.5 and pinned >= EXPLOSION_FRACTION:
        ard.warn_once(
            "explosion",
            f"rank explosion: {pinned:.0%} of groups pinned at their capacity and pushing up after {progress:.0%} "
            f"of the active phase; lambda is too low (ard_lambda={s.ard_lambda:g}) or r too small: raise "
            "ard_lambda or r.",
            record,
        )
    moved = float((alpha - ard.start_alpha.float().cpu()).abs().max()) if alpha.numel() else 0.0
    if progress >= 0.5 and moved * s.r0 < 1.0:
        ard.warn_once(
            "frozen",
            f"alpha has not moved one rank step after {progress:.0%} of the active phase (max change {moved:.2g}); "
            f"lr_alpha={s.lr_alpha:g} is too small for this run: raise it or leave lr_alpha=None.",
            record,
        )
    flips = ard.motion.reversing_fraction()
    if flips >= OSCILLATION_FRACTION:
        advice = (
            "use mask='hard' (measured: no oscillation with the hard mask), or raise ard_beta by orders of "
            f"magnitude (now {s.ard_beta:g})."
            if s.mask == "soft"
            else f"raise ard_beta (now {s.ard_beta:g}) or lower lr_alpha."
        )
        ard.warn_once(
            "oscillation",
            f"oscillating ranks: {flips:.0%} of groups changed direction twice or more across resizes; {advice}",
            record,
        )
