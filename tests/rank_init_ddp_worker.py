"""A worker script, not tests: the training loop's rank init (rank_init='data') on a tiny model, for
tests/test_rank_init.py.

    torchrun --nproc_per_node=2 tests/rank_init_ddp_worker.py

Each worker measures its shard of every global batch; worker 0 prints ``RESULT {json}`` with every worker's reduced
statistics and starting ranks, for both statistics (and the gradient's with init_scale='input': its reduced input
energies). ``run`` is also called in one process by the test, for the
single-process reference with the same global batches.
"""

from __future__ import annotations

import torch

import dynarank.rank_init as rank_init
from dynarank.training.loop import TrainSpec, train_classifier
from tiny_models import WordTokenizer, examples, tiny_bert
from trainer_ddp_worker import print_every_workers_result_and_exit

# 51 examples in batches of 8: the 7th batch holds 3, split 2 + 1 between two workers (unequal shares).
SPEC = dict(method="ard", r=4, target_modules=["query", "key", "value", "dense"], lr=1e-2, max_steps=7, batch_size=8)


def run(statistic: str, init_scale: str = "norm") -> dict:
    """Measure 7 batches: (statistics after the reduction, as lists; token positions; the starting ranks; with
    init_scale='input', the reduced input energies every layer's directions were rescaled with)."""
    torch.set_num_threads(1)
    seen: dict = {"energies": []}
    reduce, rescale = rank_init._reduce, rank_init.match_input_scale

    def spy(stats, tokens, kind):
        stats, tokens = reduce(stats, tokens, kind)
        seen.update(stats={n: m.double().flatten().tolist() for n, m in stats.items()}, tokens=tokens)
        return stats, tokens

    def spy_rescale(layer, proj, norm):
        seen["energies"].append(proj.tolist() + norm.tolist())
        return rescale(layer, proj, norm)

    rank_init._reduce, rank_init.match_input_scale = spy, spy_rescale
    try:
        model = tiny_bert()
        for module in model.modules():  # no dropout (the pass runs in eval mode anyway; training follows)
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        knobs = {"rank_init": "data", "target_params": 1500, "init_statistic": statistic, "init_batches": 7}
        knobs["init_scale"] = init_scale
        done = train_classifier(model, WordTokenizer(), examples(51), TrainSpec(**SPEC, dynarank=knobs))
    finally:
        rank_init._reduce, rank_init.match_input_scale = reduce, rescale
    return {**seen, "ranks": done.metrics["rank_init"]["ranks"]}


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = {kind: run(kind) for kind in ("gradient", "activation")}
    results["gradient, input scale"] = run("gradient", "input")
    print_every_workers_result_and_exit(results)
