"""The planted-rank task (a benchmark and test fixture, not part of the package): a task whose right rank
allocation is known: a frozen linear base plus planted per-head changes.

The teacher is ``W* = W0 + Delta`` where head h's output rows of Delta have rank ``true_ranks[h]``
(orthonormal factors, unit singular values). A student adapts ``W0`` with per-head LoRA groups;
the learned ranks can be scored against ``true_ranks`` and the loss against an oracle that is
given the true ranks.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from dynarank import DynaRankConfig, attach, build_controller, elastic_layers

DEFAULT_TRUE_RANKS = (0, 1, 2, 4, 8, 0, 3, 6)


class PlantedModel(nn.Module):
    """One frozen ``query`` projection (d_in -> heads * head_size); heads declared in ``config``."""

    def __init__(self, weight: torch.Tensor, n_heads: int) -> None:
        super().__init__()
        d_out, d_in = weight.shape
        self.query = nn.Linear(d_in, d_out, bias=False)
        with torch.no_grad():
            self.query.weight.copy_(weight)
        self.config = SimpleNamespace(num_attention_heads=n_heads, head_dim=d_out // n_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.query(x)


@dataclass
class PlantedTask:
    base_weight: torch.Tensor  # (d_out, d_in)
    teacher_weight: torch.Tensor  # (d_out, d_in)
    true_ranks: tuple[int, ...]
    head_size: int
    eval_x: torch.Tensor
    noise: float = 0.0  # std of the label noise (training and evaluation)
    eval_noise: torch.Tensor | None = None

    @property
    def n_heads(self) -> int:
        return len(self.true_ranks)

    def student(self) -> PlantedModel:
        return PlantedModel(self.base_weight, self.n_heads)

    def targets(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        y = x @ self.teacher_weight.t()
        if self.noise and generator is not None:
            y = y + self.noise * torch.randn(y.shape, generator=generator)
        return y

    def eval_loss(self, model: nn.Module) -> float:
        """MSE on the fixed evaluation set (noisy labels when the task has noise)."""
        with torch.no_grad():
            y = self.targets(self.eval_x) + (self.eval_noise if self.eval_noise is not None else 0.0)
            return float(((model(self.eval_x) - y) ** 2).mean())


def make_planted_task(
    true_ranks=DEFAULT_TRUE_RANKS,
    d_in: int = 64,
    head_size: int = 16,
    seed: int = 0,
    n_eval: int = 2048,
    noise: float = 0.0,
    spread: float = 1.0,
) -> PlantedTask:
    """``spread``: the planted singular values of a head fall geometrically from 1 to 1/spread over its rank
    (1: every singular value 1, as in the original task)."""
    g = torch.Generator().manual_seed(seed)
    n_heads = len(true_ranks)
    base = torch.randn(n_heads * head_size, d_in, generator=g) / d_in**0.5
    delta = torch.zeros_like(base)
    for h, r in enumerate(true_ranks):
        if r == 0:
            continue
        u, _ = torch.linalg.qr(torch.randn(head_size, r, generator=g))  # (d_h, r) orthonormal columns
        v, _ = torch.linalg.qr(torch.randn(d_in, r, generator=g))  # (d_in, r)
        values = spread ** (-torch.arange(r, dtype=torch.float32) / max(1, r - 1))  # (r,) from 1 to 1/spread
        delta[h * head_size : (h + 1) * head_size] = (u * values) @ v.t()
    eval_x = torch.randn(n_eval, d_in, generator=g)
    eval_noise = noise * torch.randn(n_eval, n_heads * head_size, generator=g)
    return PlantedTask(base, base + delta, tuple(true_ranks), head_size, eval_x, noise, eval_noise)


def train_planted(
    task: PlantedTask,
    config: DynaRankConfig,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    fixed_ranks: tuple[int, ...] | None = None,
) -> dict:
    """Train a student on ``task``; ``fixed_ranks`` cuts each head to that rank first (the oracle).

    Returns the evaluation MSE, the final ranks of the heads, and the adapter's parameter count.
    """
    torch.manual_seed(seed)
    model = task.student()
    attach(model, config)
    layer = elastic_layers(model)["query"]
    if fixed_ranks is not None:
        layer.remove_slots({h: list(range(k, r)) for h, (k, r) in enumerate(zip(fixed_ranks, layer.ranks)) if k < r})
    controller = build_controller(model, total_steps=steps)
    optimizer = controller.build_optimizer(lr=lr)
    g = torch.Generator().manual_seed(seed + 1000)
    for _ in range(steps):
        x = torch.randn(batch_size, task.base_weight.shape[1], generator=g)
        loss = ((model(x) - task.targets(x, g)) ** 2).mean()
        if hasattr(controller, "observe_loss"):
            controller.observe_loss(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        "mse": task.eval_loss(model),
        "ranks": layer.ranks,
        "params": layer.num_adapter_parameters(),
        "warnings": [w for rec in controller.records for w in rec.warnings],
        "controller": controller,
    }


def within_one(ranks, truth) -> float:
    """Fraction of heads whose learned rank is within 1 of the planted one."""
    return sum(abs(a - b) <= 1 for a, b in zip(ranks, truth)) / len(truth)


def study_main(stem: str, description: str, study: Callable, summarise: Callable, markdown: Callable) -> None:
    """The command line of a planted-task study ``benchmarks/<stem>.py``: ``study(seeds, steps, lr)`` gives the runs,
    ``summarise(runs)`` the table, ``markdown(table, seeds, command)`` its text; written to <out>/<stem>.json / .md."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (tasks and runs)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps per run")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of A and B")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="results folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = study(args.seeds, args.steps, args.lr)
    table = summarise(runs)
    command = f"python benchmarks/{stem}.py --seeds {args.seeds} --steps {args.steps} --lr {args.lr}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps({"command": command, "runs": runs, "table": table}, indent=1))
    text = markdown(table, args.seeds, command)
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    print(f"results: {args.out / f'{stem}.md'}")
