"""Step time, the controller's share of it, and adapter + optimizer memory of every method, side by side.

all-MiniLM-L6-v2 (packaged) as a 2-way classifier, batch 32 x 64 tokens of real tweets, adapters on
all six Linear types of every layer, every method held to the same final budget (plain LoRA r=2:
82,944 adapter parameters; as benchmarks/quality.py):

    lora, dora, adalora   stock PEFT (AdaLoRA 3 -> 2, update_and_allocate called every step)
    dynarank-lora         the engine at fixed rank 2 per matrix
    adalora-physical      dynarank AdaLoRA-style, 3 -> 2, pruned physically
    elalora               dynarank ElaLoRA, r=2 per matrix, the budget as its ceiling
    ard                   dynarank ARD per head (shared A), r0=8, target_params = the budget
    ard-matrix            the same, one group per matrix
    ard-data              ARD per head with the data-driven start (rank_init='data': ranks measured on the first
                          training batches, the adapter starting at 1.5x the budget; the gradient statistic as
                          recorded, init_statistic='gradient'; the default 'gradient-relative' measures the same
                          pass and only divides each module's gains by a norm; A rows at the default draw's norm,
                          init_scale='norm', as recorded: the default 'input' rescales them, which changes no
                          shape); the pass is timed apart

Every method trains its own copy of the model for the same T optimizer steps (its whole schedule:
warm-up, rank changes, final phase) in one process; they take turns in rounds of 2 steps, the order
rotated every round, so load from other processes hits all alike. Timed: the whole step (forward,
loss, backward, optimizer step with the controller's hooks, scheduler, zero_grad), and separately
the controller's hooks (plus PEFT AdaLoRA's update_and_allocate). Reported per method: median step
time over the run and over its last quarter (after the rank changes), the ratio to stock LoRA
(median of per-round ratios), the controller's share of the step, and the bytes of trainable
parameters + AdamW state after the first step and at the end.

Settings (``--setting``): ``minilm-32x64`` (the above), ``minilm-16x16`` (batch 16 x 16 tokens: a small step,
where a per-module cost of the controller shows), and ``decoder-224`` (a decoder built from a config: 32 layers x
7 Linear = 224 target modules, hidden 128, 4 query / 2 key-value heads of 32, batch 16 x 16 tokens of random ids,
causal-LM loss; the budget is plain LoRA r=2 on all of them). Besides the step, the controller's hooks are timed
per step and set beside stock PEFT AdaLoRA's ``update_and_allocate``.

    python benchmarks/method_overhead.py                          # T = 60 steps per method, MiniLM 32 x 64
    python benchmarks/method_overhead.py --setting decoder-224    # the many-module decoder
    python benchmarks/method_overhead.py --steps 20               # a quick look
    python benchmarks/method_overhead.py --setting decoder-224 --steps 240   # rounds every 7 steps, not every step

Run length: the methods' phases are fractions of the run, and with fewer than 40 steps in the SVD methods'
budgeting phase (60 steps: 39) they reallocate at every step of it, so the 60-step records time a resize at
almost every step; at 240 steps a round comes every 7 steps, as in longer runs (records of another length are
written to ``method_overhead_<setting>_<T>steps``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from dynarank.training.data import packaged_sentiment  # noqa: E402
from dynarank.training.estimate import lora_parameters  # noqa: E402
from dynarank.training.loop import (  # noqa: E402
    BERT_ENCODER_LINEAR,
    TrainSpec,
    build_optimizer,
    linear_schedule,
    prepare_model,
    training_state_bytes,
)
from dynarank.training.methods import stock_step  # noqa: E402
from dynarank.training.models import load_classifier, packaged_minilm_path  # noqa: E402
from dynarank.training.tasks import batches, encode_classification  # noqa: E402
from records import machine_info  # noqa: E402
from setups import stock_adalora_sizes  # noqa: E402

RESULTS = Path(__file__).parent / "results"
METHODS = ["lora", "dora", "adalora", "dynarank-lora", "adalora-physical", "elalora", "ard", "ard-matrix", "ard-data"]
BUDGET_R = 2


SETTINGS = {  # name: (batch size, tokens per example)
    "minilm-32x64": (32, 64),
    "minilm-16x16": (16, 16),
    "decoder-224": (16, 16),
}


def decoder_224():
    """(model, budget) of the many-module setting: a Llama of 32 layers built from a config (224 targets)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    return model, lora_parameters(model, r".*layers\.\d+\..*_proj", BUDGET_R)


