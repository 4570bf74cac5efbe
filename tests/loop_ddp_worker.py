"""A worker script, not tests: ``dynarank.training.loop.train`` on a tiny model, for tests/test_distributed.py.

    torchrun --nproc_per_node=2 tests/loop_ddp_worker.py METHOD NAN_STEP [NAN_WORKER]

Each worker trains on its shard of every global batch; worker 0 prints ``RESULT {json}`` with every
worker's final ranks, adapter tensors and rank history. ``run`` is also called in one process by
the tests, for the single-process reference. NAN_STEP > 0 makes the loss of that step NaN on
NAN_WORKER (default 1) only: every worker must still skip it.
"""

from __future__ import annotations

import os
import sys

import torch

from dynarank.attach import elastic_layers
from dynarank.training.loop import BERT_ENCODER_LINEAR, TrainSpec, train_classifier
from tiny_models import WordTokenizer, examples, tiny_bert
from trainer_ddp_worker import print_every_workers_result_and_exit

# Per method: TrainSpec fields. 51 examples: the last batch of every epoch splits unevenly (2 + 1).
SPECS = {
    # Stock AdaLoRA's setup for r=4 over 24 steps: 6 -> 4 ranks per matrix, pruning at steps 4, 5, 6, ... 20.
    "adalora-physical": {
        "max_steps": 24,
        "target_modules": ["query", "value"],
        "dynarank": {
            "r": 6,
            "target_rank": 4,
            "lora_alpha": 4,
            "t_init_steps": 3,
            "t_final_steps": 3,
            "resize_every": 1,
        },
    },
    # ElaLoRA on every encoder matrix: prune-and-grow rounds at every step from 9 to 32.
    "elalora": {"max_steps": 40, "target_modules": BERT_ENCODER_LINEAR},
    # ARD with lr='auto': the range test's probes on every worker (96 examples: 32 held out, 64 to probe on).
    "ard-auto": {"method": "ard", "lr": "auto", "max_steps": 24, "target_modules": ["query", "value"], "examples": 96},
}


def run(method: str, nan_step: int = 0, nan_worker: int = 1) -> dict:
    """Train; returns this worker's ranks, adapter tensors (as lists), rank history and skipped steps."""
    torch.set_num_threads(1)
    model = tiny_bert()
    for module in model.modules():  # no dropout: each worker would draw its own masks
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    rank = int(os.environ.get("RANK", "0"))
    if nan_step and rank == nan_worker:
        forward, calls = model.forward, {"n": 0}

        def poisoned(*args, **kwargs):
            out = forward(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == nan_step:
                out.loss = out.loss * float("nan")
            return out

        model.forward = poisoned
    fields = {"method": method, "r": 4, "lr": 1e-2, "batch_size": 8, "seed": 0, **SPECS[method]}
    n_examples = fields.pop("examples", 51)
    result = train_classifier(model, WordTokenizer(), examples(n_examples), TrainSpec(**fields))
    controller = result.controller
    ids = torch.arange(1, 97).reshape(8, 12)
    with torch.no_grad():
        logits = model.eval()(input_ids=ids).logits
    return {
        "logits": logits.double().flatten().tolist(),
        "ranks": result.metrics["ranks"],
        "tensors": {n: p.detach().double().flatten().tolist() for n, p in model.named_parameters() if p.requires_grad},
        # What each adapter computes, scaling * B diag(E) A: the function, whatever the factors.
        "deltas": {n: layer.delta_weight().double().flatten().tolist() for n, layer in elastic_layers(model).items()},
        "history": [(h["step"], h["ranks"]) for h in controller.history],
        "resized": [r.step for r in controller.records if r.resized],
        "skipped": result.metrics["skipped_steps"],
        "lr_search": result.metrics["lr_search"],
    }


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    method, nan_step = sys.argv[1], int(sys.argv[2])
    print_every_workers_result_and_exit(run(method, nan_step, int(sys.argv[3]) if len(sys.argv) > 3 else 1))
