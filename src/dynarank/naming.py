"""How dynarank names things on a model: the submodules its controllers add, and how it reads module names (the
layer index and the projection type of an adapted module)."""

from __future__ import annotations

import re

ARD_ATTR = "dynarank_ard"  # the model's submodule holding ARD's alphas (controllers/ard_gates.py)
SVD_ATTR = "dynarank_svd"  # the model's submodule holding the SVD methods' E (controllers/svd.py)


def split_name(module: str) -> tuple[int | None, str]:
    """('bert.encoder.layer.3.attention.self.query') -> (3, 'attention.self.query')."""
    match = re.search(r"\.(\d+)\.(.+)$", module)
    if match is None:
        return None, module
    return int(match.group(1)), match.group(2)