def setting_data(setting: str):
    """(base model, budget, target modules, batches) of a setting."""
    batch, length = SETTINGS[setting]
    if setting == "decoder-224":
        base, budget = decoder_224()
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, 512, (batch, length), generator=g) for _ in range(32)]
        return base, budget, "all-linear", [{"input_ids": i, "labels": i} for i in ids]
    train, _ = packaged_sentiment(2000, 500, seed=0)
    base, tokenizer = load_classifier(packaged_minilm_path(), train.label_names)
    budget = lora_parameters(base, BERT_ENCODER_LINEAR, BUDGET_R)
    enc = encode_classification(tokenizer, train, length)
    data = [
        {"input_ids": ids, "attention_mask": mask, "labels": labels}
        for ids, mask, labels, _ in batches(enc, list(range(len(train.texts))), batch, tokenizer.pad_token_id or 0)
    ]
    return base, budget, BERT_ENCODER_LINEAR, data


def spec_for(method: str, steps: int, budget: int, target=BERT_ENCODER_LINEAR) -> TrainSpec:
    common = dict(target_modules=target, lr=3e-3, max_steps=steps, seed=0)
    if method == "ard":
        knobs = {"head_layout": "shared", "target_params": budget, "rank_init": "uniform"}  # as recorded
        return TrainSpec(method="ard", r=8, dynarank=knobs, **common)
    if method == "ard-data":
        knobs = {"head_layout": "shared", "target_params": budget, "rank_init": "data", "init_statistic": "gradient"}
        knobs["init_scale"] = "norm"  # as recorded (the rows' scale changes no shapes, and the pass by < 1%)
        return TrainSpec(method="ard", r=8, dynarank=knobs, **common)
    if method == "ard-matrix":
        knobs = {"granularity": "matrix", "target_params": budget, "rank_init": "uniform"}
        return TrainSpec(method="ard", r=8, dynarank=knobs, **common)
    if method == "elalora":
        return TrainSpec(method="elalora", r=BUDGET_R, dynarank={"target_params": budget}, **common)
    if method == "dynarank-lora":
        return TrainSpec(method="dynarank-lora", r=BUDGET_R, dynarank={"granularity": "matrix"}, **common)
    if method == "adalora-physical":  # stock AdaLoRA's 3 -> 2 (its phases and scale are the defaults)
        knobs = stock_adalora_sizes(BUDGET_R)
        return TrainSpec(method=method, r=knobs.pop("r"), dynarank=knobs, **common)
    return TrainSpec(method=method, r=BUDGET_R, **common)


