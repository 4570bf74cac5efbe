"""How the benchmarks set up a method when it must mirror another one (shared by the study scripts)."""

from __future__ import annotations

from dynarank.training.methods import stock_adalora_schedule as peft_adalora_schedule


def stock_adalora_schedule(r: int, total_steps: int) -> dict:
    """dynarank AdaLoRA-style set up as the loop runs stock PEFT AdaLoRA (``peft_adalora_schedule``): 1.5r -> r ranks
    per matrix, lora_alpha r, PEFT's tinit / tfinal / deltaT (PEFT's step index s is our t - 1: t_init = tinit + 1,
    t_final = tfinal - 1)."""
    peft = peft_adalora_schedule(r, total_steps)
    return {
        "r": peft["init_r"],
        "target_rank": peft["target_r"],
        "lora_alpha": peft["target_r"],
        "t_init_steps": peft["tinit"] + 1,
        "t_final_steps": peft["tfinal"] - 1,
        "resize_every": peft["deltaT"],
    }
