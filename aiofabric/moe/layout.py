"""MoE buffer layouts, routing and packing (sans-IO, NumPy).

Every backend shares these layouts; the GPU kernels (moe/kernels.py) write
the same bytes.  See docs/moe.md for the pictures.

A **row** is one (token, destination rank) pair (deduplicated, see
reference.py): a header then the payload::

    int32   token              index of the token at its source
    int32   expert[k]          local expert id of slot j on this rank, or -1
    int32   pos[k]             place of the token in (source, expert)'s list
    float32 weight[k]          the slot's routing weight
    (padding to 16 bytes)
    payload                    H x 2 (bf16) | H x 4 (float32) | H (fp8 codes)
    float32 scale[H/128]       FP8 only
    (padding to 16 bytes)

A rank's **inbox** (one registered buffer; GPU: one allocation, one IPC handle)::

    uint64  dflag[ranks]       GPU: meta flag from each source, seq << 32 | (parts - 1) << 28 | rows
    meta[ranks]                from each source: uint32 seq, uint32 rows, int32 count[E/ranks]
    drows[ranks][max_tokens]   dispatch rows from each source, in token order
    crows[ranks][max_tokens]   combine rows from each expert rank: H x (2 | 4) bytes,
                               row i answers the i-th row this rank sent there
    uint64  dtag[ranks][max_tokens][MAX_PARTS]   GPU: round of part p of dispatch row (s, i) once complete
    uint64  ctag[ranks][max_tokens]   GPU: round of the combine row (r, i) once it is complete
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from .._checks import int_arg as _int

__all__ = ["MoEConfig", "Routing", "MODES", "COMBINE_DTYPES", "check_tokens", "check_routing",
           "check_weights", "route", "header_dtype", "MAX_RANKS"]

MODES = ("bf16", "fp8", "float32")
COMBINE_DTYPES = ("bf16", "float32")
MAX_RANKS = 1024
MAX_PARTS = 8  #: GPU: blocks one token's dispatch payload may be split over (kernels.py)


def _align(n: int, a: int = 16) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class MoEConfig:
    """The shape of one expert-parallel group (every rank uses the same).

    ``max_tokens``: most tokens a rank dispatches at once (buffers are sized
    for it).  ``mode``: dispatch payload ``"bf16"``, ``"fp8"`` (E4M3 plus one
    float32 scale per 128 channels) or ``"float32"``; ``combine_dtype``:
    ``"bf16"`` or ``"float32"`` (also the dtype combine returns)."""

    num_experts: int
    ranks: int
    hidden: int
    topk: int
    max_tokens: int
    mode: str = "bf16"
    combine_dtype: str = "bf16"

    def __post_init__(self) -> None:
        for name in ("num_experts", "ranks", "hidden", "topk", "max_tokens"):
            object.__setattr__(self, name, _int(name, getattr(self, name)))
        if self.ranks > MAX_RANKS:
            raise ValueError(f"ranks must be <= {MAX_RANKS}, got {self.ranks}")
        if self.num_experts % self.ranks:
            raise ValueError(f"num_experts ({self.num_experts}) must be a multiple of ranks ({self.ranks})")
        if self.topk > self.num_experts:
            raise ValueError(f"topk ({self.topk}) exceeds num_experts ({self.num_experts})")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.combine_dtype not in COMBINE_DTYPES:
            raise ValueError(f"combine_dtype must be one of {COMBINE_DTYPES}, got {self.combine_dtype!r}")
        if self.hidden % 8:
            raise ValueError(f"hidden must be a multiple of 8, got {self.hidden}")
        if self.mode == "fp8" and self.hidden % 128:
            raise ValueError(f"mode='fp8' needs hidden to be a multiple of 128, got {self.hidden}")
        if self.max_tokens >= 1 << 31:
            raise ValueError("max_tokens too large")

    # -- sizes ----------------------------------------------------------------

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ranks

    @property
    def header_bytes(self) -> int:
        return _align(4 + 12 * self.topk)

    @property
    def payload_bytes(self) -> int:
        return self.hidden * {"bf16": 2, "fp8": 1, "float32": 4}[self.mode]

    @property
    def scale_bytes(self) -> int:
        return 4 * (self.hidden // 128) if self.mode == "fp8" else 0

    @property
    def row_bytes(self) -> int:
        return _align(self.header_bytes + self.payload_bytes + self.scale_bytes)

    @property
    def crow_bytes(self) -> int:
        return self.hidden * (2 if self.combine_dtype == "bf16" else 4)

    @property
    def meta_bytes(self) -> int:
        return _align(8 + 4 * self.experts_per_rank)

    @property
    def capacity(self) -> int:
        """Rows an expert's receive array holds: every token of every rank."""
        return self.ranks * self.max_tokens

    # offsets inside an inbox
    @property
    def dflag_offset(self) -> int:
        return 0

    @property
    def meta_offset(self) -> int:
        return _align(8 * self.ranks)

    @property
    def drows_offset(self) -> int:
        return self.meta_offset + self.ranks * self.meta_bytes

    @property
    def crows_offset(self) -> int:
        return self.drows_offset + self.ranks * self.max_tokens * self.row_bytes

    @property
    def dtag_offset(self) -> int:
        return _align(self.crows_offset + self.ranks * self.max_tokens * self.crow_bytes)

    @property
    def ctag_offset(self) -> int:
        return self.dtag_offset + 8 * self.ranks * self.max_tokens * MAX_PARTS

    @property
    def inbox_bytes(self) -> int:
        return self.ctag_offset + 8 * self.ranks * self.max_tokens

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> MoEConfig:
        if not isinstance(d, dict):
            raise TypeError(f"a config is a dict, not {type(d).__name__}")
        return cls(**d)


