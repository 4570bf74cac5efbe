"""How the benchmarks set up a method when it must mirror another one (shared by the study scripts)."""

from __future__ import annotations


def stock_adalora_schedule(r: int, total_steps: int) -> dict:
    """dynarank AdaLoRA-style set up as the loop runs stock PEFT AdaLoRA: 1.5r -> r ranks per matrix, lora_alpha r,
    PEFT's tinit / tfinal / deltaT (PEFT's step index s is our t - 1: t_init = tinit + 1, t_final = tfinal - 1)."""
    return {
        "r": max(r + 1, round(1.5 * r)),
        "target_rank": r,
        "lora_alpha": r,
        "t_init_steps": max(1, total_steps // 10) + 1,
        "t_final_steps": max(1, total_steps // 5) - 1,
        "resize_every": max(1, total_steps // 40),
    }
