"""The routing table of a weight update, computed once (sans-IO).

:func:`plan` intersects every destination shard with the source shards and
assigns each piece (a box of the parameter) to one source rank that holds it:
where only one does, to it; where several do (replicas, an all-gathered
trainer), greedily, largest first, to the least loaded holder (LPT), so the
busiest source carries at most the mean plus the largest piece when every
source can send everything.  Each route is then split into runs (contiguous in
both shards, see :mod:`aiofabric.weights.runs`) and runs into pieces of at
most ``max_write_bytes``: one write (one immediate) per piece, two for a
quantized piece (its FP8 codes and its scales).  See docs/weights.md.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .._checks import int_arg as _int
from .runs import run_shape, run_starts
from .spec import SCALE_BYTES, Layout, ParamSpec, scale_shape

__all__ = ["CASTS", "Piece", "Plan", "PlanOptions", "Route", "plan"]

#: supported (source dtype, destination dtype) pairs other than plain copies
CASTS = {("bf16", "fp8_e4m3")}


@dataclass(frozen=True)
class PlanOptions:
    nics_per_rank: int = 1
    max_write_bytes: int = 64 << 20
    split_bytes: int = 256 << 20
    fp8_block: int = 128
    align: int = 256


class Route(NamedTuple):
    """One box of one parameter, from one source rank to one destination rank."""

    param: int
    src_rank: int
    dst_rank: int
    nic: int
    lo: tuple[int, ...]
    hi: tuple[int, ...]


class Piece(NamedTuple):
    """Writes of equal length of one route: element offsets in the source and
    destination shards (flattened), ``length`` elements each.  For a
    quantized route, ``rows``/``width`` give the row structure of each piece
    (its scales are ``rows * ceil(width / block)``)."""

    length: int
    src: np.ndarray
    dst: np.ndarray
    rows: int
    width: int


@dataclass
class _Table:
    """The routes of one parameter (numpy columns)."""

    src: np.ndarray   # int32 [n]
    dst: np.ndarray   # int32 [n]
    nic: np.ndarray   # int32 [n]
    lo: np.ndarray    # int64 [n, ndim]
    hi: np.ndarray    # int64 [n, ndim]


def _aligned(n: int, a: int) -> int:
    return -(-n // a) * a


@dataclass
class Plan:
    """A static routing table: which source rank writes which bytes where.

    Deterministic: the same layouts and options give the same plan (and the
    same :meth:`to_bytes`).  Byte offsets are into each rank's packed buffer
    (:meth:`src_offsets`, :meth:`dst_offsets`)."""

    src: Layout
    dst: Layout
    options: PlanOptions
    tables: list[_Table]
    _dst_off: list[dict[int, tuple[int, int]]] = field(default_factory=list, repr=False)
    _src_off: list[dict[int, int]] = field(default_factory=list, repr=False)
    _counts: np.ndarray | None = field(default=None, repr=False)
    _cache: dict[tuple[str, int], Any] = field(default_factory=dict, repr=False)  # per parameter; tables are read-only

    def __post_init__(self) -> None:
        a = self.options.align
        for r in range(self.dst.ranks):
            pos, offs = 0, {}
            for i, p in enumerate(self.dst.params):
                s = self.dst.shards[i][r]
                if s is None:
                    continue
                shape = s.shape_of(p.shape)
                data = pos = _aligned(pos, a)
                pos += int(np.prod(shape)) * p.itemsize
                sc = -1
                if self.cast(i):
                    sc = pos = _aligned(pos, a)
                    pos += int(np.prod(scale_shape(shape, self.options.fp8_block))) * SCALE_BYTES
                offs[i] = (data, sc)
            offs[-1] = (pos, -1)
            self._dst_off.append(offs)
        for r in range(self.src.ranks):
            pos, soffs = 0, {}
            for i, p in enumerate(self.src.params):
                s = self.src.shards[i][r]
                if s is None:
                    continue
                soffs[i] = pos = _aligned(pos, a)
                pos += int(np.prod(s.shape_of(p.shape))) * p.itemsize
            soffs[-1] = pos
            self._src_off.append(soffs)

    # -- layouts of the buffers -------------------------------------------------

    @property
    def params(self) -> tuple[ParamSpec, ...]:
        return self.src.params

    def cast(self, i: int) -> bool:
        """Whether parameter ``i`` is quantized on the way (bf16 -> fp8 + scales)."""
        return self.src.params[i].dtype != self.dst.params[i].dtype

    def dst_layout_bytes(self, rank: int) -> int:
        """Bytes the buffer of destination ``rank`` must hold."""
        return self._dst_off[rank][-1][0]

    def src_layout_bytes(self, rank: int) -> int:
        """Bytes the buffer of source ``rank`` must hold."""
        return self._src_off[rank][-1]

    def dst_offsets(self, rank: int) -> dict[str, tuple[int, tuple[int, ...], str, int, tuple[int, ...]]]:
        """name -> (data offset, shard shape, dtype, scales offset or -1, scales shape)."""
        out = {}
        for i, (data, sc) in self._dst_off[rank].items():
            if i < 0:
                continue
            p = self.dst.params[i]
            shape = self.dst.shards[i][rank].shape_of(p.shape)  # type: ignore[union-attr]
            out[p.name] = (data, shape, p.dtype, sc, scale_shape(shape, self.options.fp8_block) if sc >= 0 else ())
        return out

    def src_offsets(self, rank: int) -> dict[str, tuple[int, tuple[int, ...], str]]:
        """name -> (offset, shard shape, dtype) in source ``rank``'s buffer."""
        out = {}
        for i, off in self._src_off[rank].items():
            if i < 0:
                continue
            p = self.src.params[i]
            out[p.name] = (off, self.src.shards[i][rank].shape_of(p.shape), p.dtype)  # type: ignore[union-attr]
        return out

    # -- routes -------------------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(t.src) for t in self.tables)

    def routes(self) -> Iterator[Route]:
        for i, t in enumerate(self.tables):
            for k in range(len(t.src)):
                yield Route(i, int(t.src[k]), int(t.dst[k]), int(t.nic[k]),
                            tuple(int(x) for x in t.lo[k]), tuple(int(x) for x in t.hi[k]))

    def _shapes(self, i: int, t: _Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per route of parameter i: source shard lo and shape, destination shard lo and shape."""
        hit = self._cache.get(("shapes", i))
        if hit is None:
            hit = self._cache["shapes", i] = self._compute_shapes(i, t)
        return hit

    def _compute_shapes(self, i: int, t: _Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        p = self.src.params[i]
        out = []
        for layout, ranks in ((self.src, t.src), (self.dst, t.dst)):
            los = np.zeros((len(ranks), len(p.shape)), np.int64)
            shapes = np.tile(np.asarray(p.shape, np.int64), (len(ranks), 1))
            for r in np.unique(ranks):
                s = layout.shards[i][int(r)]
                if s is not None and s.dim is not None:
                    m = ranks == r
                    los[m, s.dim] = s.start
                    shapes[m, s.dim] = s.stop - s.start
            out += [los, shapes]
        return out[0], out[1], out[2], out[3]

    def _piece_elems(self, i: int, d: np.ndarray, length: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Elements per piece of each route of parameter i (runs cut at block/row bounds when quantized)."""
        item = self.dst.params[i].itemsize
        cap = max(1, self.options.max_write_bytes // item)
        if not self.cast(i):
            return np.minimum(length, cap)
        ndim = len(self.src.params[i].shape)
        unit = np.where(d == ndim - 1, self.options.fp8_block, cols)  # in a row: blocks; else whole rows
        unit = np.minimum(unit, length)
        return np.minimum(length, np.maximum(unit, cap // unit * unit))

    def _runs(self, i: int, t: _Table, sshape: np.ndarray, dshape: np.ndarray) -> tuple[np.ndarray, ...]:
        """(split dim, runs, run length) per route.  A quantized route is staged
        (gathered row by row while casting), so only the destination needs
        its runs contiguous."""
        ext = t.hi - t.lo
        return run_shape(ext, ext if self.cast(i) else sshape, dshape)

    def route_stats(self, i: int) -> dict[str, np.ndarray]:
        """Per route of parameter i: ``runs``, ``run_len`` (elements),
        ``pieces`` (per run), ``writes`` (immediates delivered), ``bytes``
        (written at the destination, scales included)."""
        hit = self._cache.get(("stats", i))
        if hit is None:
            hit = self._cache["stats", i] = self._route_stats(i)
        return hit

    def _route_stats(self, i: int) -> dict[str, np.ndarray]:
        t = self.tables[i]
        _slo, sshape, _dlo, dshape = self._shapes(i, t)
        d, runs, length = self._runs(i, t, sshape, dshape)
        piece = self._piece_elems(i, d, length, dshape[:, -1])
        pieces = -(-length // piece)
        elems = runs * length
        nbytes = elems * self.dst.params[i].itemsize
        writes = runs * pieces
        if self.cast(i):
            blk = self.options.fp8_block
            width = np.where(d == t.lo.shape[1] - 1, length, dshape[:, -1])
            nbytes = nbytes + elems // width * (-(-width // blk)) * SCALE_BYTES
            writes = writes * 2
        return {"split": d, "runs": runs, "run_len": length, "pieces": pieces, "writes": writes, "bytes": nbytes,
                "piece": piece}

    def pieces(self, i: int, k: int) -> list[Piece]:
        """The writes of route ``k`` of parameter ``i``, grouped by length.
        For a quantized route ``src`` is ``[n, rows]``: the source offset of
        every row of every piece (rows are gathered while casting)."""
        t = self.tables[i]
        slo, sshape, dlo, dshape = self._shapes(i, t)
        sl = slice(k, k + 1)
        d, _, length = self._runs(i, _Table(t.src[sl], t.dst[sl], t.nic[sl], t.lo[sl], t.hi[sl]), sshape[sl],
                                  dshape[sl])
        piece = int(self._piece_elems(i, d, length, dshape[sl, -1])[0])
        d0, n = int(d[0]), int(length[0])
        t0 = run_starts(t.lo[k], t.hi[k], d0, dlo[k], dshape[k])
        full, rest = divmod(n, piece)
        if not self.cast(i):
            s0 = run_starts(t.lo[k], t.hi[k], d0, slo[k], sshape[k])
            out = []
            if full:
                off = np.arange(full, dtype=np.int64) * piece
                out.append(Piece(piece, (s0[:, None] + off).reshape(-1), (t0[:, None] + off).reshape(-1), 1, piece))
            if rest:
                out.append(Piece(rest, s0 + full * piece, t0 + full * piece, 1, rest))
            return out
        ndim = t.lo.shape[1]
        rows = run_starts(t.lo[k], t.hi[k], ndim - 1, slo[k], sshape[k]) if ndim > 1 else \
            np.array([int(t.lo[k, 0] - slo[k, 0])], np.int64)
        if d0 == ndim - 1:  # runs within a row: pieces are whole blocks of one row
            out = []
            if full:
                off = np.arange(full, dtype=np.int64) * piece
                out.append(Piece(piece, (rows[:, None] + off).reshape(-1, 1), (t0[:, None] + off).reshape(-1),
                                 1, piece))
            if rest:
                out.append(Piece(rest, (rows + full * piece)[:, None], t0 + full * piece, 1, rest))
            return out
        w = int(dshape[k, -1])  # runs of whole rows: pieces are whole rows
        per_run, per_piece = n // w, piece // w
        rows = rows.reshape(len(t0), per_run)
        out = []
        if full:
            r = rows[:, :full * per_piece].reshape(len(t0) * full, per_piece)
            off = np.arange(full, dtype=np.int64) * piece
            out.append(Piece(piece, r, (t0[:, None] + off).reshape(-1), per_piece, w))
        if rest:
            out.append(Piece(rest, rows[:, full * per_piece:], t0 + full * piece, rest // w, w))
        return out

    def source_work(self, rank: int) -> list[tuple[int, int, int, list[Piece]]]:
        """Source ``rank``'s routes as ``(param, route, destination, pieces)``,
        destinations rotated by rank (source s starts with destination s mod
        n_dst, so sources do not all start on one destination).  Computed on
        first use (tens of microseconds of NumPy per route) and kept."""
        hit = self._cache.get(("work", rank))
        if hit is None:
            items = []
            n_dst = self.dst.ranks
            for i, t in enumerate(self.tables):
                for k in np.nonzero(t.src == rank)[0]:
                    d = int(t.dst[k])
                    items.append(((d - rank) % n_dst, i, int(k), d))
            items.sort()
            hit = self._cache["work", rank] = [(i, k, d, self.pieces(i, k)) for _, i, k, d in items]
        return hit

    def expected(self) -> np.ndarray:
        """``[n_src, n_dst]``: immediates source s delivers to destination d in one update."""
        if self._counts is None:
            c = np.zeros((self.src.ranks, self.dst.ranks), np.int64)
            for i, t in enumerate(self.tables):
                if len(t.src):
                    np.add.at(c, (t.src, t.dst), self.route_stats(i)["writes"])
            self._counts = c
        return self._counts

    def link_bytes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bytes sent per source rank, per source NIC ``[n_src, nics]``, bytes received per destination rank)."""
        src = np.zeros(self.src.ranks, np.int64)
        nic = np.zeros((self.src.ranks, self.options.nics_per_rank), np.int64)
        dst = np.zeros(self.dst.ranks, np.int64)
        for i, t in enumerate(self.tables):
            if len(t.src):
                b = self.route_stats(i)["bytes"]
                np.add.at(src, t.src, b)
                np.add.at(nic, (t.src, t.nic), b)
                np.add.at(dst, t.dst, b)
        return src, nic, dst

    # -- checks and bytes (plan_io.py) ----------------------------------------------

    def validate(self) -> None:
        """Raise ValueError unless every destination byte is written exactly
        once, from a source rank that holds it (see :mod:`.plan_io`)."""
        from .plan_io import validate

        validate(self)

    def to_bytes(self) -> bytes:
        from .plan_io import encode

        return encode(self)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Plan:
        """Decode and validate; ProtocolError on anything malformed."""
        from .plan_io import decode

        return decode(blob)


def plan(src_layout: Layout, dst_layout: Layout, *, nics_per_rank: int = 1, max_write_bytes: int = 64 << 20,
         split_bytes: int = 256 << 20, fp8_block: int = 128, align: int = 256) -> Plan:
    """Plan an update from ``src_layout`` (trainer) to ``dst_layout`` (inference).

    Both name the same parameters with the same shapes; dtypes may differ by
    a supported cast (bf16 -> fp8_e4m3, one float32 scale per ``fp8_block``
    elements of a row).  ``split_bytes``: pieces that several sources hold are
    cut to at most this size before balancing.  Raises TypeError/ValueError
    naming the argument (a byte held by no source, a shard split along more
    than one dimension on one side, a cast across unaligned blocks).
    """
    from .planner import build, match

    if not isinstance(src_layout, Layout):
        raise TypeError(f"src_layout must be a Layout, not {type(src_layout).__name__}")
    if not isinstance(dst_layout, Layout):
        raise TypeError(f"dst_layout must be a Layout, not {type(dst_layout).__name__}")
    opts = PlanOptions(_int("nics_per_rank", nics_per_rank, 1), _int("max_write_bytes", max_write_bytes, 1),
                       _int("split_bytes", split_bytes, 1), _int("fp8_block", fp8_block, 1), _int("align", align, 1))
    dst_layout = match(src_layout, dst_layout)
    return Plan(src_layout, dst_layout, opts, build(src_layout, dst_layout, opts))