def header_dtype(cfg: MoEConfig) -> np.dtype:
    k = cfg.topk
    return np.dtype({"names": ["token", "expert", "pos", "weight"],
                     "formats": [np.int32, (np.int32, k), (np.int32, k), (np.float32, k)],
                     "offsets": [0, 4, 4 + 4 * k, 4 + 8 * k], "itemsize": cfg.header_bytes})


def meta_dtype(cfg: MoEConfig) -> np.dtype:
    return np.dtype({"names": ["seq", "rows", "count"],
                     "formats": [np.uint32, np.uint32, (np.int32, cfg.experts_per_rank)],
                     "offsets": [0, 4, 8], "itemsize": cfg.meta_bytes})


# -- argument checks (shared by the reference and the backends) ---------------

def check_tokens(name: str, tokens: Any, hidden: int | None = None, max_tokens: int | None = None) -> np.ndarray:
    if not isinstance(tokens, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, not {type(tokens).__name__}")
    if tokens.dtype not in (np.uint16, np.float32):
        raise TypeError(f"{name} must be uint16 (BF16 bits) or float32, not {tokens.dtype}")
    if tokens.ndim != 2:
        raise ValueError(f"{name} must be [tokens, hidden], got shape {tokens.shape}")
    if hidden is not None and tokens.shape[1] != hidden:
        raise ValueError(f"{name} has hidden size {tokens.shape[1]}, the config {hidden}")
    if max_tokens is not None and len(tokens) > max_tokens:
        raise ValueError(f"{name} has {len(tokens)} tokens, more than max_tokens={max_tokens}")
    return np.ascontiguousarray(tokens)


def check_routing(name: str, topk_idx: Any, num_experts: int, tokens: int | None = None,
                  topk: int | None = None) -> np.ndarray:
    idx = np.asarray(topk_idx)
    if idx.dtype == np.bool_ or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, not {idx.dtype}")
    if idx.ndim != 2:
        raise ValueError(f"{name} must be [tokens, k], got shape {idx.shape}")
    if tokens is not None and len(idx) != tokens:
        raise ValueError(f"{name} has {len(idx)} rows for {tokens} tokens")
    if topk is not None and idx.shape[1] != topk:
        raise ValueError(f"{name} has k={idx.shape[1]}, the config topk={topk}")
    if idx.size and (idx.min() < -1 or idx.max() >= num_experts):
        raise ValueError(f"{name} values must lie in [-1, {num_experts}), got {idx.min()}..{idx.max()}")
    idx = idx.astype(np.int32)
    if idx.size:
        s = np.sort(idx, axis=1)
        if ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)).any():
            raise ValueError(f"{name} routes a token to the same expert twice")
    return idx


