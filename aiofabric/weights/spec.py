"""Parameters and how each side of a weight update holds them (sans-IO).

A :class:`Layout` says, for every parameter and every rank, which part of the
parameter that rank holds: a :class:`Shard` (one dimension and a ``[start,
stop)`` range on it, or the whole tensor) or nothing.  The trainer side is
typically FSDP (each rank a slice of every parameter, :meth:`Layout.fsdp`);
the inference side tensor/expert parallel groups, replicated
(:meth:`Layout.tensor_parallel`): every replica is written.

Each rank keeps its shards packed in one buffer, in parameter order, each
shard C-contiguous and aligned (:meth:`Layout.offsets`); that buffer is what
it registers with its engine.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .._checks import int_arg as _pos_int

__all__ = ["DTYPES", "FULL", "Layout", "ParamSpec", "Shard", "scale_shape", "split_range"]

#: element size in bytes of every dtype a plan knows (bf16 and fp8 are stored as uint16 / uint8)
DTYPES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8_e4m3": 1, "u8": 1, "i32": 4, "i64": 8}

#: a scale of a block-quantized FP8 tensor is one float32
SCALE_BYTES = 4


class ParamSpec(NamedTuple):
    """One parameter: its name, full (unsharded) shape and dtype (a key of :data:`DTYPES`)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class Shard(NamedTuple):
    """The part of a parameter one rank holds: ``[start, stop)`` along ``dim``;
    ``dim=None`` is the whole tensor (a replica; start/stop are ignored)."""

    dim: int | None
    start: int = 0
    stop: int = 0

    def bounds(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(lo, hi) corners of the shard in the full tensor."""
        lo, hi = [0] * len(shape), list(shape)
        if self.dim is not None:
            lo[self.dim], hi[self.dim] = self.start, self.stop
        return tuple(lo), tuple(hi)

    def shape_of(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(shape)
        out = list(shape)
        out[self.dim] = self.stop - self.start
        return tuple(out)


FULL = Shard(None)


def split_range(extent: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """Split ``[0, extent)`` into ``parts`` ranges as evenly as whole ``unit``\\ s
    allow (the first ranges one unit longer); trailing ranges may be empty."""
    units = -(-extent // unit)
    base, extra = divmod(units, parts)
    out, pos = [], 0
    for k in range(parts):
        n = base + (1 if k < extra else 0)
        out.append((min(pos * unit, extent), min((pos + n) * unit, extent)))
        pos += n
    return out


def scale_shape(shard_shape: tuple[int, ...], block: int) -> tuple[int, ...]:
    """Shape of the float32 scales of a block-quantized shard: one per ``block``
    elements of every row (last dimension), the last block of a row possibly short."""
    return tuple(shard_shape[:-1]) + (-(-shard_shape[-1] // block),)


@dataclass(frozen=True)
class Layout:
    """Which part of every parameter each of ``ranks`` ranks holds.

    ``shards[i][r]`` is rank r's :class:`Shard` of ``params[i]``, or None.
    Raises TypeError/ValueError naming the field at fault.
    """

    params: tuple[ParamSpec, ...]
    shards: tuple[tuple[Shard | None, ...], ...]

    def __post_init__(self) -> None:
        params = tuple(self.params)
        if not params:
            raise ValueError("params must not be empty")
        fixed = []
        names: set[str] = set()
        for i, p in enumerate(params):
            if not isinstance(p, tuple) or len(p) != 3:
                raise TypeError(f"params[{i}] must be a ParamSpec(name, shape, dtype)")
            name, shape, dtype = p
            if type(name) is not str or not name:
                raise TypeError(f"params[{i}].name must be a non-empty str")
            if name in names:
                raise ValueError(f"params[{i}]: duplicate parameter name {name!r}")
            names.add(name)
            if not isinstance(shape, (tuple, list)) or not shape:
                raise TypeError(f"params[{i}].shape must be a non-empty tuple of ints")
            shape = tuple(_pos_int(f"params[{i}].shape", s) for s in shape)
            if dtype not in DTYPES:
                raise ValueError(f"params[{i}].dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            fixed.append(ParamSpec(name, shape, dtype))
        object.__setattr__(self, "params", tuple(fixed))
        shards = tuple(tuple(row) for row in self.shards)
        if len(shards) != len(fixed):
            raise ValueError(f"shards has {len(shards)} rows for {len(fixed)} params")
        ranks = len(shards[0])
        if ranks < 1:
            raise ValueError("shards: a layout needs at least one rank")
        out = []
        for i, (p, row) in enumerate(zip(fixed, shards)):
            if len(row) != ranks:
                raise ValueError(f"shards[{i}] ({p.name}) has {len(row)} ranks, shards[0] has {ranks}")
            new = []
            for r, s in enumerate(row):
                if s is None:
                    new.append(None)
                    continue
                if not isinstance(s, tuple) or len(s) != 3:
                    raise TypeError(f"shards[{i}][{r}] ({p.name}) must be a Shard or None")
                dim, start, stop = s
                if dim is None:
                    new.append(FULL)
                    continue
                dim = _pos_int(f"shards[{i}][{r}].dim", dim, 0)
                if dim >= len(p.shape):
                    raise ValueError(f"shards[{i}][{r}] ({p.name}): dim {dim} out of range for shape {p.shape}")
                start = _pos_int(f"shards[{i}][{r}].start", start, 0)
                stop = _pos_int(f"shards[{i}][{r}].stop", stop, 0)
                if not start < stop <= p.shape[dim]:
                    raise ValueError(f"shards[{i}][{r}] ({p.name}): range [{start}, {stop}) is empty or outside "
                                     f"0..{p.shape[dim]} of dim {dim}")
                new.append(Shard(dim, start, stop))
            out.append(tuple(new))
        object.__setattr__(self, "shards", tuple(out))

    # -- constructors -----------------------------------------------------------

    @classmethod
    def build(cls, params: Iterable[ParamSpec], ranks: int,
              fn: Callable[[ParamSpec, int], Shard | None]) -> Layout:
        """``fn(param, rank)`` gives each rank's shard."""
        params = tuple(params)
        ranks = _pos_int("ranks", ranks)
        return cls(params, tuple(tuple(fn(p, r) for r in range(ranks)) for p in params))

    @classmethod
    def replicated(cls, params: Iterable[ParamSpec], ranks: int) -> Layout:
        """Every rank holds every parameter whole (e.g. a trainer after an FSDP all-gather)."""
        return cls.build(params, ranks, lambda p, r: FULL)

    @classmethod
    def fsdp(cls, params: Iterable[ParamSpec], ranks: int, *, replicas: int = 1,
             dims: Mapping[str, int] | None = None) -> Layout:
        """FSDP: every parameter split along one dimension over ``ranks``
        ranks (``replicas`` times over, HSDP: rank = replica * ranks + k).
        The dimension is ``dims[name]``, else the first whose extent is at
        least ``ranks``, else 0.  Ranks whose range is empty hold nothing."""
        ranks = _pos_int("ranks", ranks)
        replicas = _pos_int("replicas", replicas)
        dims = dict(dims or {})
        cuts: dict[str, tuple[int, list[tuple[int, int]]]] = {}
        for p in params:
            d = dims.get(p.name)
            if d is None:
                d = next((k for k, s in enumerate(p.shape) if s >= ranks), 0)
            cuts[p.name] = (d, split_range(p.shape[d], ranks))

        def fn(p: ParamSpec, r: int) -> Shard | None:
            d, ranges = cuts[p.name]
            a, b = ranges[r % ranks]
            return Shard(d, a, b) if b > a else None

        return cls.build(params, ranks * replicas, fn)

    @classmethod
    def tensor_parallel(cls, params: Iterable[ParamSpec], tp: int, *, replicas: int = 1,
                        dims: Mapping[str, int | None] | Callable[[ParamSpec], int | None] | None = None,
                        block: int = 128) -> Layout:
        """Tensor (or expert) parallel groups of ``tp`` ranks, ``replicas``
        of them (rank = replica * tp + t).  Each parameter is split along
        ``dims[name]`` (``None``: replicated in the group; missing: dim 0).
        A split of the last dimension of an FP8 parameter keeps whole
        ``block``\\ s of its row on each rank (its scales are per block)."""
        tp = _pos_int("tp", tp)
        replicas = _pos_int("replicas", replicas)
        params = tuple(params)

        def dim_of(p: ParamSpec) -> int | None:
            if dims is None:
                return 0
            if callable(dims):
                return dims(p)
            return dims.get(p.name, 0)

        cuts = {}
        for p in params:
            d = dim_of(p)
            if d is None or tp == 1:
                cuts[p.name] = None
            else:
                unit = block if (p.dtype == "fp8_e4m3" and d == len(p.shape) - 1) else 1
                cuts[p.name] = (d, split_range(p.shape[d], tp, unit))

        def fn(p: ParamSpec, r: int) -> Shard | None:
            c = cuts[p.name]
            if c is None:
                return FULL
            d, ranges = c
            a, b = ranges[r % tp]
            return Shard(d, a, b) if b > a else None

        return cls.build(params, tp * replicas, fn)

    # -- queries ---------------------------------------------------------------

    @property
    def ranks(self) -> int:
        return len(self.shards[0])

    def index(self, name: str) -> int:
        for i, p in enumerate(self.params):
            if p.name == name:
                return i
        raise KeyError(name)

    def shard(self, name: str, rank: int) -> Shard | None:
        return self.shards[self.index(name)][rank]

    def to_list(self) -> list[Any]:
        """A msgpack-friendly form (see :meth:`from_list`)."""
        return [[[p.name, list(p.shape), p.dtype] for p in self.params],
                [[None if s is None else [s.dim, s.start, s.stop] for s in row] for row in self.shards]]

    @classmethod
    def from_list(cls, data: Any) -> Layout:
        params, shards = data
        return cls(tuple(ParamSpec(n, tuple(s), d) for n, s, d in params),
                   tuple(tuple(None if s is None else Shard(*s) for s in row) for row in shards))
