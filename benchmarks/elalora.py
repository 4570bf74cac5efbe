"""ElaLoRA and AdaLoRA (physical pruning) on the planted-rank task, against ARD, the oracle and stock PEFT.

Task (planted_task.py): frozen random base (d_in 64, 8 heads of 16), teacher = base + planted
per-head changes of ranks [0,1,2,4,8,0,3,6], label noise 0.1, MSE, 2,000 steps, batch 64, lr 3e-3.
Every method ends at the oracle's trainable budget (24 head-ranks = 1,920 adapter parameters):

* ElaLoRA per head, r=3 (24 ranks from the start; rank and parameters conserved), and ElaLoRA per head
  r=8 -> target_rank 3, pruning into the budget on AdaLoRA's schedule while it reallocates (with and
  without switch_off, which lets a head give up its last rank);
* AdaLoRA on the engine ('adalora-physical'), per head, r=8 -> target_rank 3 (64 -> 24 ranks);
* stock PEFT AdaLoRA per matrix, init_r 15 -> target_r 10 (10 x 192 = 1,920), the same phases and scale as
  dynarank's AdaLoRA-style takes by default, and its orthogonality penalty at the papers' weight 0.1 (PEFT's
  default is 0.5);
* ARD (r=8) with each head's own A rows (the planted heads read independent inputs), plain LoRA per matrix
  r=10 (on the engine, and stock PEFT), stock PEFT DoRA per matrix r=10 (plus its 128 magnitudes), the oracle
  (per-head LoRA cut to the truth), and full fine-tuning of the projection (8,192 parameters: what no budget
  limits).

Training memory is counted as 3 x the trainable parameters (fp32 weights + AdamW's two moments), at
its peak and averaged over the steps; PEFT keeps every initial rank (and E) allocated to the end.

    python benchmarks/elalora.py            # 3 seeds, about 2 minutes on 2 cores
    python benchmarks/elalora.py --seeds 1  # quick
"""

from __future__ import annotations

import statistics
import time
import warnings
from types import SimpleNamespace

import torch
from torch import nn

from dynarank import DynaRankConfig
from dynarank.config import ORTHO_WEIGHT
from dynarank.controllers.schedules import stock_adalora_phases
from planted_task import PlantedTask, make_planted_task, study_main, train_planted, within_one

TARGET = ["query"]
ORACLE = "oracle (true ranks)"


def methods() -> dict[str, dict]:
    """name -> DynaRankConfig keyword arguments ('fixed': cut to the true ranks; 'peft': stock PEFT AdaLoRA)."""
    ela = {"method": "elalora", "r": 3, "target_modules": TARGET, "granularity": "head"}
    ada = {"method": "adalora-physical", "r": 8, "target_rank": 3, "target_modules": TARGET, "granularity": "head"}
    return {
        ORACLE: {"method": "dynarank-lora", "r": 8, "target_modules": TARGET, "fixed": True},
        "ARD own A (r=8)": {"method": "ard", "r": 8, "target_modules": TARGET, "head_layout": "own"},
        "ElaLoRA per head r=3": dict(ela),
        "ElaLoRA, ortho_weight=0.1 (the papers')": dict(ela, ortho_weight=ORTHO_WEIGHT),  # the default here: 0
        "ElaLoRA, moments reset (authors')": dict(ela, reset_optimizer_on_resize=True),
        "ElaLoRA, b0=8 k=3": dict(ela, b_changes=8, k_candidates=3),
        "ElaLoRA per head 8->3 (prunes into the budget)": dict(ela, r=8, target_rank=3),
        "ElaLoRA 8->3, switch_off": dict(ela, r=8, target_rank=3, switch_off=True),
        "adalora-physical per head 8->3": dict(ada),
        "adalora-physical, ortho_weight=0.1 (the papers')": dict(ada, ortho_weight=ORTHO_WEIGHT),
        "adalora-physical, budget 1920 params": dict(ada, target_rank=None, target_params=1920),
        "adalora-physical per matrix 15->10": dict(ada, r=15, target_rank=10, granularity="matrix"),
        "stock PEFT AdaLoRA per matrix 15->10": {"peft": True},
        "LoRA per matrix r=10": {"method": "dynarank-lora", "r": 10, "target_modules": TARGET, "granularity": "matrix"},
        "stock PEFT LoRA per matrix r=10": {"peft_lora": {"r": 10}},
        "stock PEFT DoRA per matrix r=10": {"peft_lora": {"r": 10, "use_dora": True}},
        "full fine-tuning": {"full": True},
    }


class _WithLoss(nn.Module):
    """The planted student returning ``.loss`` as Hugging Face models do (PEFT adds its penalty only then)."""

    def __init__(self, task: PlantedTask) -> None:
        super().__init__()
        self.query = task.student().query

    def forward(self, x, y=None):
        out = self.query(x)
        return SimpleNamespace(loss=None if y is None else ((out - y) ** 2).mean(), logits=out)


def train_peft_adalora(task: PlantedTask, steps: int, lr: float, seed: int) -> dict:
    """Stock PEFT AdaLoRA with its documented loop (update_and_allocate after every step)."""
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(seed)
    phases = stock_adalora_phases(steps)  # what dynarank's AdaLoRA-style takes when unset (AdaLoRAConfig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            _WithLoss(task),
            AdaLoraConfig(
                init_r=15,
                target_r=10,
                lora_alpha=10,  # the target rank: the scale (10 / 15) dynarank's AdaLoRA-style takes when unset
                orth_reg_weight=ORTHO_WEIGHT,  # ours (0.1), not PEFT's default 0.5
                target_modules=TARGET,
                total_step=steps,
                **phases,
            ),
        )
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1000)
    inner = model.base_model  # AdaLoraModel.forward adds the orthogonality penalty; PeftModel.forward would not
    for step in range(steps):
        x = torch.randn(64, task.base_weight.shape[1], generator=g)
        inner(x=x, y=task.targets(x, g)).loss.backward()
        opt.step()
        inner.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
    ranks = [sum(v) for v in model.peft_config["default"].rank_pattern.values()]
    return {
        "mse": task.eval_loss(lambda x: inner(x=x).logits),
        "ranks": ranks,
        "params": ranks[0] * 192,
        "peak_trainable": trainable,
        "mean_trainable": trainable,
        "rank_changes": 0,
        "warnings": [],
    }


