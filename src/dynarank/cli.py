"""The ``dynarank`` command: train, eval, export, report, inspect, demo.

Every library error becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from . import commands, runs
from .data import DataError
from .io import AdapterFormatError
from .loop import ALL_METHODS
from .models import ModelError

USER_ERRORS = (
    DataError,
    ModelError,
    AdapterFormatError,
    ValueError,
    FileExistsError,
    FileNotFoundError,
    NotImplementedError,
)


def _train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="local Hugging Face model directory, or 'smollm2' for the packaged SmolLM2-135M-Instruct "
        "(default: the packaged all-MiniLM-L6-v2)",
    )
    p.add_argument(
        "--data",
        help="CSV or JSON Lines training file (default: the packaged tweets, binary sentiment; for a "
        "causal LM the packaged English dialog pairs)",
    )
    p.add_argument("--task", choices=["classify", "causal-lm"], help="task (default: inferred from the model)")
    p.add_argument("--text-column", help="text column (default: guessed: text, sentence, ...)")
    p.add_argument("--label-column", help="label column (default: guessed: label, sentiment, ...)")
    p.add_argument("--prompt-column", help="causal-lm: prompt column (default: guessed: prompt, question, ...)")
    p.add_argument("--response-column", help="causal-lm: response column (default: guessed: response, answer, ...)")
    p.add_argument(
        "--method",
        choices=ALL_METHODS,
        default="ard",
        help="ard: learned per-head ranks; elalora: importance-scored prune and expand; adalora-physical: "
        "importance-scored pruning that frees memory; dynarank-lora: fixed per-head ranks; lora / dora / "
        "adalora: stock PEFT baselines; full: full fine-tuning",
    )
    p.add_argument(
        "--r0",
        "--r",
        dest="r",
        type=int,
        default=8,
        help="initial rank per group (higher: more capacity and memory); spell it --r0 under torchrun",
    )
    p.add_argument(
        "--target-modules",
        help="regex of module names, a comma list of suffixes, or all-linear "
        "(default: every attention and MLP Linear of the encoder)",
    )
    p.add_argument("--granularity", choices=["head", "matrix"], help="rank groups per head or per matrix (ard)")
    p.add_argument("--head-layout", choices=["own", "shared"], help="per-head A rows, or A shared by the heads")
    p.add_argument("--ard-lambda", type=float, help="ARD l1 strength (relative; higher: smaller ranks)")
    p.add_argument("--rank-floor", type=int, help="smallest rank a group can end at (0: heads can switch off)")
    p.add_argument("--preset", choices=["default", "paper"], help="ARD settings: calibrated, or the paper's values")
    p.add_argument(
        "--target-params",
        type=int,
        help="adapter-parameter budget at the end (ard, elalora, adalora-physical); compare methods at equal "
        "parameters with it",
    )
    p.add_argument("--target-rank", type=float, help="adalora-physical: final mean rank per group (rank budget)")
    p.add_argument("--lambda-mode", choices=["relative", "gradient", "absolute"], help="ARD: how --ard-lambda is read")
    p.add_argument("--ard-beta", type=float, help="ARD: weight of the total-variation (rank stability) term")
    p.add_argument("--lr-alpha", type=float, help="ARD: learning rate of the alphas (default: fitted to the run)")
    p.add_argument("--warmup-frac", type=float, help="fraction of steps before ranks may change (default 0.2)")
    p.add_argument("--final-frac", type=float, help="fraction of steps at the end with ranks fixed (default 0.15)")
    p.add_argument("--resize-every", type=int, help="optimizer steps between rank changes (default: ~20 per run)")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the training data")
    p.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the adapters (and the task head)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example after truncation")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, initialisation)")
    p.add_argument("--eval-split", type=float, default=0.2, help="fraction of --data held out for evaluation")
    p.add_argument("--eval-data", help="separate evaluation file (same columns); overrides --eval-split")
    p.add_argument("--eval-every", type=int, help="also evaluate every N optimizer steps (logged in metrics.jsonl)")
    p.add_argument("--n-train", type=int, default=2000, help="examples taken from the packaged tweets")
    p.add_argument("--out", help="run directory to create (default: runs/<method>-<time>); never overwritten")
    p.add_argument("--config", help="YAML file whose keys are these options (command-line values win)")
    p.add_argument("--save-every", type=int, help="checkpoint the whole training state every N optimizer steps")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its newest complete checkpoint")
    p.add_argument(
        "--on-nonfinite",
        choices=["skip", "stop"],
        default="skip",
        help="NaN/inf loss or gradient: skip the step, or stop (the last checkpoint is kept)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynarank", description="LoRA with per-head ranks learned while training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library messages")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a model and write a run directory")
    _train_options(train)
    ev = sub.add_parser("eval", help="evaluate a run directory on a data file (JSON on stdout)")
    ev.add_argument("run_dir", help="run directory written by `dynarank train`, or a PEFT adapter directory")
    ev.add_argument("--model", help="base model of a bare adapter directory (default: the one it records)")
    ev.add_argument("--data", required=True, help="CSV or JSON Lines evaluation file")
    ev.add_argument("--text-column", help="text column (default: guessed)")
    ev.add_argument("--label-column", help="label column (default: guessed)")
    ev.add_argument("--prompt-column", help="causal-lm: prompt column (default: guessed)")
    ev.add_argument("--response-column", help="causal-lm: response column (default: guessed)")
    ev.add_argument("--max-length", type=int, default=64, help="tokens per example after truncation")
    ex = sub.add_parser("export", help="write a plain PEFT LoRA adapter (or a merged model) from a run")
    ex.add_argument("run_dir", help="run directory written by `dynarank train`")
    ex.add_argument("--out", required=True, help="output directory (must not exist, or hold an adapter)")
    ex.add_argument("--server-safe", action="store_true", help="scales baked into B, alpha = r (vLLM-style servers)")
    ex.add_argument("--merged", action="store_true", help="write the full model with the adapter merged in")
    rep = sub.add_parser("report", help="(re)draw the pictures of a run directory")
    rep.add_argument("run_dir", help="run directory written by `dynarank train`")
    ins = sub.add_parser("inspect", help="attach adapters to a model and print its modules, groups and ranks")
    ins.add_argument("--model", help="local model directory (default: the packaged all-MiniLM-L6-v2)")
    ins.add_argument("--r", type=int, default=8, help="rank per group")
    ins.add_argument("--target-modules", help="as for train")
    ins.add_argument("--granularity", choices=["head", "matrix"], default="head", help="groups per head or matrix")
    ins.add_argument("--head-layout", choices=["own", "shared"], default="own", help="per-head or shared A")
    bench = sub.add_parser("bench", help="run the benchmark suites of a source checkout (benchmarks/run.py)")
    bench.add_argument("--suite", nargs="+", help="planted, ablations, quality, overhead (default: all)")
    bench.add_argument("--quick", action="store_true", help="fewer steps and one seed (about 10 minutes)")
    demo = sub.add_parser("demo", help="ARD-LoRA on the packaged MiniLM + tweets, then plain LoRA at equal parameters")
    demo.add_argument("--max-steps", type=int, help="optimizer steps per run (default: 2 epochs of --n-train)")
    demo.add_argument("--n-train", type=int, default=1000, help="training tweets")
    demo.add_argument("--out", help="folder for the two run directories (default: runs/demo-<time>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "train":
            runs.train_command(runs.resolve_train_options(args, parser, argv))
        elif args.command == "eval":
            print(json.dumps(commands.eval_command(args), indent=1))
        elif args.command == "export":
            print(commands.export_command(args))
        elif args.command == "report":
            for path in commands.report_command(Path(args.run_dir)):
                print(path)
        elif args.command == "inspect":
            commands.inspect_command(args)
        elif args.command == "bench":
            return commands.bench_command(args)
        elif args.command == "demo":
            commands.demo_command(args, vars(parser.parse_args(["train"])))
    except USER_ERRORS as exc:
        print(f"dynarank {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynarank {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()
    return 0


def _leave_process_group() -> None:
    """Destroy a torchrun / accelerate process group this command joined (an undestroyed gloo group can
    abort the process at exit)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
