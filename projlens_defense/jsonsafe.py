"""The one JSON sanitizer: results and reports as plain JSON values."""

from __future__ import annotations

import math
from typing import Any


def finite(x: Any) -> Any:
    """JSON-safe copy: NaN/inf floats become None, tuples lists, numpy scalars and tensors plain numbers and
    lists, dict keys strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if hasattr(x, "tolist") and type(x).__module__.split(".")[0] in ("numpy", "torch"):
        return finite(x.tolist())  # numpy scalars and arrays, torch tensors
    return x
