"""RL weight transfer: trainer GPUs write straight into inference GPUs.

Planned once (:func:`plan`: a static routing table from the trainer's
sharding to the inference side's), then run every step, point to point:
:func:`run_source` on each trainer rank, :func:`run_destination` on each
inference rank (double-buffered, so inference keeps its old weights until an
update is complete).  See docs/weights.md.
"""
from __future__ import annotations

from .cast import dequantize_blocks, quantize_blocks
from .execute import (
    DoubleBuffer,
    UpdateStats,
    ack_imm,
    run_destination,
    run_source,
    update_imm,
)
from .plan import Piece, Plan, PlanOptions, Route, plan
from .simulator import simulate
from .spec import DTYPES, FULL, Layout, ParamSpec, Shard

__all__ = [
    "DTYPES",
    "FULL",
    "DoubleBuffer",
    "Layout",
    "ParamSpec",
    "Piece",
    "Plan",
    "PlanOptions",
    "Route",
    "Shard",
    "UpdateStats",
    "ack_imm",
    "dequantize_blocks",
    "plan",
    "quantize_blocks",
    "run_destination",
    "run_source",
    "simulate",
    "update_imm",
]
