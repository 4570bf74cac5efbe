"""dynarank: LoRA adapters whose rank is learned per attention head and physically resized."""

from .attach import adapter_parameter_count, attach, count_trainable, elastic_layers, merge, unmerge
from .config import DynaRankConfig
from .controllers import ARDController, RankController, StepRecord, build_controller, prepare_parameters
from .defaults import default_lr, default_ortho_weight
from .export import export_peft
from .fsdp import shard_base
from .layer import ElasticLoRALinear
from .rank_init import init_ranks
from .storage import AdapterFormatError, load_adapter, save_adapter

__all__ = [
    "ARDController",
    "DynaRankCallback",
    "DynaRankTrainer",
    "DynaRankTrainerMixin",
    "with_dynarank",
    "AdapterFormatError",
    "RankController",
    "StepRecord",
    "build_controller",
    "DynaRankConfig",
    "ElasticLoRALinear",
    "adapter_parameter_count",
    "attach",
    "count_trainable",
    "default_lr",
    "default_ortho_weight",
    "elastic_layers",
    "export_peft",
    "init_ranks",
    "load_adapter",
    "merge",
    "prepare_parameters",
    "save_adapter",
    "shard_base",
    "unmerge",
]

__version__ = "0.1.0"


_TRAINER_NAMES = ("DynaRankCallback", "DynaRankTrainer", "DynaRankTrainerMixin", "with_dynarank")


def __getattr__(name: str):
    # The Trainer integration imports transformers: load it only when asked for.
    if name in _TRAINER_NAMES:
        from .integrations import transformers as integration

        return getattr(integration, name)
    raise AttributeError(f"module 'dynarank' has no attribute {name!r}")
