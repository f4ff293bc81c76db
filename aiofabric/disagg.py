"""Disaggregated prefill/decode: a request's KV cache streamed layer by layer.

Decode allocates blocks and a request slot, sends prefill a REQ message; prefill
writes each layer's pages as soon as that layer is computed (``write_pages``,
one immediate per page, ``imm = kv_imm(slot, gen, layer)``), then a final small
write of the last hidden state (``layer = FINAL``).  Decode counts pages per
layer.  ABORT is confirmed: prefill stops issuing, awaits its writes in flight
for the request, replies ABORTED; only then (or once the engine declares
prefill failed) does decode reuse the blocks.  See docs/kv-streaming.md.

Messages are msgpack maps over ``engine.send``; the ``KVDecoder`` /
``KVPrefill`` objects own their engine's ``recv`` (other messages are handed
to their ``messages`` queue).
"""
from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict, deque
from typing import Any, TypeVar

import msgpack
import numpy as np

from .errors import BrokenResourceError, FabricError, ProtocolError
from .kv import KVLayout
from .memory import Address, RegionDescriptor

__all__ = ["kv_imm", "split_kv_imm", "FINAL", "MAX_SLOTS", "BlockPool", "OutOfBlocks",
           "RequestAborted", "RequestRejected", "KVDecoder", "DecodeRequest", "KVPrefill",
           "PrefillRequest"]

TAG = 0xA          #: bits 31..28 of every KV immediate
MAX_SLOTS = 4096   #: bits 27..16: the request slot
MAX_GEN = 256      #: bits 15..8: the slot's generation (bumped at every reuse)
FINAL = 255        #: bits 7..0: the layer; 255 marks the final hidden-state write


def kv_imm(slot: int, gen: int, layer: int) -> int:
    """The 32-bit immediate of (request slot, generation, layer)."""
    if not (0 <= slot < MAX_SLOTS and 0 <= gen < MAX_GEN and 0 <= layer <= FINAL):
        raise ValueError(f"slot/gen/layer out of range: {slot}/{gen}/{layer}")
    return TAG << 28 | slot << 16 | gen << 8 | layer


def split_kv_imm(imm: int) -> tuple[int, int, int] | None:
    """(slot, gen, layer) of a KV immediate, None for any other immediate."""
    if imm >> 28 != TAG:
        return None
    return imm >> 16 & 0xFFF, imm >> 8 & 0xFF, imm & 0xFF


def _pack(d: dict[str, Any]) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def _unpack(data: bytes) -> dict[str, Any] | None:
    try:
        d = msgpack.unpackb(data, raw=False)
    except Exception:
        return None
    return d if isinstance(d, dict) and isinstance(d.get("t"), str) else None


class OutOfBlocks(FabricError):
    """The block pool (or the slot table) cannot hold the request now."""


class RequestAborted(FabricError):
    """The request was aborted (decode side: by ``abort()``; prefill side: by decode)."""


class RequestRejected(FabricError):
    """Prefill refused the request (e.g. incompatible layout); the message says why."""


