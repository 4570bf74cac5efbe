"""Run the benchmark suites; each writes JSON, a Markdown table and plots into benchmarks/results/.

    python benchmarks/run.py --quick                 # every suite in its quick form
    python benchmarks/run.py --suite planted quality # chosen suites, full form
    dynarank bench --quick                           # the same, from the command line

Suites: planted (planted-rank oracle), ablations (ARD-LoRA ablations on the planted task),
quality (MiniLM quality vs parameters, every method), overhead (step time and memory against
stock PEFT LoRA).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITES = {
    # name: (script, quick arguments, full arguments)
    "planted": ("planted_rank.py", ["--seeds", "1", "--steps", "1000"], ["--seeds", "3"]),
    "ablations": ("ablations.py", ["--seeds", "1"], ["--seeds", "3"]),
    "quality": ("quality.py", ["--quick"], []),
    "overhead": ("engine_overhead.py", ["--rounds", "2"], []),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", nargs="+", choices=sorted(SUITES), help="suites to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and one seed (about 10 minutes in all)")
    args = parser.parse_args(argv)
    failed = []
    for name in args.suite or list(SUITES):
        script, quick, full = SUITES[name]
        command = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(command[1:])}", flush=True)
        t0 = time.perf_counter()
        if subprocess.run(command).returncode != 0:
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"results: {HERE / 'results'}")
    if failed:
        print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