class Timed:
    """Accumulates the seconds spent in the wrapped callables (the controller's hooks)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return timed


class Run:
    """One method's model, optimizer, scheduler and controller, stepped on demand."""

    def __init__(self, method: str, base, steps: int, budget: int, target=BERT_ENCODER_LINEAR, data=()) -> None:
        self.method, self.steps, self.step_index = method, steps, 0
        self.spec = spec_for(method, steps, budget, target)
        torch.manual_seed(0)
        t0 = time.perf_counter()  # a data-driven start measures its ranks on the first batches here
        self.model, self.controller = prepare_model(
            copy.deepcopy(base), self.spec, steps, init_batches=lambda: iter(data)
        )
        self.prepare_seconds = time.perf_counter() - t0
        self.model.train()
        self.hooks = Timed()
        if self.controller is not None:
            self.controller.before_step = self.hooks.wrap(self.controller.before_step)
            self.controller.after_step = self.hooks.wrap(self.controller.after_step)
        self.optimizer = build_optimizer(self.model, self.controller, self.spec)  # as the training loop builds it
        self.stock_update = stock_step(self.model, method)  # stock PEFT AdaLoRA's documented per-step call
        self.scheduler = linear_schedule(self.optimizer, steps, self.spec.warmup_ratio)
        self.times: list[float] = []
        self.hook_times: list[float] = []
        self.bytes_start = None

    def step(self, batch: dict) -> float:
        before = self.hooks.seconds
        t0 = time.perf_counter()
        out = self.model(**batch)
        out.loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if self.stock_update is not None:
            self.hooks.wrap(self.stock_update)(self.step_index)
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        self.step_index += 1
        if self.bytes_start is None:
            self.bytes_start = self.state_bytes()
        self.times.append(elapsed)
        self.hook_times.append(self.hooks.seconds - before)
        return elapsed

    def state_bytes(self) -> int:
        """Trainable parameters, AdamW state and the importance scores a method holds (as the loop counts them)."""
        return training_state_bytes(self.model, self.optimizer, self.controller)

    def adapter_parameters(self) -> int:
        if self.controller is not None:
            return self.controller.adapter_parameters()
        head = sum(p.numel() for n, p in self.model.named_parameters() if p.requires_grad and "classifier" in n)
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) - head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per method (its whole schedule)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="minilm-32x64")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, budget, target, data = setting_data(args.setting)
    runs = {m: Run(m, base, args.steps, budget, target, data) for m in args.methods}
    order = list(runs)
    per_round: dict[str, list[float]] = {m: [] for m in order}
    t_start = time.perf_counter()
    for rnd in range(args.steps // 2):
        rotated = order[rnd % len(order) :] + order[: rnd % len(order)]
        for m in rotated:
            run = runs[m]
            per_round[m].append(sum(run.step(data[(2 * rnd + k) % len(data)]) for k in range(2)) / 2)
        if rnd % 5 == 4:
            print(f"round {rnd + 1}/{args.steps // 2}: " + " ".join(f"{m}={per_round[m][-1]:.2f}" for m in order))
    elapsed = time.perf_counter() - t_start
    results = {}
    for m, run in runs.items():
        tail = run.times[-max(1, len(run.times) // 4) :]
        ratio = statistics.median(x / y for x, y in zip(per_round[m], per_round["lora"])) if "lora" in runs else None
        tail_rounds = max(1, len(per_round[m]) // 4)
        tail_ratio = (
            statistics.median(x / y for x, y in zip(per_round[m][-tail_rounds:], per_round["lora"][-tail_rounds:]))
            if "lora" in runs
            else None
        )
        results[m] = {
            "median_step_s": statistics.median(run.times),
            "median_step_last_quarter_s": statistics.median(tail),
            "ratio_to_lora": ratio,
            "ratio_to_lora_last_quarter": tail_ratio,
            "controller_share": sum(run.hook_times) / sum(run.times),
            "hooks_per_step_ms": 1e3 * statistics.median(run.hook_times),
            "hooks_per_step_mean_ms": 1e3 * statistics.mean(run.hook_times),
            "bytes_start": run.bytes_start,
            "bytes_end": run.state_bytes(),
            "adapter_parameters_end": run.adapter_parameters(),
            "prepare_s": run.prepare_seconds,  # attach (and a data-driven start's pass), before any step
            "prepare_share": run.prepare_seconds / (run.prepare_seconds + sum(run.times)),
        }
    command = "python benchmarks/method_overhead.py " + " ".join(sys.argv[1:])
    record = {
        "command": command,
        "steps": args.steps,
        "setting": args.setting,
        "batch": SETTINGS[args.setting],
        "budget_parameters": budget,
        "threads": args.threads,
        "timed_seconds": elapsed,
        "load_average_1min_end": os.getloadavg()[0],
        "machine": machine_info(),  # step times differ between hosts (an AVX2-only one ran 2-3.1x slower)
        "methods": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "method_overhead" if args.setting == "minilm-32x64" else f"method_overhead_{args.setting}"
    if args.steps != 60:  # 60 steps: the records' standard run (a round every step of the SVD methods' phase)
        stem += f"_{args.steps}steps"
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    batch, length = SETTINGS[args.setting]
    machine = record["machine"]
    lines = [
        f"# Step time and memory of every method ({args.setting}: batch {batch} x {length}, budget = LoRA r=2)",
        "",
        f"Command: `{command}` ({args.steps} optimizer steps per method, rounds of 2 steps, order rotated; "
        f"{elapsed:.0f} s; {args.threads} threads; 1-minute load average at the end "
        f"{record['load_average_1min_end']:.1f} on {machine['nproc']} cores; {machine['cpu_model']}, torch's "
        f"kernels for {machine['cpu_capability']}, torch {machine['torch']}).",
        "",
        "| method | median step | last quarter | / LoRA (paired) | / LoRA, last quarter | controller share | "
        "hooks per step (median / mean) | params + AdamW state: after step 1 -> end | change | adapter params at end | "
        "before step 1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, r in results.items():
        lines.append(
            f"| {m} | {r['median_step_s'] * 1e3:.0f} ms | {r['median_step_last_quarter_s'] * 1e3:.0f} ms | "
            f"{r['ratio_to_lora']:.3f} | {r['ratio_to_lora_last_quarter']:.3f} | {100 * r['controller_share']:.1f}% | "
            f"{r['hooks_per_step_ms']:.1f} / {r['hooks_per_step_mean_ms']:.1f} ms | "
            f"{r['bytes_start'] / 1e6:.2f} MB -> {r['bytes_end'] / 1e6:.2f} MB | "
            f"{100 * (r['bytes_end'] / r['bytes_start'] - 1):+.0f}% | {r['adapter_parameters_end']:,} | "
            f"{r['prepare_s']:.2f} s ({100 * r['prepare_share']:.1f}%) |"
        )
    lines += [
        "",
        "Controller share: time in the controller's optimizer hooks (and in PEFT AdaLoRA's update_and_allocate) "
        "over the whole step time. Bytes: trainable parameters (adapters, task head, ARD's alphas, E) plus AdamW's "
        "two moments and the importance scores of the SVD methods (dynarank's and stock AdaLoRA's), after the first "
        "step (when the moments exist) and after the last. Before step 1: attaching the method, and for ard-data its "
        "pass over the first training batches (the share is of that plus every step; not in the step ratios).",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
