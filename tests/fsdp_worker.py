"""A worker script, not tests: dynarank with its frozen base sharded by FSDP2, for tests/test_fsdp.py.

    torchrun --nproc_per_node=2 tests/fsdp_worker.py TASK [TASK ...]

TASK is ``loop-ard``, ``loop-elalora`` (``dynarank.training.loop`` on a tiny Llama, ``fsdp=True``), ``loop-ard-ddp``
(the same ARD run under DDP) or ``resize``
(resizes by hand between steps, down to rank 0 and back). Every task runs in the same launch; worker 0 prints
``RESULT {json}`` with every worker's results by task. ``run_loop`` is also called in one process by the tests, for
the single-process reference (there ``fsdp=True`` has nothing to shard).

    torchrun --nproc_per_node=2 tests/fsdp_worker.py --kill-after STEP train ARGS...

runs ``dynarank train ARGS...`` and kills every worker (``os._exit``, no clean-up) once step STEP is logged.
"""

from __future__ import annotations

import os
import sys

import torch

from dynarank import DynaRankConfig, attach, build_controller, elastic_layers
from dynarank.distributed import ResizedGradientSync
from dynarank.fsdp import base_bytes, is_sharded, replicated_parameters, shard_base
from dynarank.training.data import PairExamples
from dynarank.training.loop import TrainSpec, train_causal_lm
from tiny_models import WordTokenizer, tiny_llama
from trainer_ddp_worker import print_every_workers_result_and_exit

# Per method: TrainSpec fields. ARD with a strong l1 so that heads fall to rank 0 within 24 steps; ElaLoRA with a
# prune-and-grow round at every step from 7 to 20.
SPECS = {
    "ard": {"max_steps": 24, "dynarank": {"ard_lambda": 5.0}},
    "elalora": {"max_steps": 24, "dynarank": {"t_init_steps": 6, "t_final_steps": 4, "resize_every": 1}},
}
PROBE = torch.arange(1, 97).reshape(8, 12)  # the input whose logits compare runs


class Tokenizer(WordTokenizer):
    """The tests' whitespace tokenizer, with what a causal-LM encoding asks of a tokenizer."""

    eos_token = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False, **kwargs):
        return {"input_ids": super().__call__([text], max_length=64)["input_ids"][0]}


def pairs(n: int = 36) -> PairExamples:
    """Prompts and responses of different lengths: the shards of a batch hold different numbers of loss tokens."""
    prompts = [f"what is {i} plus {' one' * (1 + i % 3)}" for i in range(n)]
    responses = [f"it is {i + 1}" + " indeed" * (i % 4) for i in range(n)]
    return PairExamples(prompts, responses)


def _tensors(model) -> dict[str, list[float]]:
    return {n: p.detach().double().flatten().tolist() for n, p in model.named_parameters() if p.requires_grad}


def poison(model: torch.nn.Module, call: int) -> None:
    """Make ``model``'s loss NaN at its ``call``-th forward pass."""
    forward, calls = model.forward, {"n": 0}

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned


def run_loop(method: str, fsdp: bool = True, nan_step: int = 0, nan_worker: int = 1) -> dict:
    """Train a tiny Llama with ``fsdp`` (else DDP); returns this worker's rank history, adapter tensors, logits and
    the bytes of the frozen base it holds. ``nan_step``: the loss of that step is NaN on ``nan_worker`` only."""
    torch.set_num_threads(1)
    spec = TrainSpec(method=method, r=4, lr=1e-2, batch_size=8, seed=0, target_modules="all-linear", **SPECS[method])
    model = tiny_llama()
    if nan_step and int(os.environ.get("RANK", "0")) == nan_worker:
        poison(model, nan_step)
    result = train_causal_lm(model, Tokenizer(), pairs(), spec, fsdp=fsdp)
    model, controller = result.model, result.controller
    with torch.no_grad():
        logits = model.eval()(input_ids=PROBE).logits
    return {
        "history": [[h["step"], h["ranks"]] for h in controller.history],
        "resized": [r.step for r in controller.records if r.resized],
        "tensors": _tensors(model),
        "logits": logits.double().flatten().tolist(),
        "base_bytes": list(base_bytes(model)),
        "replicated_are_plain": all(type(p) is torch.nn.Parameter for p in replicated_parameters(model)),
        "sharded": is_sharded(model),
        "skipped": result.metrics["skipped_steps"],
    }


