"""When should a per-head layer run its group side as rank buckets instead of one padded product?

One ElasticLoRALinear (d x d, G heads, base rank r0) with uneven live ranks (one head at r0, the others
at a fraction of it), forward + backward of N tokens, one thread. The same layer is timed twice per
round, once with its rank buckets and once forced onto the padded product, alternating, and the median
of the per-round ratios is reported, for both splits (rows: q/k/v, cols: the output projection) and
both head layouts. ``padding`` is the padded product's waste per output feature, r_max - mean rank:
the quantity ``dynarank.layer_buckets.worth_bucketing`` thresholds (BUCKET_MIN_WASTE).

    python benchmarks/bucket_threshold.py             # writes results/bucket_threshold.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from dynarank import ElasticLoRALinear
from dynarank.layer_buckets import BUCKET_MIN_WASTE, rank_buckets

RESULTS = Path(__file__).parent / "results"
# (d, heads, r0, tokens, rank of the other heads)
CASES = [
    (384, 12, 8, 2048, 1),
    (384, 12, 8, 2048, 2),
    (768, 12, 16, 1024, 1),
    (768, 12, 16, 1024, 4),
    (768, 12, 32, 1024, 2),
    (768, 12, 32, 1024, 8),
    (1024, 16, 64, 1024, 4),
    (1024, 16, 64, 1024, 16),
]


def layer_with_ranks(d: int, heads: int, r0: int, ranks: list[int], split: str, layout: str) -> ElasticLoRALinear:
    layer = ElasticLoRALinear(nn.Linear(d, d), n_groups=heads, split=split, layout=layout, r=r0)
    layer.remove_slots({g: list(range(r, r0)) for g, r in enumerate(ranks) if r < r0})
    with torch.no_grad():
        for p in layer.adapter_parameters():
            p.normal_()
    return layer


def step_seconds(layer: ElasticLoRALinear, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    layer(x).sum().backward()
    return time.perf_counter() - t0


def measure(case: tuple, split: str, layout: str, rounds: int) -> dict:
    d, heads, r0, tokens, rest = case
    ranks = [r0] + [rest] * (heads - 1)
    bucketed = layer_with_ranks(d, heads, r0, ranks, split, layout)
    bucketed._buckets = rank_buckets(bucketed.slots, bucketed.shared_weight.device)  # whatever the threshold
    padded = copy.deepcopy(bucketed)
    padded._buckets = None
    x = torch.randn(tokens, d)
    for layer in (bucketed, padded):  # warm-up
        step_seconds(layer, x)
    ratios, times_b, times_p = [], [], []
    for i in range(rounds):
        order = (bucketed, padded) if i % 2 == 0 else (padded, bucketed)
        seconds = {id(layer): step_seconds(layer, x) for layer in order}
        times_b.append(seconds[id(bucketed)])
        times_p.append(seconds[id(padded)])
        ratios.append(times_b[-1] / times_p[-1])
    return {
        "d": d,
        "heads": heads,
        "r0": r0,
        "tokens": tokens,
        "other_heads_rank": rest,
        "split": split,
        "layout": layout,
        "padding": r0 - sum(ranks) / heads,
        "bucketed_ms": 1e3 * statistics.median(times_b),
        "padded_ms": 1e3 * statistics.median(times_p),
        "ratio": statistics.median(ratios),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    for case in CASES:
        for split in ("rows", "cols"):
            for layout in ("own", "shared"):
                row = measure(case, split, layout, args.rounds)
                rows.append(row)
                print(
                    f"d={row['d']} G={row['heads']} r0={row['r0']} others={row['other_heads_rank']} {split}/{layout}: "
                    f"padding {row['padding']:.1f}, buckets / padded {row['ratio']:.2f}",
                    flush=True,
                )
    command = f"python benchmarks/bucket_threshold.py --rounds {args.rounds}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bucket_threshold.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    lines = [
        "# Rank buckets vs one padded product (group side of a per-head layer)",
        "",
        f"Command: `{command}` (one thread; median of {args.rounds} alternating rounds of forward + backward).",
        f"The layer takes buckets when the padding reaches BUCKET_MIN_WASTE = {BUCKET_MIN_WASTE} ranks per output"
        " feature (and the buckets do at most 3/4 of the padded work).",
        "",
        "| d | heads | r0 | other heads' rank | padding (ranks / feature) | mean ratio buckets / padded "
        "(4 split x layout) | range |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        group = [r for r in rows if (r["d"], r["heads"], r["r0"], r["tokens"], r["other_heads_rank"]) == case]
        ratios = [r["ratio"] for r in group]
        lines.append(
            f"| {case[0]} | {case[1]} | {case[2]} | {case[4]} | {group[0]['padding']:.1f} | "
            f"{statistics.mean(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} |"
        )
    (args.out / "bucket_threshold.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {args.out / 'bucket_threshold.md'}")


if __name__ == "__main__":
    main()
