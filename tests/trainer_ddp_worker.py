"""A transformers Trainer run under torchrun, for tests/test_distributed.py: prints each worker's result."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import Trainer, TrainingArguments

import dynarank
from dynarank import DynaRankConfig, attach
from tiny_models import TokenDataset, tiny_bert

torch.set_num_threads(1)
method = sys.argv[2] if len(sys.argv) > 2 else "ard"
extra = {"ard_lambda": 5.0} if method == "ard" else {"granularity": "matrix"}
model = attach(tiny_bert(), DynaRankConfig(method=method, r=4, target_modules=["query", "value"], seed=0, **extra))
for module in model.modules():  # no dropout: the workers' masks would differ
    if isinstance(module, torch.nn.Dropout):
        module.p = 0.0
callback = dynarank.DynaRankCallback(model)
args = TrainingArguments(
    output_dir=sys.argv[1],
    max_steps=30,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    disable_tqdm=True,
    ddp_backend="gloo",
)
trainer = Trainer(model=model, args=args, train_dataset=TokenDataset())
callback.install(trainer)
trainer.train()
sums = {n: float(p.detach().double().sum()) for n, p in model.named_parameters() if p.requires_grad}
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, {"ranks": callback.controller.ranks(), "sums": sums})
if dist.get_rank() == 0:
    print("RESULT " + json.dumps({"workers": gathered, "resizes": sum(r.resized for r in callback.controller.records)}))
del trainer
dist.barrier()
dist.destroy_process_group()
# Gloo worker threads that outlive the interpreter's finalisation can abort the process (torch issue
# 179291): the result is out, so leave without running the C++ static destructors.
sys.stdout.flush()
os._exit(0)
