"""How dynarank reads module names: the layer index and the projection type of an adapted module."""

from __future__ import annotations

import re


def split_name(module: str) -> tuple[int | None, str]:
    """('bert.encoder.layer.3.attention.self.query') -> (3, 'attention.self.query')."""
    match = re.search(r"\.(\d+)\.(.+)$", module)
    if match is None:
        return None, module
    return int(match.group(1)), match.group(2)
