"""``dynarank train`` options, from one source of truth: the run's own options are the fields of
:class:`TrainOptions`, and the adapter's are the fields of every method's config class (``dynarank.config``), each
flag made from its field (:mod:`.fields`). ``--config FILE.yaml`` is merged under the command line (a run's own
config.yaml trains the same run again), ``--resume`` continues a run with the options it recorded, and a knob the method
does not use is a ConfigError naming it.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import CONFIG_CLASSES, ConfigError, fields_of
from ..files import RunFileError, read_yaml, sha256_of
from ..training.loop import LR_SCHEDULE, TrainSpec
from ..training.methods import ALL_METHODS, DYNARANK_METHODS, check_knobs, knob_users, knobs_of
from ..training.models import model_record
from .fields import Number, NumberOrWord, Option, default_of, option_of, options_of
from .run_dir import RunDir


def other_tasks_columns(task: str) -> tuple[str, ...]:
    """The column options of the task that ``task`` is not ('classify' or 'causal-lm'): a run never reads them."""
    return ("prompt_column", "response_column") if task == "classify" else ("text_column", "label_column")


class OptionError(ValueError):
    """An option value, a --config key, or a --resume that would change the run."""


def _option(help: str, default: Any = None, **meta: Any) -> Any:
    """A TrainOptions field with its help text (numbers: ``low=`` / ``inclusive=`` bound them)."""
    return field(default=default, metadata={"help": help, **meta})


POSITIVE = {"low": 0, "inclusive": False}


@dataclass
class TrainOptions:
    """What ``dynarank train`` does: the run's own options, and ``knobs``, the config fields given for its method
    (typed, or from --config; every other field takes the method's default). Invalid knobs raise ConfigError."""

    model: str | None = _option(
        "local Hugging Face model directory, or 'smollm2' for the packaged SmolLM2-135M-Instruct "
        "(default: the packaged all-MiniLM-L6-v2)"
    )
    data: str | None = _option(
        "CSV or JSON Lines training file (default: the packaged tweets, binary sentiment; for a causal LM the "
        "packaged English dialog pairs)"
    )
    task: Literal["classify", "causal-lm"] | None = _option("task (default: inferred from the model)")
    quantize: Literal["nf4", "int8"] | None = _option(
        "causal-lm: load the base quantized with bitsandbytes, 4-bit NF4 (QLoRA) or 8-bit; the adapter stays float32 "
        "(default: the base as saved)"
    )
    text_column: str | None = _option("text column (default: guessed: text, sentence, ...)")
    label_column: str | None = _option("label column (default: guessed: label, sentiment, ...)")
    prompt_column: str | None = _option("causal-lm: prompt column (default: guessed: prompt, question, ...)")
    response_column: str | None = _option("causal-lm: response column (default: guessed: response, answer, ...)")
    method: str = _option(
        "ard: learned per-head ranks; elalora: importance-scored prune and expand; adalora-physical: "
        "importance-scored pruning that frees memory; dynarank-lora: fixed per-head ranks; lora / dora / adalora / "
        "eva: stock PEFT baselines (eva: LoRA with PEFT's data-driven ranks); full: full fine-tuning",
        "ard",
        choices=ALL_METHODS,
    )
    epochs: float = _option("passes over the training data", 2.0, **POSITIVE)
    max_steps: int | None = _option("optimizer steps (overrides --epochs)", **POSITIVE)
    batch_size: int = _option("examples per optimizer step", 32, **POSITIVE)
    lr: float | str | None = _option(
        "learning rate of the adapters (and the task head); default: the method's own for the task and the "
        "adapter's budget in plain LoRA ranks (docs/defaults.md); 'auto': a short range test around that default on "
        "the training data picks it (about as long again as the run; docs/defaults.md)",
        # Above 1e36 AdamW's first step, lr / (1 - beta1), overflows float32 inside torch (a traceback, not a stop).
        convert=NumberOrWord(Number(float, 0, inclusive=False, high=1e36), "auto"),
    )
    max_grad_norm: float | None = _option(
        "clip the gradient norm of what trains to this before each update (default: no clipping)", **POSITIVE
    )
    max_length: int = _option("tokens per example after truncation", 64, **POSITIVE)
    # At most 2**32: the data order draws from seed x 100_003 + epoch, which a torch generator takes below 2**64
    seed: int = _option("random seed (data order, initialisation, what the adapter draws)", 0, low=0, high=2**32)
    eval_split: float = _option("fraction of --data held out for evaluation", 0.2)
    eval_data: str | None = _option("separate evaluation file (same columns); overrides --eval-split")
    eval_every: int | None = _option(f"also evaluate every N optimizer steps (logged in {RunDir.METRICS})", **POSITIVE)
    n_train: int = _option(
        "examples taken from the packaged tweets (an even number: half of each class; a quarter more are held out)",
        2000,
        **POSITIVE,
    )
    out: str | None = _option("run directory to create (default: runs/<method>-<time>); never overwritten")
    config: str | None = _option(
        "YAML file whose keys are these options (command-line values win); a run's RUN/config.yaml trains the same run "
        "again (what it records beside the options is not read as options; a data file changed since is refused)"
    )
    save_every: int | None = _option("checkpoint the whole training state every N optimizer steps", **POSITIVE)
    resume: str | None = _option("continue RUN_DIR from its newest complete checkpoint", metavar="RUN_DIR")
    on_nonfinite: Literal["skip", "stop"] = _option(
        "NaN/inf loss or gradient: skip the step, or stop (the last checkpoint is kept)", "skip"
    )
    fsdp: bool = _option(
        "shard the frozen base model over the workers of a torchrun launch (FSDP2) instead of copying it to each; "
        "the adapters stay whole on every worker and resize as without it. In one process there is nothing to "
        "shard: the model trains whole (so a --fsdp run resumes on one process). A launch setting, like the number "
        "of workers: --resume takes it as given, else as the run was started",
        False,
    )
    knobs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fsdp and self.method == "full":
            raise OptionError(
                "--fsdp shards the frozen base model, and --method full freezes nothing: drop --fsdp (plain data "
                "parallelism)."
            )
        if "target_modules" in self.knobs:  # '' or None: the default for the model
            modules = parse_target_modules(self.knobs.pop("target_modules"))
            self.knobs.update({"target_modules": modules} if modules is not None else {})
        check_knobs(self.method, self.knobs)
        if self.quantize is not None and self.method == "full":
            raise ConfigError(
                ("quantize", "method"),
                "full fine-tuning trains every weight, and quantized weights cannot be trained: drop --quantize, or "
                "train an adapter (any other method).",
            )

    @property
    def r(self) -> int | None:
        """As given; None: the method's default start (TrainSpec.for_model resolves it: 8, or from the budget)."""
        return self.knobs.get("r")

    @property
    def target_modules(self) -> str | list[str] | None:
        """As given (parsed); None: the default for the model."""
        return self.knobs.get("target_modules")

    def method_knobs(self) -> dict[str, Any]:
        """The knobs beyond the rank and the modules to adapt (``TrainSpec.dynarank``)."""
        return {k: v for k, v in self.knobs.items() if k not in ("r", "target_modules")}

    def record(self, task: str, label_names: list[str] | None, target_modules) -> dict[str, Any]:
        """What config.yaml records: every option (paths absolute, the model as given), the knobs given, and the
        rank and the modules the run adapted."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("knobs", "resume")}
        record.update(self.knobs)
        record.update(
            model=model_record(self.model),  # a GGUF folder or 'smollm2', not its cached copy: resolved again on use
            data=_absolute(self.data),
            eval_data=_absolute(self.eval_data),
            config=_absolute(self.config),
            task=task,
            label_names=label_names,
        )
        if "r" in knobs_of(self.method):
            record.update(r=self.r, target_modules=target_modules)
        record.update(data_digests(self))
        return record

    @classmethod
    def from_record(cls, run: RunDir) -> TrainOptions:
        """The options ``run`` was started with, to continue it there (a damaged record is refused naming the key;
        knobs an earlier version recorded for a method that does not use them are dropped)."""
        path, values = run.options_file, {}
        for key, value in run.read_options().items():
            option = TRAIN_OPTIONS.get(key)
            if option is None or key in ("resume", "out"):
                continue  # what the run resolved (label names), or where it was
            try:
                values[key] = value if key == "target_modules" else option.coerce(value)
            except ValueError as exc:
                raise OptionError(f"{path}: {key}: {exc}.") from None
        if values.get("method") is None:
            raise RunFileError(f"{path} does not describe a run (it names no method).")
        method = values["method"]
        knobs = {k: values.pop(k) for k in list(values) if k in CONFIG_OPTIONS}
        knobs = {k: v for k, v in knobs.items() if v is not None and k in knobs_of(method)}
        return cls(**values, knobs=knobs, resume=str(run.path), out=str(run.path))


def _absolute(path: str | None) -> str | None:
    """``path`` resolved against the working directory (a run is used again from elsewhere)."""
    return None if path is None else str(Path(path).resolve())


# ---------------------------------------------------------------------------- the options, from the fields
PATH_OPTIONS = ("model", "data", "eval_data", "out", "config", "resume")  # given empty: refused, not the default
# Keys a run's config.yaml holds beside its options: what the run read, resolved or used without an option (the
# config file it was started from, its labels, its data's digests, where its rate and start rank came from, its
# schedule and weight decay). --config takes a run's record as it takes any options file: these are not options,
# and are checked only where the run started from the file would silently differ from the recorded one.
RECORD_FACTS = (
    "config",
    "label_names",
    "data_sha256",
    "eval_data_sha256",
    "lr_source",
    "r_source",
    "lr_schedule",
    "weight_decay",
)
LAUNCH_SETTINGS = ("fsdp",)  # options a resumed run may change: they change how it runs, not what it computes
RUN_OWN = ("method", "seed")  # config fields that are the run's own options (TrainOptions fields)
ALIASES = {"r": ("--r0",)}  # torchrun's own parser refuses --r as an ambiguous prefix of its own options
CLI_HELP = {
    "r": " --r0 is the same option: torchrun's own parser refuses --r as an ambiguous prefix of its options.",
    "target_modules": " On the command line: a regex, a comma list of name suffixes, or all-linear (default: every "
    "attention and MLP Linear of a BERT-style encoder, else all-linear).",
}


def config_help(name: str, methods: tuple[str, ...] = tuple(CONFIG_CLASSES)) -> str:
    """A config field's help text (from the first method that has it) and its default among ``methods``, per method
    if they differ."""
    classes = {m: CONFIG_CLASSES[m] for m in methods}
    defaults = {m: default_of(fields_of(c)[name]) for m, c in classes.items() if name in fields_of(c)}
    text = next(fields_of(c)[name].metadata["help"] for c in CONFIG_CLASSES.values() if name in fields_of(c))
    if name in CLI_HELP:
        return text + CLI_HELP[name]
    values: list = []  # the distinct defaults (lists among them: not hashable)
    for value in defaults.values():
        values += [] if value in values else [value]
    if len(values) > 1:
        per = "; ".join(f"{v} for {', '.join(m for m, d in defaults.items() if d == v)}" for v in values)
        return f"{text} (default: {per})"
    return text if values[0] in (None, []) else f"{text} (default: {values[0]})"


def _config_options() -> dict[str, Option]:
    """An option for every field of every method's config class (but the run's own method and seed)."""
    found: dict[str, Option] = {}
    for cls in CONFIG_CLASSES.values():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name not in found and f.name not in RUN_OWN:
                found[f.name] = option_of(f, hints[f.name], ALIASES.get(f.name, ()), config_help(f.name))
    return found


RUN_OPTIONS: dict[str, Option] = options_of(TrainOptions)  # the run's own
CONFIG_OPTIONS: dict[str, Option] = _config_options()  # the adapter's: the config fields
TRAIN_OPTIONS: dict[str, Option] = {**RUN_OPTIONS, **CONFIG_OPTIONS}  # every `dynarank train` option, by field


def config_groups() -> dict[str, list[Option]]:
    """The config options by the methods that use them (a group of the help each)."""
    groups: dict[str, list[Option]] = {}
    for name, option in CONFIG_OPTIONS.items():
        users = knob_users(name)
        title = "every method but full" if set(users) == set(ALL_METHODS) - {"full"} else ", ".join(users)
        groups.setdefault(title, []).append(option)
    return groups


def flag_of(name: str) -> str:
    """The flag that sets field ``name`` (the loop's total_steps is set by --max-steps)."""
    option = TRAIN_OPTIONS.get("max_steps" if name == "total_steps" else name)
    return option.flag if option is not None else "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------- resolving what was given
def resolve_train_options(typed: dict[str, Any]) -> TrainOptions:
    """The options of a ``train`` command line: ``typed`` holds exactly the options typed (argparse's destinations);
    ``--config FILE.yaml`` supplies the others, checked and converted as command-line values are; every option
    given by neither takes its default. With ``--resume``, the run's own options, and every option given (typed or
    from the file) must equal the run's."""
    refuse_empty_paths(typed)
    given = dict(typed)
    if typed.get("config") is not None:
        given = {**read_config_file(Path(typed["config"]), skip=set(typed)), **typed}
        refuse_empty_paths(given)
    if given.get("resume"):
        return resumed(RunDir(given["resume"]), given)
    run_own = {k: v for k, v in given.items() if k not in CONFIG_OPTIONS}
    return TrainOptions(**run_own, knobs={k: v for k, v in given.items() if k in CONFIG_OPTIONS and v is not None})


def refuse_empty_paths(given: dict[str, Any]) -> None:
    """OptionError naming a path option given empty (``--out ""``), which would silently mean its default."""
    for dest in PATH_OPTIONS:
        if isinstance(given.get(dest), str) and not given[dest].strip():
            flag = TRAIN_OPTIONS[dest].flag
            raise OptionError(f"{flag} is empty: give a path, or leave {flag} out.")


def read_config_file(path: Path, skip: set[str] = frozenset()) -> dict[str, Any]:
    """The options a --config file gives, by destination. A key is an option's flag (``r0``, ``max-steps``) or field
    name (``max_steps``), with '-' or '_'; values of the options in ``skip`` (typed, which win) are not checked.

    A run's config.yaml is such a file (``--config RUN/config.yaml --out NEW`` trains the same run again): the keys
    it records beside the options (``RECORD_FACTS``) are not options, and are checked only where the run would
    silently differ from the recorded one (:func:`check_record_facts`)."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = read_yaml(path)
    except RunFileError as exc:
        raise OptionError(str(exc)) from None
    table = {name: o for o in TRAIN_OPTIONS.values() if o.dest != "config" for name in o.names()}
    found: dict[str, Any] = {}
    facts: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, value in values.items():
        if str(key).lstrip("-").replace("-", "_") in RECORD_FACTS:
            facts[str(key).lstrip("-").replace("-", "_")] = value
            continue
        option = table.get(str(key).lstrip("-"))
        if option is None:
            known = sorted({f.lstrip("-") for o in TRAIN_OPTIONS.values() if o.dest != "config" for f in o.flags})
            raise OptionError(f"{path}: unknown option {key!r}; known: {', '.join(known)}.")
        if option.dest in seen:
            raise OptionError(f"{path}: {seen[option.dest]!r} and {key!r} both set {option.flag}; keep one.")
        seen[option.dest] = str(key)
        if option.dest not in skip:
            try:
                found[option.dest] = option.coerce(value)
            except ValueError as exc:
                raise OptionError(f"{path}: {key}: {exc}.") from None
    check_record_facts(path, facts, found)
    return found


def check_record_facts(path: Path, facts: dict[str, Any], found: dict[str, Any]) -> None:
    """OptionError where a run started from the options file at ``path`` (the options ``found`` in it) would not be
    the run its recorded ``facts`` describe: a data file it names that has changed since (its sha256), a weight decay
    or a learning-rate schedule other than the ones ``dynarank train`` uses (no option sets them). The other facts
    follow from the options and the data (label names, where the rate and the start rank came from)."""
    for key in ("data", "eval_data"):
        digest, file = facts.get(f"{key}_sha256"), found.get(key)  # a file typed on the command line is not checked
        if digest is not None and file is not None and Path(file).is_file() and sha256_of(file) != digest:
            flag = TRAIN_OPTIONS[key].flag
            raise OptionError(
                f"{path} records {flag} {file} by its sha256 ({key}_sha256), and the file has changed since, so this "
                f"run would not be the recorded one: put the file back, or give {flag} {file} to train on it as it "
                "is now."
            )
    spec = {f.name: f.default for f in dataclasses.fields(TrainSpec)}  # what the CLI trains with: the defaults
    schedule = {"name": LR_SCHEDULE, "warmup_ratio": spec["warmup_ratio"]}
    used = {"weight_decay": spec["weight_decay"], "lr_schedule": schedule}
    for key, value in used.items():
        recorded = facts.get(key)
        if isinstance(recorded, dict):  # the schedule's warm-up in steps follows from the run's length
            recorded = {k: recorded.get(k) for k in value}
        if key in facts and recorded != value:
            raise OptionError(
                f"{path}: {key} {facts[key]!r} is not what dynarank train uses ({value!r}) and no option sets it, "
                "so this run would not be the recorded one: drop the key."
            )


def resumed(run: RunDir, given: dict[str, Any]) -> TrainOptions:
    """A resumed run continues with the options it was started with: an option given with --resume that differs
    from the run's is refused, naming each (a run changed half-way would be neither run; options equal to the run's
    are accepted, and so is a knob the run left to its method given the value the method resolved it to, where the
    run's records show it: :meth:`RunDir.resolved_settings`)."""
    options = TrainOptions.from_record(run)
    if "fsdp" in given:  # how the workers hold the base, not what the run computes: it may change on resume
        options = dataclasses.replace(options, fsdp=given["fsdp"])
    recorded = run.read_options()
    differ = []
    for dest in sorted(set(given) - {"resume", *LAUNCH_SETTINGS}):
        mine, theirs = _comparable(dest, given[dest], run), _recorded(dest, recorded, options.method, run)
        if theirs is None and mine is not None and dest in CONFIG_OPTIONS:  # left to the method: what it resolved
            theirs = run.resolved_settings().get(dest)
        if mine != theirs:
            shown = ",".join(theirs) if isinstance(theirs, list) else theirs
            if shown is None and dest in CONFIG_OPTIONS:
                shown = "not given" + ("" if run.file(RunDir.SUMMARY).is_file() else _UNRESOLVED)
            differ.append(f"{TRAIN_OPTIONS[dest].flag} {given[dest]} (the run's: {shown})")
    if differ:
        one = len(differ) == 1
        raise OptionError(
            f"--resume continues {run.path} with the options it was started with, and {'; '.join(differ)} "
            f"{'differs' if one else 'differ'}: drop {'it' if one else 'them'}, or start a new run with another --out."
        )
    for key, digest in data_digests(options).items():
        if recorded.get(key) not in (None, digest):  # None: recorded before the digests were
            path = getattr(options, key.removesuffix("_sha256"))
            raise OptionError(
                f"--resume continues {run.path} on the data it was started with, and {path} has changed since (its "
                "sha256 is not the one the run recorded): a run trained on two data sets would be neither; put the "
                "file back as it was, or start a new run with another --out."
            )
    return options


_UNRESOLVED = ", left to its method: what that resolves to is recorded, in summary.json, once the run finishes"


def data_digests(options: TrainOptions) -> dict[str, str]:
    """The sha256 of the run's data files (--data, --eval-data), which a resume holds them to: {'data_sha256': ...}.
    A file that is not there is left to the loader to report."""
    paths = {"data": options.data, "eval_data": options.eval_data}
    return {f"{key}_sha256": sha256_of(path) for key, path in paths.items() if path and Path(path).is_file()}


def _recorded(dest: str, recorded: dict, method: str, run: RunDir):
    """The run's value of option ``dest``: recorded, or (a knob it was not given) its method's default."""
    if dest == "out":
        return str(run.path.resolve())  # the run continues in its own directory
    if dest in recorded or dest not in CONFIG_OPTIONS or method not in DYNARANK_METHODS:
        return recorded.get(dest)
    config = fields_of(CONFIG_CLASSES[method])
    return default_of(config[dest]) if dest in config else None


def _comparable(dest: str, value, run: RunDir):
    """An option's value as a run records it (absolute paths, the parsed module list)."""
    if value is None:
        return None
    if dest == "model":
        return model_record(value)
    if dest in ("data", "eval_data", "config", "out"):
        return str(Path(value).resolve())
    if dest == "target_modules":
        return parse_target_modules(value)
    return value


# ---------------------------------------------------------------------------- --target-modules
_REGEX = re.compile(r"[\\.*()\[\]|^$+?]")  # a character only a regular expression has


def parse_target_modules(spec: str | list[str] | None) -> str | list[str] | None:
    """--target-modules as the loop takes it: 'all-linear', a regular expression (which must compile), or a comma
    list of module-name suffixes; a list (YAML, or a run's record) is kept; None or '' is the default."""
    if isinstance(spec, (list, tuple)):
        return list(spec)
    if not spec:
        return None
    if spec == "all-linear" or not _REGEX.search(spec):
        return spec if spec == "all-linear" else [s.strip() for s in spec.split(",") if s.strip()]
    try:
        re.compile(spec)
    except re.error as exc:
        raise OptionError(f"--target-modules {spec!r} is not a valid regular expression ({exc}).") from None
    return spec
