"""Find the target Linear modules of a Hugging Face model and put elastic adapters on them."""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .config import (
    DEFAULT_START_RANK,
    FUSED_QKV_SUFFIXES,
    KEY_VALUE_SUFFIXES,
    OUTPUT_SUFFIXES,
    QUERY_SUFFIXES,
    TASK_HEAD_NAMES,
    ConfigError,
    DynaRankConfig,
    RankControlConfig,
)
from .defaults import DEFAULT_ALPHA_AT, budget_in_lora_ranks, studied_start_rank, task_of
from .layer import ElasticLoRALinear
from .naming import ARD_ATTR, SVD_ATTR
from .quantized import keep_training_layout, refuse_merge
from .slot_costs import SlotCosts

logger = logging.getLogger(__name__)

ATTACHED_ATTR = "dynarank_config"
CONTROLLED_ATTR = "_dynarank_controlled"  # True once a rank controller is built on the model (controllers/base.py)
_WARNED_ATTR = "_dynarank_warned_uncontrolled"
# {parameter name: requires_grad} of the model before attach: what unwrap gives back (the names are the same again
# once the Linear modules are back in place)
_REQUIRES_GRAD_ATTR = "_dynarank_requires_grad"


def _warn_if_uncontrolled(model: nn.Module, args, output) -> None:
    """Forward hook of a model attached for a method that learns ranks: the first training forward (training mode,
    gradients on) with no rank controller built on the model warns, once, that its ranks will stay where they start.
    A plain Trainer without DynaRankCallback, or a loop that never calls build_controller, trained fixed ranks
    without a word. The data start's measuring pass runs in eval mode and is not a training forward."""
    if not (model.training and torch.is_grad_enabled()) or getattr(model, CONTROLLED_ATTR, False):
        return
    config = getattr(model, ATTACHED_ATTR, None)
    if not isinstance(config, RankControlConfig) or getattr(model, _WARNED_ATTR, False):
        return
    setattr(model, _WARNED_ATTR, True)
    warnings.warn(
        f"dynarank: this model trains without a rank controller, so method {config.method!r} learns no ranks: every "
        "group stays at its start. Build one before training: dynarank.build_controller(model, total_steps) in your "
        "own loop (its optimizer bound to it), or train with dynarank.DynaRankTrainer / DynaRankCallback.",
        UserWarning,
        stacklevel=2,
    )


