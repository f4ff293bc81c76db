"""The planner proper (used by :func:`aiofabric.weights.plan.plan`).

Per parameter: cut the source side into intervals along its split dimension
(each with the set of source ranks holding it), intersect every destination
shard with every interval (numpy, all pairs at once), then assign: pieces
with one holder go to it; the rest are cut to ``split_bytes`` and placed
largest first on the least loaded holder (LPT, ties to the lowest rank).
Last, each source rank's routes are spread over its NICs the same way.
"""
from __future__ import annotations

import itertools

import numpy as np

from .plan import CASTS, PlanOptions, _Table
from .spec import SCALE_BYTES, Layout, Shard

__all__ = ["build", "match"]


def match(src: Layout, dst: Layout) -> Layout:
    """``dst`` with its parameters in ``src``'s order; ValueError naming the
    layout when they differ in names, shapes or an unsupported dtype pair."""
    names = [p.name for p in src.params]
    dnames = {p.name: i for i, p in enumerate(dst.params)}
    missing = [n for n in names if n not in dnames]
    extra = sorted(set(dnames) - set(names))
    if missing or extra:
        raise ValueError(f"dst_layout: parameters differ from src_layout (missing {missing[:5]}, extra {extra[:5]})")
    for p in src.params:
        q = dst.params[dnames[p.name]]
        if q.shape != p.shape:
            raise ValueError(f"dst_layout: parameter {p.name!r} has shape {q.shape}, src_layout {p.shape}")
        if q.dtype != p.dtype and (p.dtype, q.dtype) not in CASTS:
            raise ValueError(f"dst_layout: parameter {p.name!r}: no cast from {p.dtype} to {q.dtype} "
                             f"(supported: {sorted(CASTS)})")
    order = [dnames[n] for n in names]
    if order == list(range(len(order))):
        return dst
    return Layout(tuple(dst.params[i] for i in order), tuple(dst.shards[i] for i in order))


def _split_dim(row: tuple[Shard | None, ...], side: str, name: str) -> int | None:
    dims = sorted({s.dim for s in row if s is not None and s.dim is not None})
    if len(dims) > 1:
        raise ValueError(f"{side}: parameter {name!r} is split along dims {dims}; a plan needs one dim per side")
    return dims[0] if dims else None


def _check_blocks(row: tuple[Shard | None, ...], side: str, name: str, shape: tuple[int, ...], block: int) -> None:
    last = len(shape) - 1
    for r, s in enumerate(row):
        if s is None or s.dim != last:
            continue
        for v in (s.start, s.stop):
            if v % block and v != shape[last]:
                raise ValueError(f"{side}: parameter {name!r} is quantized in blocks of {block} along its last dim, "
                                 f"but rank {r}'s shard [{s.start}, {s.stop}) cuts a block")