def train_plain(task: PlantedTask, steps: int, lr: float, seed: int, lora: dict | None) -> dict:
    """Stock PEFT LoRA / DoRA per matrix (``lora`` = LoraConfig fields), or full fine-tuning (``lora=None``):
    the same data stream, batch, optimizer and learning rate as every other method."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = _WithLoss(task)
    if lora is None:
        model.query.weight.requires_grad_(True)
        ranks, params = [model.query.weight.shape[0]], model.query.weight.numel()
    else:
        model = get_peft_model(model, LoraConfig(target_modules=TARGET, lora_alpha=lora["r"], **lora))
        ranks = [lora["r"]]
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1000)
    for _ in range(steps):
        x = torch.randn(64, task.base_weight.shape[1], generator=g)
        model(x=x, y=task.targets(x, g)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        mse = task.eval_loss(lambda x: model(x=x).logits)
    return {
        "mse": mse,
        "ranks": ranks,
        "params": params,
        "peak_trainable": params,
        "mean_trainable": params,
        "rank_changes": 0,
        "warnings": [],
    }


def run_one(task: PlantedTask, spec: dict, steps: int, lr: float, seed: int) -> dict:
    spec = dict(spec)
    if spec.pop("peft", False):
        return train_peft_adalora(task, steps, lr, seed)
    if "peft_lora" in spec or spec.get("full"):
        return train_plain(task, steps, lr, seed, spec.get("peft_lora"))
    fixed = task.true_ranks if spec.pop("fixed", False) else None
    out = train_planted(task, DynaRankConfig(**spec), steps=steps, lr=lr, seed=seed, fixed_ranks=fixed)
    controller = out.pop("controller")
    out["peak_trainable"] = max(r.trainable_parameters for r in controller.records)
    out["mean_trainable"] = statistics.mean(r.trainable_parameters for r in controller.records)
    out["rank_changes"] = getattr(controller, "rank_changes", 0)
    return out


def run(seeds: int, steps: int, lr: float) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for seed in range(seeds):
        task = make_planted_task(seed=seed, noise=0.1)
        for name, spec in methods().items():
            t0 = time.perf_counter()
            out = run_one(task, spec, steps, lr, seed)
            seconds = time.perf_counter() - t0
            rows.setdefault(name, []).append(
                {
                    "seed": seed,
                    "mse": out["mse"],
                    "ranks": out["ranks"],
                    "params": out["params"],
                    "peak_trainable": out["peak_trainable"],
                    "mean_trainable": out["mean_trainable"],
                    "within_one": within_one(out["ranks"], task.true_ranks) if len(out["ranks"]) == 8 else None,
                    "rank_changes": out["rank_changes"],
                    "warnings": out["warnings"],
                    "seconds_per_step": seconds / steps,
                }
            )
            print(f"seed {seed} {name:38s} mse {out['mse']:.4g} ranks {out['ranks']} params {out['params']}")
    return rows


def summarise(rows: dict[str, list[dict]]) -> list[dict]:
    oracle = rows[ORACLE]
    table = []
    for name, runs in rows.items():
        rel_loss = [r["mse"] / o["mse"] for r, o in zip(runs, oracle)]
        within = [r["within_one"] for r in runs if r["within_one"] is not None]
        table.append(
            {
                "method": name,
                "loss / oracle": statistics.mean(rel_loss),
                "loss / oracle (max)": max(rel_loss),
                "params / oracle": statistics.mean(r["params"] / o["params"] for r, o in zip(runs, oracle)),
                "peak training floats": 3 * max(r["peak_trainable"] for r in runs),
                "mean training floats": round(3 * statistics.mean(r["mean_trainable"] for r in runs)),
                "within 1 (min over seeds)": min(within) if within else None,
                "rank changes": statistics.mean(r["rank_changes"] for r in runs),
                "ms / step": 1000 * statistics.mean(r["seconds_per_step"] for r in runs),
                "final ranks (seed 0)": runs[0]["ranks"],
            }
        )
    return table


def markdown(table: list[dict], seeds: int, command: str) -> str:
    head = (
        "| method | loss / oracle (mean, max) | final params / oracle | training floats: peak, mean | "
        "heads within 1 (worst seed) | rank changes | ms / step | final ranks, seed 0 |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for row in table:
        within = "-" if row["within 1 (min over seeds)"] is None else f"{row['within 1 (min over seeds)']:.0%}"
        lines.append(
            f"| {row['method']} | {row['loss / oracle']:.3f}, {row['loss / oracle (max)']:.3f} | "
            f"{row['params / oracle']:.2f} | {row['peak training floats']:,}, {row['mean training floats']:,} | "
            f"{within} | "
            f"{row['rank changes']:.0f} | {row['ms / step']:.2f} | {row['final ranks (seed 0)']} |"
        )
    return (
        f"Command: `{command}`\n\nTrue ranks: [0, 1, 2, 4, 8, 0, 3, 6]; {seeds} seeds; training floats = "
        "3 x trainable parameters (fp32 weights + AdamW moments), at the peak and averaged over the steps.\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    study_main("elalora", __doc__, run, summarise, markdown)