@dataclass(frozen=True)
class HeadGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def _has_suffix(name: str, suffixes: tuple[str, ...] | list[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _cfg_get(cfg, *keys: str):
    """The first of ``keys`` set on ``cfg``, or on its text config (vision-language models nest it)."""
    text = getattr(cfg, "get_text_config", None)
    configs = [cfg] + ([text()] if callable(text) else [])
    for c in configs:
        for key in keys:
            value = getattr(c, key, None) if c is not None else None
            if value is not None:
                return value
    return None


def _governing_config(model: nn.Module, name: str | None):
    """The config that describes module ``name``: the ``config`` of the nearest module above it that carries one - a
    tower of an encoder-decoder (EncoderDecoderModel's encoder and decoder), a vision tower of a vision-language
    model or of CLIP, each with its own head count - else the model's."""
    from transformers import PretrainedConfig

    parts = [] if name is None else name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        owner = model.get_submodule(".".join(parts[:i]))
        if isinstance(getattr(owner, "config", None), PretrainedConfig):
            return owner.config
    return getattr(model, "config", None)


def head_geometry(model: nn.Module, config: DynaRankConfig, name: str | None = None) -> HeadGeometry | None:
    """Heads of module ``name`` (None: of the model) from the config overrides, else from the config that describes
    it (:func:`_governing_config`; a decoder's own head count where one config holds both sides' counts, as
    BART's and Whisper's do); None if unknown."""
    cfg = _governing_config(model, name)
    side = next((part for part in (name or "").split(".")[:-1] if part in ("encoder", "decoder")), None)
    sided = (f"{side}_attention_heads",) if side else ()
    heads = config.num_heads or _cfg_get(cfg, *sided, "num_attention_heads", "n_head", "num_heads")
    if heads is None:
        return None
    if not isinstance(heads, int):
        raise ConfigError(
            ("granularity", "num_heads"),
            f"{type(model).__name__}'s config gives the head count per stage ({heads}), not one for every attention "
            "module: use granularity='matrix' (one rank group per matrix).",
        )
    kv = config.num_kv_heads or _cfg_get(cfg, "num_key_value_heads") or heads
    head_dim = config.head_dim or _cfg_get(cfg, "head_dim")
    if head_dim is None:
        hidden = _cfg_get(cfg, "hidden_size", "d_model", "n_embd")
        if hidden is None or hidden % heads:
            raise ConfigError("head_dim", f"cannot be inferred from hidden size {hidden} and {heads} heads: set it.")
        head_dim = hidden // heads
    return HeadGeometry(int(heads), int(kv), int(head_dim))


def target_geometries(model: nn.Module, targets: list[str], config: DynaRankConfig) -> dict[str, HeadGeometry | None]:
    """Every target's head geometry (None for all under granularity='matrix'): a model's parts may have heads of
    their own (an encoder-decoder's towers, a vision tower beside a language model)."""
    if config.granularity != "head":
        return dict.fromkeys(targets)
    return {name: head_geometry(model, config, name) for name in targets}


def _task_head_names(model: nn.Module) -> set[str]:
    names = {n for n, _ in model.named_modules() if n.split(".")[-1] in TASK_HEAD_NAMES and n.count(".") <= 1}
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    if out_emb is not None:
        names |= {n for n, m in model.named_modules() if m is out_emb}
    return names


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get_out = getattr(model, "get_output_embeddings", None)
    return get_out() if callable(get_out) else None


def _heads_trained_whole(model: nn.Module, config: DynaRankConfig, heads: set[str]) -> set[str]:
    """The task heads among ``heads`` that train whole: those ``modules_to_save`` names, or by default every one but
    the LM head (the output embedding, tied or not: whole, it is vocabulary x hidden parameters), which stays
    frozen (:func:`resolve_modules_to_save`)."""
    if config.modules_to_save is not None:
        return {h for h in heads if _has_suffix(h, config.modules_to_save)}
    out_emb = _output_embeddings(model)
    return {h for h in heads if out_emb is None or model.get_submodule(h) is not out_emb}


def _linear_summary(names: list[str]) -> str:
    """The Linear module names with layer indices folded ('model.layers.{i}.self_attn.q_proj'), for messages."""
    return ", ".join(sorted({re.sub(r"\.\d+\.", ".{i}.", n) for n in names})) or "(none)"


def _tied_to_input_embeddings(model: nn.Module, name: str) -> bool:
    """Whether module ``name`` shares its weight with the model's input embeddings (a tied LM head)."""
    get_in = getattr(model, "get_input_embeddings", None)
    embeddings = get_in() if callable(get_in) else None
    weight = getattr(model.get_submodule(name), "weight", None)
    return embeddings is not None and weight is not None and weight is getattr(embeddings, "weight", None)


def linear_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def select_targets(model: nn.Module, config: DynaRankConfig) -> list[str]:
    """Full names of the Linear modules to adapt; raises ValueError if none match."""
    heads = _task_head_names(model)
    linear = linear_module_names(model)
    spec = config.target_modules

    def matched(names: list[str], exclude: bool = True) -> list[str]:
        if spec == "all-linear":
            chosen = list(names)
        elif isinstance(spec, str):
            pattern = re.compile(spec)
            chosen = [n for n in names if pattern.fullmatch(n)]
        else:
            chosen = [n for n in names if _has_suffix(n, spec)]
        # A task head is trained in full (modules_to_save), so nothing inside it is adapted, whatever the spec:
        # RoBERTa-style heads hold Linear modules of their own (classifier.dense, classifier.out_proj).
        chosen = [n for n in chosen if not any(n == h or n.startswith(h + ".") for h in heads)]
        return [n for n in chosen if not (exclude and _has_suffix(n, config.exclude_modules))]

    chosen = matched(linear)
    conv1d = matched([n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"])
    if chosen and conv1d:  # GPT-2 style projections beside Linear ones (a vision encoder with a GPT-2 decoder)
        logger.warning(
            "dynarank: target_modules=%r also matches %d transformers Conv1D modules (%s%s), which dynarank does not "
            "adapt (only nn.Linear): they stay frozen, and only the %d Linear modules get adapters.",
            spec,
            len(conv1d),
            ", ".join(conv1d[:3]),
            ", ..." if len(conv1d) > 3 else "",
            len(chosen),
        )
    if not chosen:
        notes = ""
        if config.exclude_modules and matched(linear, exclude=False):
            notes += f" exclude_modules={list(config.exclude_modules)} leaves out every module it matches."
        trained = _heads_trained_whole(model, config, heads)
        tied = sorted(h for h in heads - trained if _tied_to_input_embeddings(model, h))
        frozen = sorted(heads - trained - set(tied))
        if trained:
            notes += f" Task heads ({', '.join(sorted(trained))}) are trained in full, never adapted."
        if frozen and config.modules_to_save is None:  # the output embedding, which the default leaves out
            notes += (
                f" The LM head ({', '.join(frozen)}) is never adapted, and it stays frozen: the default "
                "modules_to_save leaves it out (name it there to train it whole)."
            )
        elif frozen:
            notes += f" Task heads ({', '.join(frozen)}) are never adapted, and modules_to_save leaves them frozen."
        if tied:
            notes += f" The LM head ({', '.join(tied)}) is tied to the input embeddings: it stays frozen, not adapted."
        conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        if conv1d:
            notes += (
                f" Its projections are transformers Conv1D modules ({conv1d[0]}, ...), which dynarank does not adapt: "
                "only nn.Linear is supported."
            )
        raise ConfigError(
            "target_modules",
            f"{spec!r} matches no Linear module of {type(model).__name__}. "
            f"Its Linear modules are: {_linear_summary(linear)}.{notes}",
        )
    return chosen


def _field_default(config: DynaRankConfig, name: str):
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def unmatched_entries(model: nn.Module, config: DynaRankConfig, targets: list[str]) -> dict[str, dict[str, str]]:
    """The names given in ``target_modules`` and ``exclude_modules`` that match nothing, with why: {field: {name:
    reason}} (empty: every name matches). A ``target_modules`` name must match one of ``targets`` (the modules
    :func:`select_targets` chose); an ``exclude_modules`` name, one of the model's Linear modules. A regex, 'all-linear'
    and the default list (the library's choice, not the user's) are matched as a whole by :func:`select_targets`."""
    linear = linear_module_names(model)
    spec, found = config.target_modules, {}
    if not isinstance(spec, str) and spec != _field_default(config, "target_modules"):
        heads = _task_head_names(model)
        reasons = {}
        for entry in (e for e in spec if not any(_has_suffix(n, [e]) for n in targets)):
            named = [n for n in linear if _has_suffix(n, [entry])]
            if any(n == h or n.startswith(h + ".") for n in named for h in heads):
                reasons[entry] = "names a task head, which is never adapted (modules_to_save trains one whole)"
            elif named:
                reasons[entry] = "matches only modules that exclude_modules leaves out"
            elif any(_has_suffix(n, [entry]) for n, m in model.named_modules() if type(m).__name__ == "Conv1D"):
                reasons[entry] = "matches only transformers Conv1D modules, which dynarank does not adapt"
            else:
                reasons[entry] = "matches no Linear module"
        if reasons:
            found["target_modules"] = reasons
    missing = [e for e in config.exclude_modules if not any(_has_suffix(n, [e]) for n in linear)]
    if missing:
        found["exclude_modules"] = dict.fromkeys(missing, "matches no Linear module")
    return found


def refuse_unmatched_entries(model: nn.Module, config: DynaRankConfig, targets: list[str]) -> None:
    """ConfigError naming every ``target_modules`` / ``exclude_modules`` name that matches nothing
    (:func:`unmatched_entries`), as ``modules_to_save`` refuses one: a misspelt name would otherwise leave its
    modules unadapted (or adapted) without a word, while the names beside it do match."""
    found = unmatched_entries(model, config, targets)
    for field, reasons in found.items():
        why = "; ".join(f"{name!r} {reason}" for name, reason in reasons.items())
        raise ConfigError(
            field,
            f"{list(reasons)} match nothing in {type(model).__name__} ({why}). Every name given must match a module: "
            f"correct or remove {'it' if len(reasons) == 1 else 'them'}. Its Linear modules are: "
            f"{_linear_summary(linear_module_names(model))}.",
        )


def without_unmatched_entries(model: nn.Module, config: DynaRankConfig) -> DynaRankConfig:
    """``config`` without the ``target_modules`` / ``exclude_modules`` names that match nothing in ``model``: what
    loading an adapter saved before such names were refused needs (the names that matched chose its layers)."""
    try:
        found = unmatched_entries(model, config, select_targets(model, config))
    except ValueError:  # nothing matches at all: attach says so
        return config
    changes = {field: [e for e in getattr(config, field) if e not in reasons] for field, reasons in found.items()}
    return dataclasses.replace(config, **changes) if changes else config


def layer_plan(name: str, module: nn.Linear, config: DynaRankConfig, geometry: HeadGeometry | None) -> dict:
    """How to split one target: {'n_groups', 'split'}."""
    if config.granularity == "matrix" or geometry is None:
        return {"n_groups": 1, "split": "rows"}
    if _has_suffix(name, QUERY_SUFFIXES):
        heads, split, dim = geometry.num_heads, "rows", module.out_features
    elif _has_suffix(name, KEY_VALUE_SUFFIXES):
        heads, split, dim = geometry.num_kv_heads, "rows", module.out_features
    elif _has_suffix(name, OUTPUT_SUFFIXES):
        heads, split, dim = geometry.num_heads, "cols", module.in_features
    else:
        return {"n_groups": 1, "split": "rows"}
    if heads * geometry.head_dim != dim:
        raise ConfigError(
            ("num_heads", "num_kv_heads", "head_dim", "granularity"),
            f"{name}: {heads} heads x head size {geometry.head_dim} = {heads * geometry.head_dim} does not match its "
            f"{'output' if split == 'rows' else 'input'} size {dim}; set the head counts and size, or use one group "
            "per matrix.",
        )
    return {"n_groups": heads, "split": split}


def plan_costs(module: nn.Linear, plan: dict, head_layout: str) -> SlotCosts:
    """What ranks of the layer :func:`layer_plan` planned for ``module`` will cost (its group and shared-side sizes;
    a single group is always the 'own' layout)."""
    rows = plan["split"] == "rows"
    grouped, other = (module.out_features, module.in_features) if rows else (module.in_features, module.out_features)
    layout = head_layout if plan["n_groups"] > 1 else "own"
    return SlotCosts(grouped // plan["n_groups"], other, plan["n_groups"], layout)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def elastic_layers(model: nn.Module) -> dict[str, ElasticLoRALinear]:
    """Every elastic adapter layer in ``model``, by full module name (the name of the Linear it wraps)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, ElasticLoRALinear)}


def resolve_modules_to_save(model: nn.Module, config: DynaRankConfig) -> list[str]:
    if config.modules_to_save is not None:
        names = [n for n, _ in model.named_modules() if n and _has_suffix(n, config.modules_to_save)]
        missing = [s for s in config.modules_to_save if not any(_has_suffix(n, [s]) for n in names)]
        if missing:
            raise ConfigError("modules_to_save", f"{missing} match no module of {type(model).__name__}.")
        return names
    # an LM head (the output embedding, tied or not) stays frozen: whole, it is vocabulary x hidden parameters
    return sorted(_heads_trained_whole(model, config, _task_head_names(model)))


def refuse_peft_model(model: nn.Module) -> None:
    """A model that already carries PEFT's adapters is refused: dynarank would adapt around them (skipping the
    modules PEFT wrapped, or adapting PEFT's own lora_A / lora_B under 'all-linear') and freeze them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = next((name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)), None)
    if wrapped is not None:
        kind = type(model.get_submodule(wrapped))
        raise ValueError(
            f"this model already carries PEFT adapters ({wrapped} is PEFT's {kind.__module__}.{kind.__name__}): "
            "dynarank puts on adapters of its own. Attach to the base model (PEFT's merge_and_unload() keeps what its "
            "adapters learned in the base weights; get_base_model() does not)."
        )


def refuse_overlap(targets: list[str], save_names: list[str]) -> None:
    """A module both adapted and trained whole (in modules_to_save, or holding a target) is refused: its frozen base
    would train beside the adapter, and no stock PEFT adapter can hold both."""
    for save in save_names:
        for target in targets:
            if target == save or target.startswith(save + ".") or save.startswith(target + "."):
                raise ConfigError(
                    ("modules_to_save", "target_modules"),
                    f"{save!r} is trained whole (modules_to_save) and {target!r} is adapted: a module is one or the "
                    "other. Leave it out of one of them.",
                )


def _check_arguments(model, config) -> None:
    """TypeError, before anything reads them, for a model that is not a torch Module or a config that is not a
    DynaRankConfig (a dict of its fields, None, another library's config)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"attach() takes the model (a torch.nn.Module) first, got {type(model).__name__}: "
            "dynarank.attach(model, dynarank.DynaRankConfig(...))."
        )
    if isinstance(config, DynaRankConfig):
        return
    if config is None:
        hint = "a config is needed: dynarank.attach(model, dynarank.DynaRankConfig(method=..., ...))."
    elif isinstance(config, Mapping):
        hint = "build the config from its fields: dynarank.DynaRankConfig(**fields)."
    else:
        hint = "dynarank.attach(model, dynarank.DynaRankConfig(method=..., ...))."
    raise TypeError(f"attach() takes a dynarank.DynaRankConfig as its config, got {type(config).__name__}: {hint}")


def attach(model: nn.Module, config: DynaRankConfig) -> nn.Module:
    """Put elastic LoRA adapters on ``model``'s targets, freeze the base, keep the task head trainable.

    Every layer is built and checked before the first one is swapped in, so a bad config leaves
    the model untouched. Returns the same model object.

    Raises:
        TypeError: ``model`` is not a torch Module, or ``config`` not a DynaRankConfig.
        ValueError (ConfigError naming the field): a name in ``target_modules``, ``exclude_modules`` or
            ``modules_to_save`` that matches nothing, a target list that selects no Linear module, head counts that
            do not fit; a model that already carries adapters (dynarank's or PEFT's).
    """
    _check_arguments(model, config)
    config.validate()  # a field changed since the config was built is checked before anything reads it
    if getattr(model, ATTACHED_ATTR, None) is not None or elastic_layers(model):
        raise ValueError("this model already carries dynarank adapters; attach() once per model.")
    refuse_peft_model(model)
    if isinstance(config, RankControlConfig) and isinstance(model, nn.Sequential):
        raise ValueError(
            f"method {config.method!r} keeps the parameters that learn the ranks in a submodule of the model, and an "
            f"nn.Sequential ({type(model).__name__}) runs every submodule in its forward. Attach to the model inside "
            "it (a SentenceTransformer's Hugging Face model is model[0].auto_model), or to a Module that holds the "
            "Sequential."
        )
    targets = select_targets(model, config)
    refuse_unmatched_entries(model, config, targets)
    geometries = target_geometries(model, targets, config)
    if config.r is None:  # a budget without a start: the defaults study's for the method at that budget
        r = _start_rank(model, targets, config, geometries)
        logger.info(
            "dynarank: r not given: %s starts at r=%d (the defaults study's start at its budget)", config.method, r
        )
        try:
            config = dataclasses.replace(config, r=r)
        except ConfigError as exc:  # a field bounded by r (rank_floor): say where this r came from
            raise ConfigError(
                exc.fields, f"{exc.problem} (r was not given: r={r} is the defaults study's start at this budget)"
            ) from None
    if config.granularity == "head":
        attention = [
            n
            for n in targets
            if geometries[n] is None and _has_suffix(n, QUERY_SUFFIXES + KEY_VALUE_SUFFIXES + OUTPUT_SUFFIXES)
        ]
        if attention:
            logger.warning(
                "granularity='head' but %s's config gives no head count: %s and every other target get one rank "
                "group per matrix. Set DynaRankConfig(num_heads=..., num_kv_heads=..., head_dim=...) for per-head "
                "ranks.",
                type(model).__name__,
                attention[0],
            )
        fused = [n for n in targets if _has_suffix(n, FUSED_QKV_SUFFIXES)]
        if fused:
            logger.warning(
                "dynarank: granularity='head', but %s and %d more compute q, k and v in one matrix: each gets one rank "
                "group per matrix (the heads of three projections share its output rows).",
                fused[0],
                len(fused) - 1,
            )
    save_names = resolve_modules_to_save(model, config)
    refuse_overlap(targets, save_names)
    generator = None
    if config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)
    flags = {id(p): p.requires_grad for p in model.parameters()}
    flags_by_name = {name: p.requires_grad for name, p in model.named_parameters()}  # what unwrap gives back
    try:
        built = _build_layers(model, targets, config, geometries, generator)
    except Exception:
        for p in model.parameters():  # a layer freezes its base when built: undo that
            p.requires_grad_(flags[id(p)])
        raise
    # The output scale can depend on the adapter's start size (AdaLoRA-style's: the fraction of it that it ends at,
    # where the defaults study put lora_alpha at the target for the model's kind of task).
    alpha_at = DEFAULT_ALPHA_AT[task_of(model)].get(config.method)
    scale = config.output_scale(sum(layer.num_adapter_parameters() for layer in built.values()), alpha_at)
    for layer in built.values():
        layer.scaling = float(scale)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in built.items():
        _set_submodule(model, name, layer)
        for p in layer.adapter_parameters():
            p.requires_grad_(True)
    for name in save_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    half = [n for n in save_names if any(p.dtype == torch.float16 for p in model.get_submodule(n).parameters())]
    if half:
        logger.warning(
            "dynarank: %s trains whole in float16 (modules_to_save): AdamW's epsilon (1e-8) is below float16's "
            "range, so its first step makes those weights non-finite. Load the model in float32 or bfloat16, or cast "
            "%s to float32 (the adapters are float32 on a half-precision base already).",
            ", ".join(half),
            "it" if len(half) == 1 else "them",
        )
    setattr(model, ATTACHED_ATTR, config)
    setattr(model, _REQUIRES_GRAD_ATTR, flags_by_name)
    model.dynarank_modules_to_save = save_names
    if isinstance(config, RankControlConfig):
        model.register_forward_hook(_warn_if_uncontrolled)
    keep_training_layout(model)  # a 4-bit base computes in eval as in training (quantized.py: the repacking trap)
    logger.info("dynarank: %d adapted modules, %d trainable parameters", len(built), count_trainable(model))
    return model


def start_rank(model: nn.Module, config: DynaRankConfig) -> int:
    """The rank every group of ``model``'s targets starts at under ``config``: its ``r``, or unset (with a budget),
    the start the defaults study gave the method at that budget (dynarank.defaults.studied_start_rank; the budget
    in plain LoRA ranks on these targets), at most the largest rank every target's groups can hold."""
    if config.r is not None:
        return config.r
    targets = select_targets(model, config)
    return _start_rank(model, targets, config, target_geometries(model, targets, config))


def _start_rank(
    model: nn.Module, targets: list[str], config: DynaRankConfig, geometries: dict[str, HeadGeometry | None]
) -> int:
    modules = {name: model.get_submodule(name) for name in targets}
    budget = budget_in_lora_ranks(config.target_params, [(m.in_features, m.out_features) for m in modules.values()])
    studied = studied_start_rank(config.method, budget) if budget is not None else None
    r = studied if studied is not None else DEFAULT_START_RANK
    costs = [
        plan_costs(m, layer_plan(name, m, config, geometries[name]), config.head_layout) for name, m in modules.items()
    ]
    return min(r, *(min(c.group_size, c.other_dim) for c in costs))


def _build_layers(
    model: nn.Module,
    targets: list[str],
    config: DynaRankConfig,
    geometries: dict[str, HeadGeometry | None],
    generator: torch.Generator | None,
) -> dict[str, ElasticLoRALinear]:
    built: dict[str, ElasticLoRALinear] = {}
    for name in targets:
        module = model.get_submodule(name)
        plan = layer_plan(name, module, config, geometries[name])
        costs = plan_costs(module, plan, config.head_layout)
        group_dim, other_dim = costs.group_size, costs.other_dim
        if config.r > min(group_dim, other_dim):
            raise ConfigError(
                "r",
                f"{config.r} is larger than the model can use at {name}: a group there is {group_dim} x "
                f"{other_dim}, so its rank cannot exceed {min(group_dim, other_dim)}. Lower it.",
            )
        built[name] = ElasticLoRALinear(
            module,
            n_groups=plan["n_groups"],
            split=plan["split"],
            layout=costs.layout,
            r=config.r,
            scaling=config.scaling,
            dropout=config.lora_dropout,
            generator=generator,
        )
    return built


def count_trainable(model: nn.Module) -> int:
    """Elements of the parameters of ``model`` that train (``requires_grad``): after :func:`attach`, the adapters, the
    task heads trained whole (modules_to_save) and a controller's own parameters (ARD's alphas, the SVD methods' E)
    once it is built."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_parameter_count(model: nn.Module) -> int:
    """Parameters of the low-rank adapters alone (no task head)."""
    return sum(layer.num_adapter_parameters() for layer in elastic_layers(model).values())


def _refuse_quantized_merge(model: nn.Module) -> None:
    """Refuse before anything is merged when any adapted module has a quantized base (quantized.py)."""
    for name, layer in elastic_layers(model).items():
        refuse_merge(name, layer.base)


def _adapted_layers(model: nn.Module, action: str) -> dict[str, ElasticLoRALinear]:
    """The model's elastic layers; ValueError if it has none (a model :func:`attach` never saw)."""
    layers = elastic_layers(model)
    if not layers:
        raise ValueError(
            f"{action}() needs a model returned by dynarank.attach(): this one carries no dynarank adapter."
        )
    return layers


def merge(model: nn.Module) -> None:
    """Add every adapter's update (scaling * B A, the gate folded in) to its base weight: the model then computes the
    same outputs with no adapter in its forward pass (:meth:`ElasticLoRALinear.merge`). Idempotent; undone, within
    rounding, by :func:`unmerge`. Change nothing of the adapters while merged (resizes and gates are refused).

    Raises:
        ValueError: ``model`` carries no dynarank adapter, or a base is quantized (refused before anything merges).
        RuntimeError: a base is sharded by FSDP (dynarank.shard_base).
    """
    layers = _adapted_layers(model, "merge")
    _refuse_quantized_merge(model)
    for layer in layers.values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Take every merged update out of its base weight again, giving back the weights :func:`merge` found within
    rounding (:meth:`ElasticLoRALinear.unmerge`); the adapters run in the forward pass again. Idempotent.

    Raises:
        ValueError: ``model`` carries no dynarank adapter.
    """
    for layer in _adapted_layers(model, "unmerge").values():
        layer.unmerge()


# Where a torch Module keeps its hooks, and the per-hook flags kept beside them under the same handle ids.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _is_dynarank_hook(hook) -> bool:
    """Whether ``hook``, as a module holds it (torch's wrapper of a load hook, a partial, a bound method), is
    dynarank's code: attach's warning, a controller's load and forward hooks, the gate folding on load."""
    hook = getattr(hook, "hook", hook)  # torch's _WrappedHook
    hook = getattr(hook, "func", hook)  # functools.partial
    hook = getattr(hook, "__func__", hook)  # a bound method
    return (getattr(hook, "__module__", None) or "").split(".")[0] == __name__.split(".")[0]


def remove_hooks(module: nn.Module, which: Callable[[Callable], bool]) -> None:
    """Take off ``module`` every hook (forward, backward, state-dict and load hooks, as the module holds them:
    torch's wrapper of a load hook included) for which ``which(hook)`` is true, with the flags torch keeps beside
    it under the same id."""
    for attr in _HOOK_DICTS:
        hooks = getattr(module, attr, None) or {}
        for key in [key for key, hook in hooks.items() if which(hook)]:
            del hooks[key]
            for flags in _HOOK_FLAGS:
                getattr(module, flags, {}).pop(key, None)


def _remove_dynarank_hooks(module: nn.Module) -> None:
    remove_hooks(module, _is_dynarank_hook)


def unwrap(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put the plain Linear modules back (merging the updates into them first when ``merge``) and give back the
    model :func:`attach` was given: every parameter's ``requires_grad`` as it was before attach, and no dynarank
    module, attribute or hook left (attach's, a controller's, the rank init's), so that ``attach`` starts afresh on
    it and ``save_pretrained`` writes it as a full model. Returns the same model object.

    What stays: the updates merged into the base weights (``merge``, or layers left merged); the frozen base's
    sharding by :func:`dynarank.shard_base` (FSDP's units and the model's ``dynarank_sharded`` record); bitsandbytes'
    CPU repacking left off on 4-bit layers (``quantized.keep_training_layout``); and a controller built on the model,
    which keeps the adapters it held (drop it, and the optimizer bound to it).
    """
    from .fsdp import SHARDED_ATTR  # fsdp imports this module

    if merge:
        _refuse_quantized_merge(model)
    for name, layer in elastic_layers(model).items():
        if merge:
            layer.merge()
        _set_submodule(model, name, layer.base)
    for gates in (ARD_ATTR, SVD_ATTR):  # controller parameters live beside the adapters
        if gates in dict(model.named_children()):
            del model._modules[gates]
    flags = getattr(model, _REQUIRES_GRAD_ATTR, None) or {}
    for name, p in model.named_parameters():
        if name in flags:
            p.requires_grad_(flags[name])
    for module in model.modules():
        _remove_dynarank_hooks(module)
        for attr in [a for a in vars(module) if a.startswith(("dynarank_", "_dynarank_")) and a != SHARDED_ATTR]:
            delattr(module, attr)
    if getattr(model, "hf_quantizer", None) is not None:
        model.is_quantized = True  # purely quantized again (the Trainer integration clears it while adapters are on)
    return model
