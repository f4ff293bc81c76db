"""Checking a plan and carrying it between processes.

Wire form (msgpack, tagged and versioned)::

    ["af.wplan", 1, src_layout, dst_layout, [nics_per_rank, max_write_bytes, split_bytes, fp8_block, align],
     [[src int32 bytes, dst int32 bytes, nic int32 bytes, lo int64 bytes, hi int64 bytes], ...per parameter]]

Layouts are :meth:`Layout.to_list` forms.  Decoding checks every field and
then the whole plan (:func:`validate`); any failure is a ProtocolError.
"""
from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

from ..errors import ProtocolError
from .plan import Plan, PlanOptions, _Table
from .spec import Layout

__all__ = ["PLAN_VERSION", "decode", "encode", "validate"]

PLAN_VERSION = 1
_TAG = "af.wplan"
MAX_PLAN_BYTES = 1 << 30


def encode(p: Plan) -> bytes:
    o = p.options
    tables = [[t.src.astype("<i4").tobytes(), t.dst.astype("<i4").tobytes(), t.nic.astype("<i4").tobytes(),
               t.lo.astype("<i8").tobytes(), t.hi.astype("<i8").tobytes()] for t in p.tables]
    return msgpack.packb([_TAG, PLAN_VERSION, p.src.to_list(), p.dst.to_list(),
                          [o.nics_per_rank, o.max_write_bytes, o.split_bytes, o.fp8_block, o.align], tables],
                         use_bin_type=True)


def _arr(b: Any, dtype: str, what: str) -> np.ndarray:
    if not isinstance(b, bytes) or len(b) % np.dtype(dtype).itemsize:
        raise ProtocolError(f"plan: {what} is not a packed {dtype} array")
    return np.frombuffer(b, dtype).astype(dtype[1:]).copy()


def decode(blob: Any) -> Plan:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"a plan is bytes, not {type(blob).__name__}")
    if len(blob) > MAX_PLAN_BYTES:
        raise ProtocolError(f"plan of {len(blob)} bytes exceeds {MAX_PLAN_BYTES}")
    try:
        data = msgpack.unpackb(bytes(blob), raw=False, strict_map_key=True)
    except Exception as e:  # noqa: BLE001 - any malformed input
        raise ProtocolError(f"plan: not msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(data, list) or len(data) != 6 or data[0] != _TAG:
        raise ProtocolError("plan: not an aiofabric weight plan")
    if data[1] != PLAN_VERSION:
        raise ProtocolError(f"plan: version {data[1]!r} (this library reads {PLAN_VERSION})")
    try:
        src, dst = Layout.from_list(data[2]), Layout.from_list(data[3])
        opts = data[4]
        if not isinstance(opts, list) or len(opts) != 5 or any(type(v) is not int or v < 1 for v in opts):
            raise ProtocolError("plan: bad options")
        options = PlanOptions(*opts)
        raw = data[5]
        if not isinstance(raw, list) or len(raw) != len(src.params):
            raise ProtocolError("plan: one route table per parameter expected")
        tables = []
        for i, t in enumerate(raw):
            if not isinstance(t, list) or len(t) != 5:
                raise ProtocolError(f"plan: route table {i} malformed")
            s, d, nic = (_arr(t[k], "<i4", f"table {i} column {k}") for k in range(3))
            lo, hi = (_arr(t[k], "<i8", f"table {i} column {k}") for k in (3, 4))
            ndim = len(src.params[i].shape)
            n = len(s)
            if len(d) != n or len(nic) != n or lo.size != n * ndim or hi.size != n * ndim:
                raise ProtocolError(f"plan: route table {i} columns differ in length")
            tables.append(_Table(s.astype(np.int32), d.astype(np.int32), nic.astype(np.int32),
                                 lo.reshape(n, ndim), hi.reshape(n, ndim)))
        p = Plan(src, dst, options, tables)
        validate(p)
    except ProtocolError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, OverflowError) as e:
        raise ProtocolError(f"plan: invalid ({type(e).__name__}: {e})") from None
    return p


def validate(p: Plan) -> None:
    """ValueError unless: every destination shard is covered by its routes
    exactly once (no byte twice, none missing), every route lies inside the
    shards of both its ranks, and ranks and NICs are in range."""
    for i, t in enumerate(p.tables):
        par = p.src.params[i]
        name = par.name
        n = len(t.src)
        if n and (t.src.min() < 0 or t.src.max() >= p.src.ranks):
            raise ValueError(f"parameter {name!r}: a route names a source rank outside 0..{p.src.ranks - 1}")
        if n and (t.dst.min() < 0 or t.dst.max() >= p.dst.ranks):
            raise ValueError(f"parameter {name!r}: a route names a destination rank outside 0..{p.dst.ranks - 1}")
        if n and (t.nic.min() < 0 or t.nic.max() >= p.options.nics_per_rank):
            raise ValueError(f"parameter {name!r}: a route names a NIC outside 0..{p.options.nics_per_rank - 1}")
        if n and (t.hi <= t.lo).any():
            raise ValueError(f"parameter {name!r}: a route has an empty box")
        for side, layout, ranks in (("source", p.src, t.src), ("destination", p.dst, t.dst)):
            for k in range(n):
                s = layout.shards[i][int(ranks[k])]
                if s is None:
                    raise ValueError(f"parameter {name!r}: route {k} uses {side} rank {int(ranks[k])}, "
                                     "which holds none of it")
                lo, hi = s.bounds(par.shape)
                if (t.lo[k] < lo).any() or (t.hi[k] > hi).any():
                    raise ValueError(f"parameter {name!r}: route {k} [{t.lo[k].tolist()}, {t.hi[k].tolist()}) lies "
                                     f"outside {side} rank {int(ranks[k])}'s shard [{list(lo)}, {list(hi)})")
        for d, s in enumerate(p.dst.shards[i]):
            if s is None:
                continue
            m = np.nonzero(t.dst == d)[0]
            lo, hi = t.lo[m], t.hi[m]
            vol = int(np.prod(s.shape_of(par.shape)))
            got = int(np.prod(hi - lo, axis=1).sum()) if len(m) else 0
            # pairwise overlap of boxes (within a shard; boxes are few per shard)
            if len(m) > 1:
                ov = np.all((lo[:, None, :] < hi[None, :, :]) & (lo[None, :, :] < hi[:, None, :]), axis=2)
                np.fill_diagonal(ov, False)
                if ov.any():
                    a, b = (int(x) for x in np.argwhere(ov)[0])
                    raise ValueError(f"parameter {name!r}, destination rank {d}: routes {int(m[a])} and {int(m[b])} "
                                     f"overlap (bytes written twice): [{lo[a].tolist()}, {hi[a].tolist()}) and "
                                     f"[{lo[b].tolist()}, {hi[b].tolist()})")
            if got != vol:
                raise ValueError(f"parameter {name!r}, destination rank {d}: routes cover {got} of its {vol} "
                                 f"elements (a gap of {vol - got})")
