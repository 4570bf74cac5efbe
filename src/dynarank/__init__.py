"""dynarank: LoRA adapters whose rank is learned per attention head and physically resized."""

from .attach import adapter_parameter_count, attach, count_trainable, elastic_layers, merge, unmerge
from .config import DynaRankConfig
from .controllers import ARDController, RankController, StepRecord, build_controller
from .export import export_peft
from .io import AdapterFormatError, load_adapter, save_adapter
from .layer import ElasticLoRALinear

__all__ = [
    "ARDController",
    "AdapterFormatError",
    "RankController",
    "StepRecord",
    "build_controller",
    "DynaRankConfig",
    "ElasticLoRALinear",
    "adapter_parameter_count",
    "attach",
    "count_trainable",
    "elastic_layers",
    "export_peft",
    "load_adapter",
    "merge",
    "save_adapter",
    "unmerge",
]

__version__ = "0.1.0"
