"""ExpertParallel: MoE dispatch and combine between ranks over the fabric
(host memory, any provider; the inter-host path).

Each rank registers one inbox (layout.py) and a staging buffer it writes
from.  A round is ``dispatch_send -> dispatch_recv -> (experts) ->
combine_send -> combine_recv``; the send halves post every write and return
at once, so the caller overlaps them with its own work.

Protocol (imm = ``tag << 24 | kind << 16 | source rank``; nothing relies on
ordering, every arrival is learnt from its immediate):

* dispatch: to every other rank ``r``, one write of this rank's meta (round
  number, rows, per-expert counts) into ``inbox[r].meta[me]`` with kind META,
  and, when there are rows, one write of the rows into
  ``inbox[r].drows[me]`` with kind ROWS.  The receiver waits for META from
  each source, then for ROWS from the sources that announced rows.
* combine: to every source ``s`` that sent rows, one write of the partial
  sums into ``inbox[s].crows[me]`` with kind COMBINE; the source knows which
  ranks owe it rows.

A rank's own share is copied locally.  The round alternation makes reuse of
the inboxes safe without extra acknowledgements (docs/moe.md).  Every wait
names the peer it depends on, so a failed peer raises BrokenResourceError
(within the engine's ``peer_timeout``) instead of hanging.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, NamedTuple, Sequence

import msgpack
import numpy as np

from ..errors import ProtocolError
from ..memory import Address, RegionDescriptor
from . import layout
from .layout import MoEConfig

__all__ = ["ExpertParallel", "Dispatched", "moe_imm", "META", "ROWS", "COMBINE"]

META, ROWS, COMBINE = 1, 2, 3
DEFAULT_TAG = 0x4D
_VERSION = 1


def moe_imm(tag: int, kind: int, src: int) -> int:
    """The immediate of a MoE write: ``tag << 24 | kind << 16 | src``."""
    return (tag & 0xFF) << 24 | kind << 16 | src


class Dispatched(NamedTuple):
    """What one rank received: its local experts' tokens, packed expert after
    expert (``x[offsets[e]:offsets[e+1]]`` are expert ``e``'s, in source
    rank then token order)."""

    x: np.ndarray               #: [N, H] uint16 (BF16) / uint8 (FP8) / float32
    scales: np.ndarray | None   #: [N, H/128] float32 (FP8 only)
    src_rank: np.ndarray        #: [N] int32
    src_token: np.ndarray       #: [N] int32
    counts: np.ndarray          #: [E/ranks] int64
    offsets: np.ndarray         #: [E/ranks + 1] int64

    def expert(self, e: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        """(x, scales, src_rank, src_token) of local expert ``e``."""
        a, b = int(self.offsets[e]), int(self.offsets[e + 1])
        return (self.x[a:b], None if self.scales is None else self.scales[a:b], self.src_rank[a:b],
                self.src_token[a:b])


def _retrieve(f: asyncio.Future[Any]) -> None:
    if not f.cancelled():
        f.exception()  # retrieved: an abandoned round's failure is not logged as unhandled


async def wait_all(aws: Sequence[Awaitable[Any]]) -> list[Any]:
    """Await all; on the first failure cancel the rest and raise it."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class ExpertParallel:
    """One rank of an expert-parallel group over ``engine``.

    ``config`` is the same on every rank; ``imm_tag`` (0..255) separates
    several groups on one engine.  Connect with :meth:`join` (addresses of
    every rank's engine, index = rank) or :meth:`connect` (every rank's
    :meth:`info` blob, exchanged by the caller).  Raises TypeError/ValueError
    on bad arguments, RegistrationError if the buffers cannot be registered.
    """

    def __init__(self, engine: Any, rank: int, config: MoEConfig, *, imm_tag: int = DEFAULT_TAG) -> None:
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, not {type(config).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise TypeError(f"rank must be an int, not {type(rank).__name__}")
        if not 0 <= rank < config.ranks:
            raise ValueError(f"rank must lie in [0, {config.ranks}), got {rank}")
        if isinstance(imm_tag, bool) or not isinstance(imm_tag, int) or not 0 <= imm_tag <= 255:
            raise ValueError(f"imm_tag must be an int in [0, 255], got {imm_tag!r}")
        self.engine = engine
        self.rank = rank
        self.config = c = config
        self.imm_tag = imm_tag
        self._inbox = np.zeros(c.inbox_bytes, np.uint8)
        mt = c.max_tokens
        staging = c.ranks * (c.meta_bytes + mt * (c.row_bytes + c.crow_bytes))
        self._out = np.zeros(staging, np.uint8)
        self._inbox_region = engine.register(self._inbox, remote_write=True)
        try:
            self._out_region = engine.register(self._out, remote_write=False)
        except BaseException:
            self._inbox_region.close()
            raise
        ib = self._inbox
        self._meta = ib[c.meta_offset:c.drows_offset].view(layout.meta_dtype(c))
        self._drows = ib[c.drows_offset:c.crows_offset].reshape(c.ranks, mt, c.row_bytes)
        cdt = np.uint16 if c.combine_dtype == "bf16" else np.float32
        self._crows = ib[c.crows_offset:c.dtag_offset].view(cdt).reshape(c.ranks, mt, c.hidden)
        o1 = c.ranks * c.meta_bytes
        o2 = o1 + c.ranks * mt * c.row_bytes
        self._ometa = self._out[:o1].view(layout.meta_dtype(c))
        self._odrows = self._out[o1:o2].reshape(c.ranks, mt, c.row_bytes)
        self._ocrows = self._out[o2:].view(cdt).reshape(c.ranks, mt, c.hidden)
        self._o = (o1, o2)
        self._peers: list[Address] | None = None
        self._descs: list[RegionDescriptor] = []
        self._seq = 0
        self._state = "idle"
        self._send: asyncio.Future[Any] | None = None
        self._routing: layout.Routing | None = None
        self._recv_meta: np.ndarray | None = None
        self._base: np.ndarray | None = None
        self._n: int = 0
        self._closed = False

    # -- connecting -------------------------------------------------------------

    def info(self) -> bytes:
        """This rank's connection blob (config, rank, inbox descriptor)."""
        return msgpack.packb({"t": "moe", "v": _VERSION, "rank": self.rank, "config": self.config.to_dict(),
                              "tag": self.imm_tag, "inbox": self._inbox_region.descriptor().to_bytes()},
                             use_bin_type=True)

    def connect(self, infos: Sequence[bytes]) -> None:
        """Connect to every rank from their :meth:`info` blobs (index = rank).
        Raises ProtocolError when a blob is malformed or describes another
        group (config, tag or rank differ)."""
        infos = list(infos)
        if len(infos) != self.config.ranks:
            raise ValueError(f"infos needs one blob per rank ({self.config.ranks}), got {len(infos)}")
        descs = []
        for r, blob in enumerate(infos):
            if not isinstance(blob, (bytes, bytearray, memoryview)):
                raise TypeError(f"infos[{r}] must be bytes, not {type(blob).__name__}")
            try:
                d = msgpack.unpackb(bytes(blob), raw=False)
                ok = isinstance(d, dict) and d.get("t") == "moe" and d.get("v") == _VERSION
                desc = RegionDescriptor.from_bytes(d["inbox"]) if ok else None
            except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
                raise ProtocolError(f"infos[{r}] is not a MoE info blob: {e}") from None
            if desc is None:
                raise ProtocolError(f"infos[{r}] is not a MoE info blob (version {_VERSION})")
            if d.get("rank") != r:
                raise ProtocolError(f"infos[{r}] comes from rank {d.get('rank')}")
            if d.get("config") != self.config.to_dict() or d.get("tag") != self.imm_tag:
                raise ProtocolError(f"rank {r} uses another config or tag: {d.get('config')}, {d.get('tag')}")
            if desc.nbytes != self.config.inbox_bytes:
                raise ProtocolError(f"rank {r}'s inbox has {desc.nbytes} bytes, expected {self.config.inbox_bytes}")
            descs.append(desc)
        self._descs = descs
        self._peers = [d.owner for d in descs]

    async def join(self, peers: Sequence[Address]) -> None:
        """Exchange :meth:`info` with every rank over the engine's messages
        (``peers[r]`` is rank r's engine address, ours included) and connect.
        Raises BrokenResourceError if a peer fails meanwhile."""
        peers = list(peers)
        if len(peers) != self.config.ranks:
            raise ValueError(f"peers needs one address per rank ({self.config.ranks}), got {len(peers)}")
        for r, p in enumerate(peers):
            if type(p) is not Address:
                raise TypeError(f"peers[{r}] must be an Address, not {type(p).__name__}")
        blob = self.info()
        sends = [self.engine.send(p, blob) for r, p in enumerate(peers) if r != self.rank]

        async def get(p: Address) -> bytes:
            return (await self.engine.recv(peer=p)).data  # the next message from each peer is its info

        got = await wait_all([get(p) for r, p in enumerate(peers) if r != self.rank])
        await wait_all(sends)
        infos = list(got)
        infos.insert(self.rank, blob)
        self.connect(infos)

    # -- dispatch -----------------------------------------------------------------

    def _imm(self, kind: int, src: int) -> int:
        return moe_imm(self.imm_tag, kind, src)

    def _check_state(self, want: str, what: str) -> None:
        if self._closed:
            from ..errors import ClosedResourceError

            raise ClosedResourceError("ExpertParallel is closed")
        if self._peers is None:
            raise RuntimeError("connect() or join() first")
        if self._state != want:
            raise RuntimeError(f"{what} out of turn: a round is dispatch_send, dispatch_recv, combine_send, "
                               f"combine_recv (state: {self._state})")

    def dispatch_send(self, tokens: np.ndarray, topk_idx: Any, topk_weights: Any) -> asyncio.Future[Any]:
        """Route ``tokens`` ``[T, H]`` (uint16 BF16 bits or float32, T <=
        max_tokens) to the owners of ``topk_idx`` ``[T, k]`` (-1 = masked) and
        post every write.  Returns the future of the writes' local completion
        (:meth:`dispatch_recv` awaits it too).  Raises TypeError/ValueError
        naming the bad argument (nothing is sent), BrokenResourceError for a
        peer already known to have failed."""
        self._check_state("idle", "dispatch_send")
        c = self.config
        tokens = layout.check_tokens("tokens", tokens, c.hidden, c.max_tokens)
        idx = layout.check_routing("topk_idx", topk_idx, c.num_experts, len(tokens), c.topk)
        w = layout.check_weights("topk_weights", topk_weights, idx.shape)
        return self._dispatch_body(layout.payload(c, tokens), idx, w)

    def _dispatch_body(self, body: np.ndarray, idx: np.ndarray, w: np.ndarray) -> asyncio.Future[Any]:
        """dispatch_send with the payload already encoded (``[T, payload +
        scales]`` bytes, e.g. packed on a GPU) and checked routing."""
        c = self.config
        rt = layout.route(c, idx)
        seq = self._seq = (self._seq + 1) & 0xFFFFFFFF
        metas, rows = [], []
        for r in range(c.ranks):
            n = layout.pack_rows(c, self._odrows[r], r, body, idx, w, rt)
            om = self._ometa
            om["seq"][r], om["rows"][r], om["count"][r] = seq, n, rt.counts[r]
            if r == self.rank:
                self._meta[r] = om[r]
                self._drows[r, :n] = self._odrows[r, :n]
                continue
            d = self._descs[r]
            mo = c.meta_offset + self.rank * c.meta_bytes
            metas.append((self._out_region[r * c.meta_bytes:(r + 1) * c.meta_bytes], d[mo:mo + c.meta_bytes]))
            if n:
                so = self._o[0] + r * c.max_tokens * c.row_bytes
                do = c.drows_offset + self.rank * c.max_tokens * c.row_bytes
                rows.append((self._out_region[so:so + n * c.row_bytes], d[do:do + n * c.row_bytes]))
        futs: list[asyncio.Future[Any]] = []
        try:
            if metas:
                futs.append(self.engine.scatter(metas, imm=self._imm(META, self.rank)))
            if rows:
                futs.append(self.engine.scatter(rows, imm=self._imm(ROWS, self.rank)))
        except BaseException:
            self._state = "broken"  # part of the round may be out: the group cannot go on
            for f in futs:
                f.add_done_callback(_retrieve)
            raise
        self._send = asyncio.gather(*futs)
        self._routing = rt
        self._state = "dispatching"
        return self._send

    async def dispatch_recv(self) -> Dispatched:
        """Wait for every rank's tokens for this rank's experts and return
        them (see :class:`Dispatched`; order: source rank, then token).
        Raises BrokenResourceError when a rank it waits for fails,
        ProtocolError when a rank is in another round.  Cancelling abandons
        the round (the group must be rebuilt)."""
        self._check_state("dispatching", "dispatch_recv")
        c = self.config
        send, self._send = self._send, None
        assert self._peers is not None and send is not None
        self._state = "broken"  # until this round completes

        async def from_rank(s: int) -> None:
            peer = self._peers[s]  # type: ignore[index]
            await self.engine.imm_counter(self._imm(META, s)).wait(1, peer=peer)
            if int(self._meta[s]["rows"]):
                await self.engine.imm_counter(self._imm(ROWS, s)).wait(1, peer=peer)

        await wait_all([send, *(from_rank(s) for s in range(c.ranks) if s != self.rank)])
        meta = self._meta.copy()
        bad = np.nonzero(meta["seq"] != self._seq)[0]
        if len(bad):
            raise ProtocolError(f"rank {int(bad[0])} sent round {int(meta['seq'][bad[0]])}, this is round {self._seq}")
        if (meta["rows"] > c.max_tokens).any() or (meta["count"] < 0).any() or (meta["count"] > c.max_tokens).any():
            raise ProtocolError("a rank sent impossible row counts")
        counts = meta["count"].astype(np.int64).sum(axis=0)
        base = np.concatenate([[0], np.cumsum(counts)])
        n = int(base[-1])
        body = c.payload_bytes + c.scale_bytes
        xb = np.empty((n, body), np.uint8)
        src = np.empty((n, 2), np.int32)
        layout.expand(c, self._drows, meta, base[:-1], xb, src)
        x = xb[:, :c.payload_bytes]
        dt = {"bf16": np.uint16, "fp8": np.uint8, "float32": np.float32}[c.mode]
        x = np.ascontiguousarray(x).view(dt)
        scales = np.ascontiguousarray(xb[:, c.payload_bytes:]).view(np.float32) if c.mode == "fp8" else None
        self._recv_meta, self._base, self._n = meta, base, n
        self._state = "dispatched"
        return Dispatched(x, scales, src[:, 0].copy(), src[:, 1].copy(), counts, base)

    # -- combine ------------------------------------------------------------------

    def _expert_out(self, expert_out: Any) -> np.ndarray:
        c = self.config
        counts = np.diff(self._base)  # type: ignore[arg-type]
        if isinstance(expert_out, (list, tuple)):
            if len(expert_out) != c.experts_per_rank:
                raise ValueError(f"expert_out needs one array per local expert ({c.experts_per_rank})")
            for e, a in enumerate(expert_out):
                if not isinstance(a, np.ndarray):
                    raise TypeError(f"expert_out[{e}] must be a numpy array, not {type(a).__name__}")
                if a.shape != (counts[e], c.hidden):
                    raise ValueError(f"expert_out[{e}] must have shape {(int(counts[e]), c.hidden)}, got {a.shape}")
            arrs = list(expert_out)
            y = np.concatenate(arrs) if arrs else np.zeros((0, c.hidden), np.float32)
            if any(a.dtype != y.dtype for a in arrs):
                raise TypeError("expert_out arrays must share one dtype")
        elif isinstance(expert_out, np.ndarray):
            y = expert_out
            if y.shape != (self._n, c.hidden):
                raise ValueError(f"expert_out must have shape {(self._n, c.hidden)} (Dispatched.x's rows), "
                                 f"got {y.shape}")
        else:
            raise TypeError(f"expert_out must be a numpy array or a list of them, not {type(expert_out).__name__}")
        if y.dtype == np.uint16:
            from .numerics import bf16_to_f32

            return bf16_to_f32(y)
        if y.dtype != np.float32:
            raise TypeError(f"expert_out must be uint16 (BF16 bits) or float32, not {y.dtype}")
        return y

    def combine_send(self, expert_out: Any) -> asyncio.Future[Any]:
        """Send the experts' outputs back: ``expert_out`` is ``[N, H]`` in
        :class:`Dispatched` order, or one ``[n_e, H]`` array per local expert
        (uint16 BF16 bits or float32).  Each token's outputs are reduced
        here first (weighted, one row per (token, source rank)).  Returns the
        writes' future.  Raises TypeError/ValueError naming the argument."""
        self._check_state("dispatched", "combine_send")
        c = self.config
        y = self._expert_out(expert_out)
        meta, base = self._recv_meta, self._base
        assert meta is not None and base is not None
        off = layout.offsets(c, meta)
        pairs = []
        from .numerics import f32_to_bf16

        for s in range(c.ranks):
            n = int(meta["rows"][s])
            if n == 0:
                continue
            part = layout.partials(c, self._drows[s], n, base[:-1] + off[s], y)
            wire = f32_to_bf16(part) if c.combine_dtype == "bf16" else part
            if s == self.rank:
                self._crows[s, :n] = wire
                continue
            self._ocrows[s, :n] = wire
            so = self._o[1] + s * c.max_tokens * c.crow_bytes
            do = c.crows_offset + self.rank * c.max_tokens * c.crow_bytes
            pairs.append((self._out_region[so:so + n * c.crow_bytes], self._descs[s][do:do + n * c.crow_bytes]))
        try:
            self._send = self.engine.scatter(pairs, imm=self._imm(COMBINE, self.rank)) if pairs else None
        except BaseException:
            self._state = "broken"
            raise
        if self._send is None:
            self._send = asyncio.get_running_loop().create_future()
            self._send.set_result([])
        self._state = "combining"
        return self._send

    async def combine_recv(self) -> np.ndarray:
        """Wait for every expert rank's rows and return the combined tokens
        ``[T, H]`` (uint16 BF16 bits or float32, per ``combine_dtype``), in the
        order they were dispatched.  Raises like :meth:`dispatch_recv`."""
        self._check_state("combining", "combine_recv")
        send, self._send = self._send, None
        rt = self._routing
        assert rt is not None and send is not None and self._peers is not None
        self._state = "broken"
        waits = [self.engine.imm_counter(self._imm(COMBINE, r)).wait(1, peer=self._peers[r])
                 for r in range(self.config.ranks) if r != self.rank and rt.rows[r]]
        await wait_all([send, *waits])
        out = layout.gather_combine(self.config, self._crows, rt.rowidx)
        self._state = "idle"
        return out

    # -- lifetime -------------------------------------------------------------------

    def close(self) -> None:
        """Deregister the buffers (the engine keeps them alive while writes are
        in flight).  Idempotent."""
        if not self._closed:
            self._closed = True
            self._inbox_region.close()
            self._out_region.close()

    async def __aenter__(self) -> ExpertParallel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self.config
        return f"<ExpertParallel rank {self.rank}/{c.ranks} experts {c.num_experts} {c.mode} {self._state}>"
