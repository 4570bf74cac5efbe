"""ARD's contested slots (kept by the ceil read-out, off under the mask) switched on at the final phase from a zero
group-side column, as held slots are (VARIANT zero), against the shipped behaviour, which switches them on with the
column they have (VARIANT stale). One quality.py run of ARD's shipped data start per call, its test and validation
scores and the number of contested slots appended to benchmarks/results/ard_contested_slot.jsonl.

usage: python benchmarks/ard_contested_slot.py TASK R LR SEED VARIANT
(run on 7 Dec: minilm-topics 2 0.003 for seeds 0-2 and smollm2 4 0.01 for seed 0, both variants; docs/ard.md)"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ["HF_HUB_OFFLINE"] = "1"
import quality
import torch

from dynarank.controllers.ard_resize import ARDResizing

task, r, lr, seed, variant = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
found = {"contested": 0, "groups": 0}
orig = ARDResizing._drop_gates


@torch.no_grad()
def zeroing(self):
    if bool(self.gates.gated):
        counts = self._mask_on_counts()
        for name, layer in self.layers.items():
            cols = [
                int(layer.column_index[g, j])
                for g in range(layer.n_groups)
                for j in range(counts[name][g], layer.ranks[g])
            ]
            found["groups"] += layer.n_groups
            found["contested"] += len(cols)
            if cols and variant == "zero":
                index = torch.tensor(cols, device=layer.group_weight.device)
                layer.group_weight.index_fill_(1, index, 0.0)
                for optimizer in self.optimizers:
                    for key, value in optimizer.state.get(layer.group_weight, {}).items():
                        if "sq" not in str(key) and torch.is_tensor(value) and value.shape == layer.group_weight.shape:
                            value.index_fill_(1, index.to(value.device), 0.0)
    orig(self)


ARDResizing._drop_gates = zeroing
steps = quality.TASKS[task].get("steps") or quality.TASKS[task]["steps"]
rec = quality.run_one(task, "ard-data-scaled", r, lr, seed, steps, 1, "scratch")
out = {
    "task": task,
    "seed": seed,
    "variant": variant,
    "test": rec["test"],
    "val": rec["val"],
    **found,
    "adapter_parameters": rec["adapter_parameters"],
}
print(json.dumps(out))
with open(Path(__file__).parent / "results" / "ard_contested_slot.jsonl", "a") as f:
    f.write(json.dumps(out) + "\n")
