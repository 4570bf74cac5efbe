"""A transformers Trainer run, for tests/test_distributed.py.

    torchrun --nproc_per_node=2 tests/trainer_ddp_worker.py OUT_DIR METHOD [sharded]

Each worker takes 4 examples of every global batch of 8; worker 0 prints ``RESULT {json}`` with
every worker's ranks, rank history (a snapshot at every resize), parameter sums and logits. The
tests call ``train`` in one process with a batch of 8 for the single-process reference. ``sharded``:
the frozen base is sharded by ``dynarank.shard_base`` before the Trainer is built.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from transformers import TrainingArguments

import dynarank
from dynarank import DynaRankConfig, attach
from dynarank.fsdp import base_bytes
from tiny_models import TokenDataset, tiny_bert


def train(out_dir: str, method: str, batch_size: int, sharded: bool = False, **args) -> dict:
    """Train ARD or ElaLoRA for 30 steps; returns this process's result."""
    torch.set_num_threads(1)
    extra = {"ard_lambda": 5.0} if method == "ard" else {"granularity": "matrix"}
    model = attach(tiny_bert(), DynaRankConfig(method=method, r=4, target_modules=["query", "value"], seed=0, **extra))
    for module in model.modules():  # no dropout: the workers' masks would differ
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if sharded:  # the controller's own parameters first, then the base into shards: both stay as the Trainer finds them
        dynarank.prepare_parameters(model)
        dynarank.shard_base(model)
    arguments = TrainingArguments(
        output_dir=out_dir,
        max_steps=30,
        per_device_train_batch_size=batch_size,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
        # BERT's classifier takes **kwargs, so the Trainer passes it num_items_in_batch and, this being True,
        # multiplies the loss by the number of processes; the classifier's loss is a mean that ignores
        # num_items_in_batch, so under DDP every gradient would be doubled (not so in one process).
        average_tokens_across_devices=False,
        max_grad_norm=0.05,  # clipping on every step: its norm must include the resized tensors' averaged gradients
        **args,
    )
    # DynaRankTrainer averages the resized tensors' gradients before the Trainer clips them.
    trainer = dynarank.DynaRankTrainer(model=model, args=arguments, train_dataset=TokenDataset())
    trainer.train()
    controller = trainer.dynarank.controller
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.arange(1, 97).reshape(8, 12)).logits
    return {
        "ranks": controller.ranks(),
        "history": [[h["step"], h["ranks"]] for h in controller.history],
        "resizes": sum(r.resized for r in controller.records),
        "sums": {n: float(p.detach().double().sum()) for n, p in model.named_parameters() if p.requires_grad},
        "logits": logits.double().flatten().tolist(),
        "base_bytes": list(base_bytes(model)),
    }


def print_every_workers_result_and_exit(mine: dict) -> None:
    """Worker 0 prints ``RESULT {"workers": [...]}`` with every worker's ``mine``; then every worker leaves."""
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"workers": gathered}))
    dist.barrier()
    dist.destroy_process_group()
    # Gloo worker threads that outlive the interpreter's finalisation can abort the process (torch issue
    # 179291): the result is out, so leave without running the C++ static destructors.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    method, sharded = sys.argv[2] if len(sys.argv) > 2 else "ard", sys.argv[3:] == ["sharded"]
    if sharded:  # shard_base needs the process group before the Trainer would create it
        import torch.distributed as dist

        dist.init_process_group("gloo")
    print_every_workers_result_and_exit(train(sys.argv[1], method, batch_size=4, sharded=sharded, ddp_backend="gloo"))