def check_weights(name: str, w: Any, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(w)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must hold floats, not {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    return np.ascontiguousarray(arr, np.float32)


# -- routing --------------------------------------------------------------------

class Routing(NamedTuple):
    """Where one rank's tokens go (its half of a dispatch)."""

    pos: np.ndarray     #: [T, k] int32: place in (this rank, expert)'s list at the owner; -1 masked
    rowidx: np.ndarray  #: [T, ranks] int32: the token's row at rank r, -1 when it sends none there
    rows: np.ndarray    #: [ranks] int64: rows sent to each rank
    counts: np.ndarray  #: [ranks, E/ranks] int32: tokens sent to each expert


def route(cfg: MoEConfig, idx: np.ndarray) -> Routing:
    """Rows in token order per destination; positions in token order per expert."""
    epr, ranks = cfg.experts_per_rank, cfg.ranks
    t, k = idx.shape
    valid = idx >= 0
    owner = np.where(valid, idx // epr, -1)
    # pos: rank of (t, j) among the earlier hits of the same expert (token order; one hit per token)
    flat = np.where(valid, idx, cfg.num_experts).reshape(-1)
    order = np.argsort(flat, kind="stable")  # by expert, then by (t, j) flat order = token order
    sorted_e = flat[order]
    starts = np.searchsorted(sorted_e, np.arange(cfg.num_experts + 1))
    rank_in = np.arange(len(flat)) - starts[sorted_e]
    pos = np.empty(len(flat), np.int32)
    pos[order] = rank_in
    pos = np.where(valid.reshape(-1), pos, -1).reshape(t, k).astype(np.int32)
    hits = np.zeros((t, ranks), bool)
    rows_t, cols = np.nonzero(valid)
    hits[rows_t, owner[rows_t, cols]] = True
    rowidx = np.where(hits, np.cumsum(hits, axis=0) - 1, -1).astype(np.int32)
    counts = np.bincount(flat[flat < cfg.num_experts], minlength=cfg.num_experts).astype(np.int32)
    return Routing(pos, rowidx, hits.sum(axis=0).astype(np.int64), counts.reshape(ranks, epr))


def payload(cfg: MoEConfig, tokens: np.ndarray) -> np.ndarray:
    """Tokens in the dispatch format, as bytes ``[T, payload + scales]``."""
    from .reference import encode_tokens

    x, scales = encode_tokens(tokens, cfg.mode)
    out = np.ascontiguousarray(x).view(np.uint8).reshape(len(x), cfg.payload_bytes)
    if scales is not None:
        sb = np.ascontiguousarray(scales).view(np.uint8).reshape(len(x), cfg.scale_bytes)
        out = np.concatenate([out, sb], axis=1)
    return out


def pack_rows(cfg: MoEConfig, out: np.ndarray, r: int, body: np.ndarray, idx: np.ndarray, w: np.ndarray,
              rt: Routing) -> int:
    """Write the rows for rank ``r`` into ``out`` (``[max_tokens, row_bytes]``
    uint8); returns how many."""
    sel = np.nonzero(rt.rowidx[:, r] >= 0)[0]
    n = len(sel)
    if n == 0:
        return 0
    epr = cfg.experts_per_rank
    hdr = np.zeros(n, header_dtype(cfg))
    on_r = (idx[sel] >= 0) & (idx[sel] // epr == r)
    hdr["token"] = sel
    hdr["expert"] = np.where(on_r, idx[sel] % epr, -1)
    hdr["pos"] = np.where(on_r, rt.pos[sel], -1)
    hdr["weight"] = np.where(on_r, w[sel], 0)
    h = cfg.header_bytes
    out[:n, :h] = hdr.view(np.uint8).reshape(n, h)
    out[:n, h:h + body.shape[1]] = body[sel]
    return n


def offsets(cfg: MoEConfig, meta: np.ndarray) -> np.ndarray:
    """``[ranks, E/ranks]``: where each source's tokens start in each expert's list."""
    counts = meta["count"].astype(np.int64)
    return np.cumsum(counts, axis=0) - counts


def expand(cfg: MoEConfig, drows: np.ndarray, meta: np.ndarray, base: np.ndarray, x: np.ndarray,
           src: np.ndarray) -> None:
    """Copy received rows into the expert arrays: the token of (source ``s``,
    slot ``j``) for local expert ``e`` goes to row ``base[e] + offsets[s, e] +
    pos`` of ``x`` (``[N, payload + scales]`` uint8) and ``src`` (``[N, 2]``
    int32: source rank, token index)."""
    off = offsets(cfg, meta)
    h = cfg.header_bytes
    body = cfg.payload_bytes + cfg.scale_bytes
    for s in range(cfg.ranks):
        n = int(meta["rows"][s])
        if n == 0:
            continue
        rows = drows[s, :n]
        hdr = np.ascontiguousarray(rows[:, :h]).view(header_dtype(cfg)).reshape(n)
        for j in range(cfg.topk):
            e = hdr["expert"][:, j]
            m = np.nonzero(e >= 0)[0]
            if len(m) == 0:
                continue
            ee = e[m]
            dst = base[ee] + off[s, ee] + hdr["pos"][m, j]
            x[dst] = rows[m, h:h + body]
            src[dst, 0] = s
            src[dst, 1] = hdr["token"][m]


def partials(cfg: MoEConfig, drows: np.ndarray, n: int, rowbase: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The combine rows for one source: ``[n, H]`` float32 partial sums over
    this rank's experts (slot order, multiply then add); the output for the
    slot of local expert ``e`` at ``pos`` is ``y[rowbase[e] + pos]`` (``y``
    float32 ``[N, H]``)."""
    h = cfg.header_bytes
    hdr = np.ascontiguousarray(drows[:n, :h]).view(header_dtype(cfg)).reshape(n)
    acc = np.zeros((n, cfg.hidden), np.float32)
    for j in range(cfg.topk):
        e = hdr["expert"][:, j]
        m = np.nonzero(e >= 0)[0]
        if len(m) == 0:
            continue
        rows = y[rowbase[e[m]] + hdr["pos"][m, j]]
        acc[m] = acc[m] + hdr["weight"][m, j][:, None] * rows
    return acc


def gather_combine(cfg: MoEConfig, crows: np.ndarray, rowidx: np.ndarray) -> np.ndarray:
    """The combined tokens ``[T, H]`` (combine dtype) from the rows every
    expert rank sent back (``crows`` ``[ranks, max_tokens, H]`` uint16 or
    float32): partials summed in ascending rank order in float32."""
    from .numerics import bf16_to_f32, f32_to_bf16

    t = len(rowidx)
    acc = np.zeros((t, cfg.hidden), np.float32)
    for r in range(cfg.ranks):
        m = np.nonzero(rowidx[:, r] >= 0)[0]
        if len(m) == 0:
            continue
        rows = crows[r, rowidx[m, r]]
        acc[m] = acc[m] + (bf16_to_f32(rows) if rows.dtype == np.uint16 else rows)
    return f32_to_bf16(acc) if cfg.combine_dtype == "bf16" else acc
