"""Argument checks shared by the modules that take sizes and counts."""
from __future__ import annotations

from typing import Any

import numpy as np


def int_arg(name: str, v: Any, lo: int = 1) -> int:
    """``v`` as an int of at least ``lo``: TypeError for anything but an int
    (bool included), ValueError below ``lo``; both name the argument."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)
