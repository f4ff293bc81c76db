"""Boxes and runs (sans-IO): how the part of a parameter that one route moves
(a box, ``lo <= index < hi`` in every dimension) falls into contiguous runs
of the two shards it is read from and written to.

A box is contiguous in a C-ordered shard over its trailing dimensions where
it spans the whole of both shards; the first dimension from the right where
it does not (in either shard) ends the run.  So a run is
``prod(extent[d:])`` elements and a box holds ``prod(extent[:d])`` runs.
Slicing across a non-leading dimension is what makes runs short and many:
a trainer shard of rows ``[r0, r1)`` of ``W[out, in]`` written to an
inference rank holding columns ``[c0, c1)`` is ``r1 - r0`` runs of
``c1 - c0`` elements each (one write per run, merged where contiguous).
"""
from __future__ import annotations

import numpy as np

__all__ = ["run_shape", "run_split", "run_starts", "strides"]


def strides(shape: tuple[int, ...] | np.ndarray) -> np.ndarray:
    """C-order element strides of ``shape`` (int64; works on ``[n, ndim]`` arrays row by row)."""
    s = np.asarray(shape, np.int64)
    out = np.ones_like(s)
    if s.shape[-1] > 1:
        out[..., :-1] = np.cumprod(s[..., :0:-1], axis=-1)[..., ::-1]
    return out


def run_split(ext: np.ndarray, src_shape: np.ndarray, dst_shape: np.ndarray) -> np.ndarray:
    """For boxes of extents ``ext`` (``[n, ndim]``) in shards of these
    shapes: the dimension ``d`` where runs start (0 when a box is one run)."""
    same = (ext == src_shape) & (ext == dst_shape)
    ndim = ext.shape[1]
    d = np.full(len(ext), 0, np.int64)
    # the last dimension (from the left) that is not spanned whole in both shards
    for k in range(ndim):
        d = np.where(~same[:, k], k, d)
    # boxes spanning every dimension whole in both shards: one run over everything
    whole = same.all(axis=1)
    return np.where(whole, 0, d)


def run_shape(ext: np.ndarray, src_shape: np.ndarray, dst_shape: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(split dim, runs per box, elements per run) for boxes ``[n, ndim]``."""
    ext = np.asarray(ext, np.int64)
    d = run_split(ext, src_shape, dst_shape)
    ndim = ext.shape[1]
    k = np.arange(ndim)[None, :]
    runs = np.prod(np.where(k < d[:, None], ext, 1), axis=1)
    length = np.prod(np.where(k >= d[:, None], ext, 1), axis=1)
    return d, runs, length


def run_starts(lo: np.ndarray, hi: np.ndarray, d: int, shard_lo: np.ndarray, shard_shape: np.ndarray) -> np.ndarray:
    """Element offsets, in the flattened shard (``shard_lo``/``shard_shape``),
    of the runs of one box split at dimension ``d`` (C order of the runs)."""
    st = strides(shard_shape)
    rel = np.asarray(lo, np.int64) - np.asarray(shard_lo, np.int64)
    base = int(np.dot(rel, st))
    if d == 0:
        return np.array([base], np.int64)
    grids = np.ix_(*[np.arange(int(hi[k] - lo[k]), dtype=np.int64) * st[k] for k in range(d)])
    total = grids[0]
    for g in grids[1:]:
        total = total + g
    return (base + total).reshape(-1)