class BlockPool:
    """A free list of block ids ``0..num_blocks-1``."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def available(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> np.ndarray:
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks wanted, {len(self._free)} free")
        return np.array([self._free.popleft() for _ in range(n)], np.int64)

    def free(self, blocks: Any) -> None:
        self._free.extend(int(b) for b in blocks)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # mark retrieved: failures surface through the request


_S = TypeVar("_S", bound="_Server")


class _Server:
    """A side that serves its engine's messages in a task: ``async with``, or
    ``start()`` then ``aclose()``."""

    _task: asyncio.Task[None] | None

    async def __aenter__(self: _S) -> _S:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._serve())

    async def _serve(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


# -- decode side ---------------------------------------------------------------


class DecodeRequest:
    """One request as decode sees it.  ``await req.layer(L)`` returns once every
    page of layer L has landed; ``await req.result()`` once every layer and the
    hidden state have (returns the hidden state's bytes).  Both raise
    BrokenResourceError if prefill fails, RequestAborted after ``abort()``,
    RequestRejected if prefill refused."""

    def __init__(self, dec: KVDecoder, rid: int, slot: int, gen: int, blocks: np.ndarray,
                 prefill: Address, tokens: int) -> None:
        self._dec = dec
        self.id, self.slot, self.gen, self.blocks, self.prefill = rid, slot, gen, blocks, prefill
        self.tokens = tokens
        self.pages_per_layer = dec.layout.pages_per_layer(len(blocks))
        self.state = "running"  # running -> done | failed | aborted -> released
        loop = asyncio.get_running_loop()
        self._broken: asyncio.Future[None] = loop.create_future()
        self._broken.add_done_callback(_retrieve)
        self._aborted: asyncio.Future[None] = loop.create_future()
        self._waits: dict[int, asyncio.Task[None]] = {}
        self._final = self._wait(FINAL)
        self._final.add_done_callback(self._on_final)
        self.landed: dict[int, float] = {}  #: layer (FINAL for the hidden state) -> loop time it landed

    def _wait(self, layer: int) -> asyncio.Task[None]:
        t = self._waits.get(layer)
        if t is None:
            n = 1 if layer == FINAL else self.pages_per_layer
            counter = self._dec.engine.imm_counter(kv_imm(self.slot, self.gen, layer))
            t = self._waits[layer] = asyncio.ensure_future(counter.wait(n, peer=self.prefill))
            t.add_done_callback(_retrieve)
            loop = asyncio.get_running_loop()
            t.add_done_callback(lambda f, l=layer: f.cancelled() or f.exception() or
                                self.landed.setdefault(l, loop.time()))
        return t

    def _on_final(self, t: asyncio.Task[None]) -> None:
        # Runs as a done callback, i.e. one loop step after the wait finished:
        # result() may return first, so it calls this too (idempotent).
        if t.cancelled():
            return
        exc = t.exception()
        if exc is None:
            if self.state == "running":
                self.state = "done"
        elif isinstance(exc, BrokenResourceError) and self.state == "running":
            # prefill failed: nothing more can land; the blocks go back now
            self.state = "failed"
            self._fail(exc)
            self._dec._reclaim(self)

    def _fail(self, exc: BaseException) -> None:
        if not self._broken.done():
            self._broken.set_exception(exc)

    async def layer(self, layer: int) -> None:
        """Wait until every page of ``layer`` has landed."""
        self._dec.layout._layer(layer)
        await self._until(self._wait(layer))

    async def result(self) -> bytes:
        """Wait for every layer and the hidden state; return the hidden state."""
        for layer in range(self._dec.layout.layers):
            await self._until(self._wait(layer))
        await self._until(self._final)
        self._on_final(self._final)
        return bytes(self.hidden)

    async def _until(self, t: asyncio.Task[None]) -> None:
        if not t.done() and not self._broken.done():
            await asyncio.wait([t, self._broken], return_when=asyncio.FIRST_COMPLETED)
        if self._broken.done():
            self._broken.result()  # raises
        t.result()

    @property
    def hidden(self) -> memoryview:
        """The hidden-state bytes (valid once the request is done)."""
        hb = self._dec.hidden_bytes
        return memoryview(self._dec._hidden)[self.slot * hb:(self.slot + 1) * hb]

    async def abort(self) -> None:
        """Abort, confirmed: returns once prefill has replied ABORTED (after
        awaiting its writes in flight) or has been declared failed; the blocks
        are then free for reuse.  A finished request is just released."""
        if self.state in ("aborted", "failed", "released"):
            return
        if self.state == "done":
            self.release()
            return
        self.state = "aborting"
        self._fail(RequestAborted(f"request {self.id} aborted"))
        try:
            await self._dec.engine.send(self.prefill, _pack({"t": "abort", "id": self.id}))
            # The final wait names prefill: it fails if prefill is declared failed.
            await asyncio.wait([self._aborted, self._final], return_when=asyncio.FIRST_COMPLETED)
        except BrokenResourceError:
            pass
        self.state = "aborted"
        self._dec._reclaim(self)

    def release(self) -> None:
        """Give the blocks and the slot back after decode is done with them."""
        if self.state == "running" or self.state == "aborting":
            raise RuntimeError("release() of a running request: abort() it")
        if self.state != "released":
            self._dec._reclaim(self)

    def __repr__(self) -> str:
        return f"<DecodeRequest {self.id} slot={self.slot} {self.state} blocks={len(self.blocks)}>"


class KVDecoder(_Server):
    """Decode's side: allocates blocks and slots, sends REQ, tracks requests.
    Owns ``engine.recv()`` while running (other messages go to ``messages``)."""

    def __init__(self, engine: Any, layout: KVLayout, kv_region: Any, *, hidden_bytes: int,
                 max_requests: int = 256) -> None:
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, not {type(layout).__name__}")
        if kv_region.nbytes < layout.nbytes:
            raise ValueError(f"the region has {kv_region.nbytes} bytes, the layout needs {layout.nbytes}")
        if not 1 <= max_requests <= MAX_SLOTS:
            raise ValueError(f"max_requests must lie in [1, {MAX_SLOTS}]")
        self.engine, self.layout, self.hidden_bytes = engine, layout, int(hidden_bytes)
        self._kv_desc = kv_region.descriptor().to_bytes()
        self._hidden = np.zeros(max_requests * self.hidden_bytes, np.uint8)
        self._hidden_region = engine.register(self._hidden)
        self.pool = BlockPool(layout.num_blocks)
        self._slots: deque[int] = deque(range(max_requests))
        self._gen = [0] * max_requests
        self._ids = itertools.count(1)
        self.requests: dict[int, DecodeRequest] = {}
        self.prefills: dict[Address, int] = {}  #: prefill instance -> requests in flight there
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for req in list(self.requests.values()):
            for t in req._waits.values():
                t.cancel()
            req._fail(RequestAborted("decoder closed"))

    def add_prefill(self, addr: Address) -> None:
        if type(addr) is not Address:
            raise TypeError(f"addr must be an Address, not {type(addr).__name__}")
        self.prefills.setdefault(addr, 0)

    def remove_prefill(self, addr: Address) -> None:
        self.prefills.pop(addr, None)

    def pick_prefill(self) -> Address:
        """The least loaded prefill instance not known to have failed."""
        alive = [(n, i, a) for i, (a, n) in enumerate(self.prefills.items()) if not self.engine.peer_failed(a)]
        if not alive:
            raise OutOfBlocks("no live prefill instance")
        return min(alive)[2]

    async def submit(self, tokens: Any, *, prefill: Address | None = None, meta: Any = None) -> DecodeRequest:
        """Allocate blocks and a slot for ``tokens`` (a sequence of ints) and send
        the request to ``prefill`` (default: :meth:`pick_prefill`)."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("empty prompt")
        if prefill is None:
            prefill = self.pick_prefill()
        if not self._slots:
            raise OutOfBlocks("no free request slot")
        blocks = self.pool.alloc(self.layout.blocks_for(len(tokens)))
        slot = self._slots.popleft()
        gen = self._gen[slot]
        for layer in [*range(self.layout.layers), FINAL]:  # stale credit of an aborted request of long ago
            c = self.engine.imm_counter(kv_imm(slot, gen, layer))
            c.try_consume(c.available)
        rid = next(self._ids)
        req = DecodeRequest(self, rid, slot, gen, blocks, prefill, len(tokens))
        self.requests[rid] = req
        self.prefills[prefill] = self.prefills.get(prefill, 0) + 1
        hb = self.hidden_bytes
        msg = {"t": "req", "id": rid, "slot": slot, "gen": gen, "kv": self._kv_desc,
               "hidden": self._hidden_region.descriptor()[slot * hb:(slot + 1) * hb].to_bytes(),
               "layout": self.layout.to_dict(), "blocks": blocks.tolist(), "tokens": tokens, "meta": meta}
        try:
            await self.engine.send(prefill, _pack(msg))
        except BaseException as exc:
            req.state = "failed"
            req._fail(exc if isinstance(exc, Exception) else RequestAborted("cancelled"))
            self._reclaim(req)
            raise
        return req

    def _reclaim(self, req: DecodeRequest) -> None:
        if self.requests.pop(req.id, None) is None:
            return
        for t in req._waits.values():
            t.cancel()
        if req.prefill in self.prefills:
            self.prefills[req.prefill] = max(0, self.prefills[req.prefill] - 1)
        self._gen[req.slot] = (self._gen[req.slot] + 1) % MAX_GEN
        self._slots.append(req.slot)
        self.pool.free(req.blocks)
        if req.state in ("done", "running"):
            req.state = "released"

    async def _serve(self) -> None:
        while True:
            msg = await self.engine.recv()
            d = _unpack(msg.data)
            t = d and d.get("t")
            req = self.requests.get(d.get("id")) if d else None
            if t == "join":
                try:
                    ok = KVLayout.from_dict(d.get("layout")).compatible(self.layout)
                except (TypeError, ValueError):
                    ok = False
                if ok:
                    self.add_prefill(msg.sender)
                else:
                    await self.engine.send(msg.sender, _pack({"t": "refused", "why": "incompatible layout"}))
            elif t == "leave":
                self.remove_prefill(msg.sender)
            elif t == "aborted":
                if req is not None and req.prefill == msg.sender and not req._aborted.done():
                    req._aborted.set_result(None)
            elif t == "error":
                if req is not None and req.prefill == msg.sender and req.state == "running":
                    req.state = "failed"
                    req._fail(RequestRejected(str(d.get("why"))))
                    self._reclaim(req)  # prefill wrote nothing
            else:
                self.messages.put_nowait(msg)


# -- prefill side --------------------------------------------------------------


class PrefillRequest:
    """One request as prefill sees it: ``tokens``, the decoder's ``dst_blocks``,
    ``meta``.  Call :meth:`send_layer` as each layer is computed, then
    :meth:`finish` with the hidden state."""

    def __init__(self, pre: KVPrefill, sender: Address, d: dict[str, Any], layout: KVLayout) -> None:
        self._pre = pre
        self.decoder = sender
        self.id, self.slot, self.gen = int(d["id"]), int(d["slot"]), int(d["gen"])
        kv_imm(self.slot, self.gen, 0)
        self.tokens: list[int] = list(d["tokens"])
        self.dst_blocks = np.asarray(d["blocks"], np.int64)
        self.dst_layout = layout
        self.meta = d.get("meta")
        self._kv = RegionDescriptor.from_bytes(d["kv"])
        self._hidden = RegionDescriptor.from_bytes(d["hidden"])
        if self._kv.owner != sender or self._hidden.owner != sender:
            raise ProtocolError("descriptors of another engine")
        layout.layer_pages(0, self.dst_blocks)  # validates the block ids
        self.aborted = False
        self._futs: list[asyncio.Future[None]] = []
        self.timeline: dict[int, tuple[float, float]] = {}  #: layer -> (posted, completed), loop time

    def send_layer(self, layer: int, src_blocks: Any) -> asyncio.Future[Any]:
        """Post the writes of ``layer`` (``src_blocks`` in prefill's cache to the
        decoder's blocks).  Raises RequestAborted once decode aborted."""
        if self.aborted:
            raise RequestAborted(f"request {self.id} was aborted by decode")
        pre = self._pre
        src = pre.layout.layer_pages(layer, src_blocks)
        dst = self.dst_layout.layer_pages(layer, self.dst_blocks)
        if len(src[0].indices) != len(dst[0].indices):
            raise ValueError(f"{len(src[0].indices)} source blocks for {len(dst[0].indices)} destination blocks")
        imm = kv_imm(self.slot, self.gen, layer)
        futs = [pre.engine.write_pages(pre.kv_region[s.offset:], self._kv[d.offset:], s.page_size, s.indices,
                                       d.indices, src_stride=s.stride, dst_stride=d.stride, imm=imm)
                for s, d in zip(src, dst)]
        self._futs.extend(futs)
        loop = asyncio.get_running_loop()
        posted = loop.time()
        g = asyncio.gather(*futs)
        g.add_done_callback(lambda f: f.cancelled() or f.exception() or
                            self.timeline.__setitem__(layer, (posted, loop.time())))
        g.add_done_callback(_retrieve)
        return g

    async def finish(self, hidden: Any) -> None:
        """Await every write of the request, then write the hidden state (the
        decoder's last immediate).  Raises RequestAborted if decode aborted,
        BrokenResourceError if decode failed."""
        pre = self._pre
        try:
            await asyncio.gather(*self._futs)
            if self.aborted:
                raise RequestAborted(f"request {self.id} was aborted by decode")
            data = np.frombuffer(memoryview(hidden).cast("B"), np.uint8)
            if data.size != self._hidden.nbytes:
                raise ValueError(f"hidden state of {data.size} bytes, the decoder expects {self._hidden.nbytes}")
            row = pre._scratch_rows.popleft() if pre._scratch_rows else None
            if row is None:
                raise OutOfBlocks("no free hidden-state staging row")
            try:
                hb = pre.hidden_bytes
                pre._scratch[row * hb:row * hb + data.size] = data
                fut = pre.engine.write(pre._scratch_region[row * hb:row * hb + data.size], self._hidden,
                                       imm=kv_imm(self.slot, self.gen, FINAL))
                self._futs.append(fut)
                await fut
            finally:
                pre._scratch_rows.append(row)
        finally:
            pre._active.pop((self.decoder, self.id), None)

    async def _abort(self) -> None:
        self.aborted = True
        await asyncio.gather(*self._futs, return_exceptions=True)  # every write issued has completed
        self._pre._active.pop((self.decoder, self.id), None)
        try:
            await self._pre.engine.send(self.decoder, _pack({"t": "aborted", "id": self.id}))
        except BrokenResourceError:
            pass


class KVPrefill(_Server):
    """Prefill's side: receives REQ/ABORT, hands requests out through
    :meth:`next_request`.  Owns ``engine.recv()`` while running."""

    def __init__(self, engine: Any, layout: KVLayout, kv_region: Any, *, hidden_bytes: int,
                 max_inflight: int = 64) -> None:
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, not {type(layout).__name__}")
        if kv_region.nbytes < layout.nbytes:
            raise ValueError(f"the region has {kv_region.nbytes} bytes, the layout needs {layout.nbytes}")
        self.engine, self.layout, self.kv_region = engine, layout, kv_region
        self.hidden_bytes = int(hidden_bytes)
        self._scratch = np.zeros(max_inflight * self.hidden_bytes, np.uint8)
        self._scratch_region = engine.register(self._scratch, remote_write=False)
        self._scratch_rows: deque[int] = deque(range(max_inflight))
        self.pool = BlockPool(layout.num_blocks)
        self._queue: asyncio.Queue[PrefillRequest] = asyncio.Queue()
        self._active: dict[tuple[Address, int], PrefillRequest] = {}
        self._tombstones: OrderedDict[tuple[Address, int], None] = OrderedDict()
        self.messages: asyncio.Queue[Any] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._aborts: set[asyncio.Task[None]] = set()

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, *self._aborts, return_exceptions=True)

    async def join(self, decoder: Address) -> None:
        """Register with a decode instance (it may then send requests here)."""
        await self.engine.send(decoder, _pack({"t": "join", "layout": self.layout.to_dict()}))

    async def leave(self, decoder: Address) -> None:
        await self.engine.send(decoder, _pack({"t": "leave"}))

    async def next_request(self) -> PrefillRequest:
        while True:
            req = await self._queue.get()
            if not req.aborted:
                return req

    async def _serve(self) -> None:
        while True:
            msg = await self.engine.recv()
            d = _unpack(msg.data)
            t = d and d.get("t")
            if t == "req":
                key = (msg.sender, d.get("id"))
                if key in self._tombstones:
                    continue  # aborted before it arrived (messages are unordered)
                try:
                    layout = KVLayout.from_dict(d.get("layout"))
                    if not layout.compatible(self.layout):
                        raise ValueError(f"incompatible layouts: decode {layout}, prefill {self.layout}")
                    req = PrefillRequest(self, msg.sender, d, layout)
                except (KeyError, TypeError, ValueError) as exc:
                    await self._reply(msg.sender, {"t": "error", "id": d.get("id"), "why": str(exc)})
                    continue
                self._active[key] = req
                self._queue.put_nowait(req)
            elif t == "abort":
                key = (msg.sender, d.get("id"))
                self._tombstones[key] = None
                while len(self._tombstones) > 65536:
                    self._tombstones.popitem(last=False)
                req = self._active.get(key)
                if req is None:
                    await self._reply(msg.sender, {"t": "aborted", "id": d.get("id")})
                else:
                    task = asyncio.ensure_future(req._abort())
                    self._aborts.add(task)
                    task.add_done_callback(self._aborts.discard)
            else:
                self.messages.put_nowait(msg)

    async def _reply(self, to: Address, d: dict[str, Any]) -> None:
        try:
            await self.engine.send(to, _pack(d))
        except BrokenResourceError:
            pass
