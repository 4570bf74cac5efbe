"""The resolved settings of one ARD-LoRA run: the preset applied, the phases placed in the run."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..config import ARD_PAPER_PRESET, ARDConfig, ConfigError
from .schedules import ROUNDS_WHEN_UNSET, BudgetSchedule

PAPER = ARD_PAPER_PRESET  # what preset="paper" sets (config.py, where the inert-knob check reads it too)
PHASES = ("warmup_frac", "final_frac")  # knobs of the ARD config that the settings turn into the schedule
DEFAULT_LAMBDA = {"relative": 1.0, "gradient": 1.0, "absolute": 0.01}
# ard_beta=None: a tenth of the mode's default l1 strength (absolute: the paper's lambda * beta = 0.01 * 0.1).
DEFAULT_BETA = {mode: 0.1 * value for mode, value in DEFAULT_LAMBDA.items()}


def mask_settings(config) -> tuple[int, int, bool]:
    """(r0, rank_floor, soft mask) of an ARD config, its preset applied: what the rank mask is computed from."""
    values = {"rank_floor": config.rank_floor, "mask": config.mask}
    if config.preset == "paper":
        values.update({k: PAPER[k] for k in values})
    return config.r, values["rank_floor"], values["mask"] == "soft"


@dataclass
class ARDSettings:
    """The resolved knobs of one run (preset applied, defaults computed from the run length)."""

    r0: int
    ard_lambda: float
    lambda_mode: str
    ard_beta: float
    tv_form: str
    lr_alpha: float
    lr: float | None
    mask: str
    readout: str
    rank_floor: int
    schedule: BudgetSchedule  # warm-up = t_init, the final phase = t_final, resizes every ``interval`` steps
    target_params: int | None = None

    @property
    def warmup_steps(self) -> int:
        return self.schedule.t_init

    @property
    def final_start(self) -> int:
        """T - t_final: the step of the last resize; ranks are fixed after it."""
        return self.schedule.end

    @property
    def resize_every(self) -> int:
        return self.schedule.interval

    @classmethod
    def resolve(cls, config, total_steps: int, alpha_range: float = 1.0) -> ARDSettings:
        """``alpha_range``: the mean starting alpha of the groups that start with ranks (1 for the uniform start at
        r0; ranks / r0 after ``rank_init='data'``). lr_alpha=None scales with it, so that a head crosses its own
        range ``alpha_travel`` times over the active phase, whichever rank it starts at."""
        values = {k: getattr(config, k) for k in _config_knobs()}
        values["lr"] = None
        if config.preset == "paper":
            values.update(PAPER)
        warmup = round(values.pop("warmup_frac") * total_steps)
        if values["lambda_mode"] != "absolute" and warmup > 0:
            warmup = max(warmup, 2)  # calibration needs a first and a last warm-up step, even in short runs
        final_start = total_steps - round(values.pop("final_frac") * total_steps)
        active = final_start - warmup
        if active < 1:
            raise ConfigError(
                ("warmup_frac", "final_frac"),
                f"leave no active phase in a run of {total_steps} steps: lower them, or train longer.",
            )
        if values["lambda_mode"] != "absolute" and warmup < 2:
            raise ConfigError(
                ("warmup_frac", "lambda_mode"),
                f"lambda_mode {values['lambda_mode']!r} calibrates lambda during the warm-up, which has fewer than 2 "
                f"steps in a run of {total_steps}: raise the warm-up fraction, train longer, or use lambda_mode "
                "'absolute'.",
            )
        if values["ard_lambda"] is None:
            values["ard_lambda"] = DEFAULT_LAMBDA[values["lambda_mode"]]
        if values["ard_beta"] is None:
            values["ard_beta"] = DEFAULT_BETA[values["lambda_mode"]]
        if values["lr_alpha"] is None:
            values["lr_alpha"] = config.alpha_travel * alpha_range / active
        interval = config.resize_every or max(1, active // ROUNDS_WHEN_UNSET)
        schedule = BudgetSchedule(total_steps, t_init=warmup, t_final=total_steps - final_start, interval=interval)
        return cls(r0=config.r, schedule=schedule, **values)


def _config_knobs() -> list[str]:
    """The fields of ARDConfig that :meth:`ARDSettings.resolve` reads as they are: those the settings carry under
    the same name and the phases (``PHASES``)."""
    carried = {f.name for f in fields(ARDSettings)} | set(PHASES)
    return [f.name for f in fields(ARDConfig) if f.name in carried]