def _step(model, optimizer, sync, ids) -> float:
    rank, n = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    mine = ids[rank::n]
    loss = model(input_ids=mine, labels=mine).loss
    loss.backward()
    sync()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss)


def run_resize() -> dict:
    """Fixed ranks on a sharded tiny Llama, resized by hand between optimizer steps: every group of one layer to rank
    0 (its parameters become empty), one head of another cut, then the emptied layer grown back."""
    torch.set_num_threads(1)
    model = attach(tiny_llama(), DynaRankConfig(method="dynarank-lora", r=4, target_modules="all-linear", seed=0))
    controller = build_controller(model, total_steps=10)
    optimizer = controller.build_optimizer(lr=1e-2)
    shard_base(model)
    layers = elastic_layers(model)
    # No wrapper reduces anything (known=()): every trainable gradient is averaged here, the list rebuilt per layout.
    sync = ResizedGradientSync(model, lambda: [layer.layout_version for layer in layers.values()], known=())
    emptied, cut = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.1.self_attn.v_proj"]
    g = torch.Generator().manual_seed(0)
    losses = [_step(model, optimizer, sync, torch.randint(0, 100, (8, 12), generator=g)) for _ in range(2)]
    kept = optimizer.state[cut.group_weight]["exp_avg"][:, 4:].clone()  # key-value head 1: packed columns 4..7
    emptied.remove_slots({h: range(4) for h in range(emptied.n_groups)}, optimizer)
    cut.remove_slots({0: range(4)}, optimizer)  # head 0 of v_proj to rank 0
    carried = torch.equal(optimizer.state[cut.group_weight]["exp_avg"], kept)
    shapes = [list(emptied.shared_weight.shape), list(emptied.group_weight.shape)]
    losses += [_step(model, optimizer, sync, torch.randint(0, 100, (8, 12), generator=g)) for _ in range(2)]
    emptied.add_slots({h: 2 for h in range(emptied.n_groups)}, optimizer, generator=torch.Generator().manual_seed(1))
    losses += [_step(model, optimizer, sync, torch.randint(0, 100, (8, 12), generator=g)) for _ in range(2)]
    try:
        emptied.merge()
        merge = "merged"
    except RuntimeError as exc:
        merge = str(exc)
    return {
        "losses": losses,
        "moments_carried": carried,
        "emptied_shapes": shapes,
        "ranks": {"emptied": emptied.ranks, "cut": cut.ranks},
        "replicated_are_plain": all(type(p) is torch.nn.Parameter for p in replicated_parameters(model)),
        "grown_trained": bool(emptied.group_weight.abs().sum() > 0),
        "tensors": _tensors(model),
        "merge": merge,
        "base_bytes": list(base_bytes(model)),
    }


TASKS = {
    "loop-ard": lambda: run_loop("ard"),
    "loop-ard-ddp": lambda: run_loop("ard", fsdp=False),
    "loop-elalora": lambda: run_loop("elalora"),
    "loop-ard-nan": lambda: run_loop("ard", nan_step=9),  # a forward pass with no backward under FSDP, at a resize
    "resize": run_resize,
}


def train_killed_after(step: int, argv: list[str]) -> None:
    """``dynarank train`` whose workers die, as if killed, right after step ``step``."""
    import dynarank.cli.train as command
    from dynarank.cli import main

    real = command.train_causal_lm

    def killed(*args, **kwargs):
        def on_step(record, inner=kwargs["on_step"]):
            inner(record)
            if record["step"] == step:
                os._exit(9)

        return real(*args, **{**kwargs, "on_step": on_step})

    command.train_causal_lm = killed
    main(argv)
    os._exit(1)  # never reached: the run dies first


if __name__ == "__main__" and sys.argv[1] == "--kill-after":
    train_killed_after(int(sys.argv[2]), sys.argv[3:])
elif __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    print_every_workers_result_and_exit({task: TASKS[task]() for task in sys.argv[1:]})
