"""How dynarank names things on a model: the submodules its controllers add, and how it reads module names (the
layer index and the projection type of an adapted module)."""

from __future__ import annotations

import re
import sys

ARD_ATTR = "dynarank_ard"  # the model's submodule holding ARD's alphas (controllers/ard_gates.py)
SVD_ATTR = "dynarank_svd"  # the model's submodule holding the SVD methods' E (controllers/svd.py)
# The state-dict entries of what a run's adapters compute with besides their own weights (ARD's mask from the alphas
# until its final phase, E until the run folds it), and what each is: a model with no place for them cannot load
# that run's weights with their function (layer.py refuses).
GATE_ENTRIES = {f"{ARD_ATTR}.alpha": "ARD-LoRA's alphas", f"{SVD_ATTR}.values": "the SVD methods' singular values E"}


def uncompiled(model):
    """The model ``torch.compile`` wrapped (its ``OptimizedModule`` holds it as ``_orig_mod``), or ``model`` itself.

    Module names read from the wrapper start with ``_orig_mod.``, which neither stock PEFT nor
    :func:`dynarank.load_adapter` finds in the uncompiled model: what names modules for a file names them here.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    while wrapper is not None and isinstance(model, wrapper):
        model = model._orig_mod
    return model


def split_name(module: str) -> tuple[int | None, str]:
    """('bert.encoder.layer.3.attention.self.query') -> (3, 'attention.self.query')."""
    match = re.search(r"\.(\d+)\.(.+)$", module)
    if match is None:
        return None, module
    return int(match.group(1)), match.group(2)
