"""How the benchmarks set up a method when it must mirror another one (shared by the study scripts)."""

from __future__ import annotations

from dynarank.training.methods import stock_adalora_schedule as peft_adalora_schedule


def stock_adalora_sizes(r: int) -> dict:
    """dynarank AdaLoRA-style sized as the loop runs stock PEFT AdaLoRA at rank ``r`` (``peft_adalora_schedule``):
    1.5r -> r ranks per matrix. Left unset, its phases (PEFT's tinit / tfinal / deltaT) and its output scale
    (lora_alpha = target_r over init_r) are stock AdaLoRA's: the library's defaults (AdaLoRAConfig), which the study's
    records ran as pinned settings before they became the defaults (tests/test_adalora.py holds them equal)."""
    peft = peft_adalora_schedule(r, 1)
    return {"r": peft["init_r"], "target_rank": peft["target_r"]}