def build(src: Layout, dst: Layout, opts: PlanOptions) -> list[_Table]:
    n_src = src.ranks
    load = np.zeros(n_src, np.int64)
    tables: list[dict[str, np.ndarray]] = []
    multi: list[tuple[int, int, np.ndarray, np.ndarray, tuple[int, ...], int]] = []  # param, dst, lo, hi, holders, bytes
    for i, p in enumerate(src.params):
        q = dst.params[i]
        srow, drow = src.shards[i], dst.shards[i]
        a = _split_dim(srow, "src_layout", p.name)
        _split_dim(drow, "dst_layout", p.name)
        cast = p.dtype != q.dtype
        if cast:
            _check_blocks(srow, "src_layout", p.name, p.shape, opts.fp8_block)
            _check_blocks(drow, "dst_layout", p.name, p.shape, opts.fp8_block)
        ndim = len(p.shape)
        # intervals of the source side along dim a, and who holds each
        full = [r for r, s in enumerate(srow) if s is not None and s.dim is None]
        if a is None:
            ia, ib = np.array([0]), np.array([p.shape[0]])
            holders = [tuple(full)]
            ax = 0
        else:
            cuts = sorted({0, p.shape[a]} | {s.start for s in srow if s} | {s.stop for s in srow if s})
            ia, ib = np.array(cuts[:-1]), np.array(cuts[1:])
            holders = []
            for lo_, hi_ in itertools.pairwise(cuts):
                hs = set(full) | {r for r, s in enumerate(srow) if s is not None and s.dim is not None
                                  and s.start <= lo_ and hi_ <= s.stop}
                holders.append(tuple(sorted(hs)))
            ax = a
        dranks = np.array([r for r, s in enumerate(drow) if s is not None], np.int64)
        if len(dranks) == 0:
            tables.append({"src": np.zeros(0, np.int32), "dst": np.zeros(0, np.int32),
                           "lo": np.zeros((0, ndim), np.int64), "hi": np.zeros((0, ndim), np.int64)})
            continue
        dlo = np.array([drow[r].bounds(p.shape)[0] for r in dranks], np.int64)  # type: ignore[union-attr]
        dhi = np.array([drow[r].bounds(p.shape)[1] for r in dranks], np.int64)  # type: ignore[union-attr]
        # all (destination rank, interval) pairs, intersected along dim ax
        J, K = len(dranks), len(ia)
        lo = np.repeat(dlo, K, axis=0)
        hi = np.repeat(dhi, K, axis=0)
        kk = np.tile(np.arange(K), J)
        jj = np.repeat(np.arange(J), K)
        lo[:, ax] = np.maximum(lo[:, ax], ia[kk])
        hi[:, ax] = np.minimum(hi[:, ax], ib[kk])
        keep = lo[:, ax] < hi[:, ax]
        lo, hi, kk, jj = lo[keep], hi[keep], kk[keep], jj[keep]
        nh = np.array([len(h) for h in holders])[kk]
        if (nh == 0).any():
            m = int(np.argmax(nh == 0))
            raise ValueError(f"src_layout: no source rank holds parameter {p.name!r} at [{lo[m].tolist()}, "
                             f"{hi[m].tolist()}) (needed by destination rank {int(dranks[jj[m]])})")
        single = nh == 1
        srcs = np.array([h[0] for h in holders], np.int64)[kk]
        item = q.itemsize + (SCALE_BYTES / opts.fp8_block if cast else 0)
        nbytes = (np.prod(hi - lo, axis=1) * item).astype(np.int64)
        np.add.at(load, srcs[single], nbytes[single])
        tables.append({"src": srcs[single].astype(np.int32), "dst": dranks[jj[single]].astype(np.int32),
                       "lo": lo[single], "hi": hi[single]})
        for m in np.nonzero(~single)[0]:
            for plo, phi, pb in _cut(lo[m], hi[m], int(nbytes[m]), opts, cast, ndim):
                multi.append((i, int(dranks[jj[m]]), plo, phi, holders[kk[m]], pb))
    # LPT over the pieces several ranks hold
    order = sorted(range(len(multi)), key=lambda u: (-multi[u][5], u))
    extra: list[list[tuple[int, int, int, np.ndarray, np.ndarray]]] = [[] for _ in src.params]
    for u in order:
        i, d, lo_, hi_, hs, b = multi[u]
        h = np.asarray(hs)
        s = int(h[np.argmin(load[h])])
        load[s] += b
        extra[i].append((u, s, d, lo_, hi_))
    out = []
    for i, t in enumerate(tables):
        if extra[i]:
            extra[i].sort(key=lambda e: e[0])
            t = {"src": np.concatenate([t["src"], np.array([e[1] for e in extra[i]], np.int32)]),
                 "dst": np.concatenate([t["dst"], np.array([e[2] for e in extra[i]], np.int32)]),
                 "lo": np.concatenate([t["lo"], np.stack([e[3] for e in extra[i]])]),
                 "hi": np.concatenate([t["hi"], np.stack([e[4] for e in extra[i]])])}
        out.append(_Table(t["src"], t["dst"], np.zeros(len(t["src"]), np.int32), t["lo"], t["hi"]))
    if opts.nics_per_rank > 1:
        _assign_nics(src, dst, out, opts)
    return out


def _cut(lo: np.ndarray, hi: np.ndarray, nbytes: int, opts: PlanOptions, cast: bool,
         ndim: int) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Cut a box into parts of at most ``split_bytes`` along its first dim
    longer than one (in whole blocks when that is the last dim of a cast)."""
    ext = hi - lo
    parts = -(-nbytes // opts.split_bytes)
    dims = [k for k in range(ndim) if ext[k] > 1]
    if parts <= 1 or not dims:
        return [(lo, hi, nbytes)]
    k = dims[0]
    unit = opts.fp8_block if (cast and k == ndim - 1) else 1
    n_units = -(-int(ext[k]) // unit)
    parts = min(parts, n_units)
    out = []
    base, rem = divmod(n_units, parts)
    pos = 0
    for j in range(parts):
        n = base + (1 if j < rem else 0)
        a, b = int(lo[k]) + pos * unit, min(int(lo[k]) + (pos + n) * unit, int(hi[k]))
        pos += n
        plo, phi = lo.copy(), hi.copy()
        plo[k], phi[k] = a, b
        out.append((plo, phi, nbytes * (b - a) // int(ext[k])))
    return out


def _assign_nics(src: Layout, dst: Layout, tables: list[_Table], opts: PlanOptions) -> None:
    """Spread each source rank's routes over its NICs, largest first, to the least loaded."""
    items = []
    for i, t in enumerate(tables):
        item = dst.params[i].itemsize
        b = np.prod(t.hi - t.lo, axis=1) * item if len(t.src) else np.zeros(0, np.int64)
        for k in range(len(t.src)):
            items.append((int(t.src[k]), -int(b[k]), i, k))
    items.sort()
    load = np.zeros((src.ranks, opts.nics_per_rank), np.int64)
    for s, nb, i, k in items:
        n = int(np.argmin(load[s]))
        load[s, n] -= nb
        tables[i].nic[k] = n
