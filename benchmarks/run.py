"""Run the benchmark suites; each writes JSON, a Markdown table and plots into a results folder.

    python benchmarks/run.py --quick                 # every suite in its quick form -> results/quick/
    python benchmarks/run.py --suite planted quality # chosen suites, full form -> results/
    dynarank bench --quick                           # the same, from the command line

Suites: planted (ARD on the planted-rank oracle), methods-planted (every method on the planted task),
ablations (ARD-LoRA ablations on the planted task), quality (MiniLM quality vs parameters, every
method), quality-smollm2 (SmolLM2 quality vs parameters; hours), overhead (engine step time and memory
against stock PEFT LoRA), method-overhead (every method's step time and memory over its whole
schedule), buckets (when rank buckets beat the padded product), rank-init (which statistic sets ARD's
data-driven starting ranks, on the planted task), fresh-data (every method's defaults on a data set the defaults
study never saw, trained through the CLI; only when named). The quick forms (fewer steps, one
seed, no learning-rate search) write to results/quick/ and never touch the committed full results.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITES = {
    # name: (script, quick arguments, full arguments); quick runs add --out results/quick
    "planted": ("planted_rank.py", ["--seeds", "1", "--steps", "1000"], ["--seeds", "3"]),
    "methods-planted": ("elalora.py", ["--seeds", "1", "--steps", "1000"], ["--seeds", "3"]),
    "ablations": ("ablations.py", ["--seeds", "1"], ["--seeds", "3"]),
    # The quick form measures the code as it is now (--fresh); the full study resumes its records.
    "quality": (
        "quality.py",
        ["--quick", "--fresh", "--methods", "lora", "adalora", "elalora", "ard"],
        ["--task", "minilm"],
    ),
    "quality-smollm2": ("quality.py", None, ["--task", "smollm2"]),  # no quick form: one SmolLM2 run is ~5 minutes
    "overhead": ("engine_overhead.py", ["--rounds", "2"], []),
    "method-overhead": ("method_overhead.py", ["--steps", "12"], []),
    "buckets": ("bucket_threshold.py", ["--rounds", "3"], []),
    "rank-init": ("rank_init.py", ["--part", "planted", "--seeds", "1"], ["--part", "planted", "--seeds", "3"]),
    "fresh-data": ("fresh_data.py", None, []),  # no quick form: 26 CLI runs, about half an hour
}
QUICK_OUT = HERE / "results" / "quick"
LONG = ("quality-smollm2", "fresh-data")  # hours / half an hour on 2 cores: run only when named with --suite


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--suite",
        nargs="+",
        choices=sorted(SUITES),
        help="suites to run (default: all but quality-smollm2 and fresh-data)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer steps and one seed, into results/quick/ (under 10 minutes)"
    )
    args = parser.parse_args(argv)
    failed = []
    for name in args.suite or [n for n in SUITES if n not in LONG]:
        script, quick, full = SUITES[name]
        if args.quick and quick is None:
            print(f"== {name}: no quick form (run it without --quick)", flush=True)
            continue
        extra = [*quick, "--out", str(QUICK_OUT)] if args.quick else full
        command = [sys.executable, str(HERE / script), *extra]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"results: {QUICK_OUT if args.quick else HERE / 'results'}")
    if failed:
        print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
