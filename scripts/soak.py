#!/usr/bin/env python
"""Soak: mixed traffic among N+1 processes while peers are SIGKILLed and replaced.

    python scripts/soak.py --minutes M --provider P --peers N [--seed S]
                           [--kill-every SECONDS] [--json out.json]

The process you run is the coordinator: it owns an engine (node 0) and spawns
N peer processes (multiprocessing, spawn), each with its own engine.  The
control plane is one pipe per peer: the coordinator hands every node the
addresses of all others, tells survivors about replacements, and collects
events (findings, failure detections, statistics).  The data plane is
aiofabric only.  See docs/soak.md for the protocol and the invariants.

Exit status: 0 when the run is clean, 1 when there are findings, 2 for usage
errors.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import glob
import json
import math
import multiprocessing as mp
import os
import random
import re
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
    os.environ[_k] = "lo"  # every process: traffic stays on loopback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack
import numpy as np

import aiofabric as af
from aiofabric import liveness

CTX = mp.get_context("spawn")

# Transfer kinds.  A sender runs one stop-and-wait stream per (peer, kind):
# the next transfer of a stream starts only after the previous one is acked,
# so a receiver always knows exactly what to expect.
WRITE, PAGES, SCATTER, NOTIFY, BARRIER, MSG = 1, 2, 3, 4, 5, 6
KIND = {WRITE: "write", PAGES: "write_pages", SCATTER: "scatter", NOTIFY: "notify", BARRIER: "barrier",
        MSG: "send"}

KiB, MiB = 1 << 10, 1 << 20
MAX_WRITE = 4 * MiB
# Every node registers, for every peer, one inbox "lane" that only that peer
# writes into, split into one area per data kind; and it writes from an
# equally shaped source slot of its own.
W_AREA, P_AREA, S_AREA = MAX_WRITE + 64 * KiB, 1 * MiB, 256 * KiB
W0, P0, S0 = 0, W_AREA, W_AREA + P_AREA
LANE = W_AREA + P_AREA + S_AREA
PAGE_SIZES = (64, 256, 1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB)


def imm_of(nid: int, kind: int) -> int:
    """The immediate of one (sender, stream): unique per process incarnation,
    so counts never mix senders, kinds or a dead peer with its replacement."""
    return nid * 8 + kind


def payload(seed: int, sender: int, receiver: int, kind: int, seq: int, n: int) -> np.ndarray:
    """The exact bytes of transfer ``seq`` of stream (sender, receiver, kind)."""
    return np.frombuffer(np.random.default_rng([seed, sender, receiver, kind, seq]).bytes(n), np.uint8)


def log_size(rng: random.Random, lo: int, hi: int) -> int:
    return max(lo, min(hi, int(2 ** rng.uniform(math.log2(lo), math.log2(hi + 1)))))


class Hang(Exception):
    """An await that did not finish within the bound: always a finding."""


async def bounded(aw: Any, seconds: float, what: str) -> Any:
    try:
        async with asyncio.timeout(seconds):
            return await aw
    except TimeoutError:
        raise Hang(f"{what}: not done after {seconds:g} s") from None


def track(fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
    """Mark the future's exception as retrieved even if no task awaits it any
    more (its task was cancelled when the peer failed)."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut


@dataclasses.dataclass
class Opts:
    provider: str
    seed: int
    op_timeout: float = 30.0
    peer_timeout: float = 3.0
    pace: float = 0.0


class Conn:
    """This node's view of one peer incarnation."""

    def __init__(self, nid: int, addr: af.Address) -> None:
        self.nid = nid
        self.addr = addr
        self.inbox = np.zeros(LANE, np.uint8)   # the peer writes here (our lane for it)
        self.inbox_region: af.MemoryRegion | None = None
        self.src: tuple[np.ndarray, af.MemoryRegion] | None = None  # we write from here
        self.remote: af.RegionDescriptor | None = None  # its lane for us (from its HELLO)
        self.hello = asyncio.Event()
        self.acks: dict[tuple[int, int], asyncio.Future[bool]] = {}
        self.seq_out: collections.Counter[int] = collections.Counter()
        self.seq_in: collections.Counter[int] = collections.Counter()
        self.busy_in: set[int] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.handlers: set[asyncio.Task[Any]] = set()
        self.reader: asyncio.Task[Any] | None = None
        self.dead: BaseException | None = None


class Node:
    """One engine and its traffic: the coordinator runs one, every peer process one."""

    def __init__(self, nid: int, opts: Opts, report: Callable[[tuple], None]) -> None:
        self.nid = nid
        self.o = opts
        self.report = report
        self.rng = random.Random(f"{opts.seed}/{nid}")
        self.conns: dict[int, Conn] = {}
        self.src_pool: list[tuple[np.ndarray, af.MemoryRegion]] = []
        self.stopping = False
        self.closing = False
        self.node_tasks: set[asyncio.Task[Any]] = set()
        self.completed: collections.Counter[str] = collections.Counter()
        self.verified: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.bytes_verified = 0
        self.msgs_sent = 0
        self.msgs_received = 0
        self.findings = 0
        self.detections = 0
        self.slowest: dict[str, float] = {}  # kind -> longest post-to-ack time of a completed transfer (s)

    # -- bookkeeping ------------------------------------------------------

    def finding(self, text: str) -> None:
        self.findings += 1
        self.report(("finding", self.nid, text))

    def snapshot(self) -> dict[str, Any]:
        return {"completed": dict(self.completed), "verified": dict(self.verified),
                "bytes_verified": self.bytes_verified, "msgs_sent": self.msgs_sent,
                "msgs_received": self.msgs_received, "errors": dict(self.errors), "findings": self.findings,
                "detections": self.detections, "slowest": self.slowest,
                "conns": {str(c.nid): self._conn_state(c) for c in self.conns.values()}}

    @staticmethod
    def _conn_state(c: Conn) -> str:
        r = c.reader
        if r is None:
            return "no reader"
        return "reader running" if not r.done() else "reader ended"


    def engine_state(self) -> str:
        st = self.eng.statistics()
        return (f"engine: queued {st.queued}, ops_in_flight {st.ops_in_flight}, pending {st.pending_futures}, "
                f"eagain {st.eagain}, errors {st.errors}, failed_peers {st.failed_peers}")

    def _loop_error(self, loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        exc = ctx.get("exception")
        self.finding(f"event loop error: {ctx.get('message')} {exc!r}")

    def spawn(self, coro: Any, conn: Conn | None, what: str, group: set | None = None) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(self._guard(coro, conn, what))
        task.add_done_callback(lambda _t: coro.close())  # cancelled before it started: no warning
        group = conn.tasks if group is None and conn is not None else group
        if group is None:
            group = self.node_tasks
        group.add(task)
        task.add_done_callback(group.discard)
        return task

    async def _guard(self, coro: Any, conn: Conn | None, what: str) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            return  # we cancel a peer's tasks when it fails, and the rest at shutdown
        except af.BrokenResourceError as exc:
            self.errors["BrokenResourceError"] += 1
            self.on_broken(exc, [conn] if conn is not None else list(self.conns.values()), what)
        except af.ClosedResourceError as exc:
            self.errors["ClosedResourceError"] += 1
            if not self.closing:
                self.finding(f"{what}: ClosedResourceError before shutdown: {exc}")
        except Hang as exc:
            self.errors["Hang"] += 1
            self.finding(f"hang: {exc} [{self.engine_state()}]")
        except Exception as exc:  # noqa: BLE001 - anything else is a finding
            self.errors[type(exc).__name__] += 1
            self.finding(f"{what}: unexpected {type(exc).__name__}: {exc}\n{traceback.format_exc()}")

    def on_broken(self, exc: BaseException, candidates: list[Conn], what: str) -> None:
        """A BrokenResourceError: fail the peer(s) the engine declared failed."""
        hit = [c for c in candidates if c is not None and self.eng.peer_failed(c.addr) is not None]
        if not hit:
            self.finding(f"{what}: BrokenResourceError naming no failed peer: {exc}")
        for c in hit:
            self.fail_conn(c, self.eng.peer_failed(c.addr), what)

    def fail_conn(self, c: Conn, exc: BaseException, what: str) -> None:
        if c.dead is not None:
            return
        t = time.monotonic()
        c.dead = exc
        self.detections += 1
        self.report(("broken", self.nid, c.nid, t, what, str(exc)[:300]))
        me = asyncio.current_task()
        for task in list(c.tasks) + list(c.handlers) + [c.reader]:
            if task is not None and task is not me:
                task.cancel()
        for fut in c.acks.values():
            if not fut.done():
                fut.set_exception(exc)
        c.acks.clear()
        if c.inbox_region is not None:
            c.inbox_region.close()  # revoke: nothing from the dead incarnation may land later
        if c.src is not None:
            self.src_pool.append(c.src)  # its writes in flight go to a dead peer: reuse is harmless
            c.src = None
        if self.conns.get(c.nid) is c:
            del self.conns[c.nid]

    # -- lifetime ---------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self.eng = await af.open_engine(self.o.provider, peer_timeout=self.o.peer_timeout)
        self.max_msg = self.eng.max_message_size - 256
        self.spawn(self._scatter_stream(), None, "scatter stream")
        self.spawn(self._barrier_stream(), None, "barrier stream")

    def add_peer(self, nid: int, addr_bytes: bytes) -> None:
        if nid == self.nid or nid in self.conns:
            return
        c = Conn(nid, af.Address.from_bytes(addr_bytes))
        c.inbox_region = self.eng.register(c.inbox)
        if self.src_pool:
            c.src = self.src_pool.pop()
        else:
            arr = np.zeros(LANE, np.uint8)
            c.src = (arr, self.eng.register(arr, remote_write=False))
        self.conns[nid] = c
        c.reader = self.spawn(self._reader(c), c, f"reader of node {nid}", group=c.handlers)
        self.spawn(self._hello(c), c, f"hello to node {nid}")
        for kind in (WRITE, PAGES, NOTIFY, MSG):
            self.spawn(self._stream(c, kind), c, f"{KIND[kind]} stream to node {nid}")

    async def quiesce(self) -> None:
        """Start no new transfer; finish (and get acked) the ones in flight."""
        self.stopping = True
        tasks = set(self.node_tasks)
        for c in self.conns.values():
            tasks |= c.tasks
        if tasks:
            await asyncio.wait(tasks, timeout=3 * self.o.op_timeout)
        left = [t for t in tasks if not t.done()]
        if left:
            self.finding(f"quiesce: {len(left)} sender tasks still running after {3 * self.o.op_timeout:g} s")

    async def unwatch(self) -> None:
        """Every node is quiet: finish receive handlers, stop the readers."""
        handlers = {t for c in self.conns.values() for t in c.handlers if t is not c.reader}
        if handlers:
            await asyncio.wait(handlers, timeout=self.o.op_timeout)
        readers = [c.reader for c in self.conns.values() if c.reader is not None]
        for c in self.conns.values():
            for t in c.handlers:
                t.cancel()
        if readers:
            await asyncio.wait(readers, timeout=self.o.op_timeout)
        deadline = time.monotonic() + 10
        while self.eng.statistics().pending_futures and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        st = self.eng.statistics()
        if st.pending_futures:
            self.finding(f"{st.pending_futures} operations still pending after every node went quiet")

    async def close(self) -> dict[str, Any]:
        self.closing = True
        for t in list(self.node_tasks):
            t.cancel()
        st = self.eng.statistics()
        await bounded(self.eng.aclose(), self.o.op_timeout, "engine aclose()")
        return {"regions": st.regions, "pending_futures": st.pending_futures, "ops_in_flight": st.ops_in_flight,
                "failed_peers": st.failed_peers, "messages_waiting": st.messages_waiting, "errors": st.errors,
                "writes_posted": st.writes_posted, "bytes_posted": st.bytes_posted,
                "imms_received": st.imms_received, "msgs_received": st.msgs_received}

    # -- messages ---------------------------------------------------------

    def _send(self, c: Conn, obj: dict[str, Any]) -> asyncio.Future[None]:
        fut = track(self.eng.send(c.addr, msgpack.packb(obj, use_bin_type=True)))
        self.msgs_sent += 1
        return fut

    def _expect_ack(self, c: Conn, kind: int, seq: int) -> asyncio.Future[bool]:
        fut = track(asyncio.get_running_loop().create_future())
        c.acks[(kind, seq)] = fut
        return fut

    async def _hello(self, c: Conn) -> None:
        desc = c.inbox_region.descriptor()
        await bounded(self._send(c, {"t": "H", "d": desc.to_bytes()}), self.o.op_timeout, f"HELLO to {c.nid}")

    async def _reader(self, c: Conn) -> None:
        """Every message from peer ``c``: its HELLO, its intents, its acks."""
        quiet_reported = False
        while True:
            try:
                async with asyncio.timeout(self.o.op_timeout):
                    m = await self.eng.recv(peer=c.addr)
            except TimeoutError:
                if not self.stopping and not quiet_reported:
                    # A finding, but keep reading: this wait also watches the peer.
                    quiet_reported = True
                    self.errors["Hang"] += 1
                    self.finding(f"hang: recv(peer=node {c.nid}): no message for {self.o.op_timeout:g} s "
                                 f"[{self.engine_state()}]")
                continue
            self.msgs_received += 1
            if m.sender != c.addr:
                self.finding(f"recv(peer=node {c.nid}) returned a message from {m.sender!r}")
                continue
            d = msgpack.unpackb(m.data, raw=False)
            t = d["t"]
            if t == "H":
                remote = af.RegionDescriptor.from_bytes(d["d"])
                if remote.owner != c.addr or remote.nbytes != LANE:
                    self.finding(f"bad HELLO from node {c.nid}: {remote!r}")
                c.remote = remote
                c.hello.set()
            elif t == "A":
                fut = c.acks.pop((d["k"], d["s"]), None)
                if fut is None:
                    self.finding(f"unexpected ack {KIND[d['k']]} #{d['s']} from node {c.nid}")
                elif not fut.done():
                    fut.set_result(bool(d["ok"]))
            elif t == "I":
                k, s = d["k"], d["s"]
                if s != c.seq_in[k] + 1:
                    self.finding(f"{KIND[k]} intent #{s} from node {c.nid} after #{c.seq_in[k]}")
                if k in c.busy_in:
                    self.finding(f"{KIND[k]} intent #{s} from node {c.nid} while one is still open")
                c.seq_in[k] = s
                c.busy_in.add(k)
                self.spawn(self._receive(c, d), c, f"receive {KIND[k]} #{s} from node {c.nid}", group=c.handlers)
            else:
                self.finding(f"unknown message type {t!r} from node {c.nid}")

    # -- receiving --------------------------------------------------------

    async def _receive(self, c: Conn, d: dict[str, Any]) -> None:
        k, s = d["k"], d["s"]
        what = f"{KIND[k]} #{s} from node {c.nid}"
        if k != MSG:
            counter = self.eng.imm_counter(imm_of(c.nid, k))
            await bounded(counter.wait(d["c"], peer=c.addr), self.o.op_timeout,
                          f"{what}: waiting for {d['c']} immediates")
            if counter.available:
                self.finding(f"{what}: {counter.available} immediates more than announced")
        ok, nbytes, detail = self._verify(c, k, s, d)
        if ok:
            self.verified[KIND[k]] += 1
            self.bytes_verified += nbytes
        else:
            self.finding(f"wrong bytes: {what}: {detail}")
        c.busy_in.discard(k)  # before the ack: the next intent may follow it at once
        await bounded(self._send(c, {"t": "A", "k": k, "s": s, "ok": ok}), self.o.op_timeout, f"ack of {what}")

    def _verify(self, c: Conn, k: int, s: int, d: dict[str, Any]) -> tuple[bool, int, str]:
        seed, me = self.o.seed, self.nid
        if k in (NOTIFY, BARRIER):
            return True, 0, ""
        if k == MSG:
            want = payload(seed, c.nid, me, MSG, s, d["n"]).tobytes()
            if d["p"] == want:
                return True, len(want), ""
            return False, 0, f"message of {len(d['p'])} bytes, expected {d['n']}, equal={d['p'] == want}"
        if k in (WRITE, SCATTER):
            base, size = (W0, W_AREA) if k == WRITE else (S0, S_AREA)
            area = c.inbox[base:base + size]
            off, n = d["o"], d["n"]
            want = payload(seed, c.nid, me, k, s, n)
            got = area[off:off + n]
            ok = bool(np.array_equal(got, want))
            stray = int(np.count_nonzero(area)) - int(np.count_nonzero(got))
            detail = ""
            if not ok or stray:
                bad = np.flatnonzero(got != want)
                detail = (f"{n} bytes at {off}: {bad.size} differ (first at {int(bad[0]) if bad.size else -1}), "
                          f"{stray} nonzero bytes outside the write")
                area[:] = 0
            else:
                got[:] = 0
            return ok and not stray, n, detail
        # PAGES
        area = c.inbox[P0:P0 + P_AREA]
        ps, ss, ds, sp, dp = d["ps"], d["ss"], d["ds"], d["sp"], d["dp"]
        image = payload(seed, c.nid, me, PAGES, s, max(sp) * ss + ps)
        bad, nz = [], 0
        for j, (a, b) in enumerate(zip(sp, dp)):
            want = image[a * ss:a * ss + ps]
            nz += int(np.count_nonzero(want))
            if not np.array_equal(area[b * ds:b * ds + ps], want):
                bad.append(j)
        stray = int(np.count_nonzero(area)) - nz
        ok = not bad and stray == 0
        detail = "" if ok else (f"{len(sp)} pages of {ps} (strides {ss}/{ds}): pages {bad[:8]} differ, "
                                f"{stray} nonzero bytes outside the pages")
        if ok:
            for b in dp:
                area[b * ds:b * ds + ps] = 0
        else:
            area[:] = 0
        return ok, ps * len(sp), detail

    # -- sending ----------------------------------------------------------

    async def _stream(self, c: Conn, kind: int) -> None:
        while not c.hello.is_set():
            if self.stopping:
                return
            try:
                async with asyncio.timeout(0.25):
                    await c.hello.wait()
            except TimeoutError:
                pass
        tx = {WRITE: self._tx_write, PAGES: self._tx_pages, NOTIFY: self._tx_notify, MSG: self._tx_msg}[kind]
        while not self.stopping and c.dead is None:
            await tx(c)
            await asyncio.sleep(self.rng.uniform(0, self.o.pace) if self.o.pace else 0)

    def _done(self, kind: int, t0: float) -> None:
        name = KIND[kind]
        self.completed[name] += 1
        dt = time.monotonic() - t0
        if dt > self.slowest.get(name, 0.0):
            self.slowest[name] = round(dt, 4)

    async def _finish(self, c: Conn, kind: int, seq: int, futs: list[asyncio.Future[Any]],
                      ack: asyncio.Future[bool], t0: float) -> bool:
        what = f"{KIND[kind]} #{seq} to node {c.nid}"
        for f in futs:
            await bounded(f, self.o.op_timeout, f"{what}: local completion")
        ok = await bounded(ack, self.o.op_timeout, f"{what}: ack")
        if ok:
            self._done(kind, t0)
        return ok

    async def _tx_write(self, c: Conn) -> None:
        t0 = time.monotonic()
        n = log_size(self.rng, 1, MAX_WRITE)
        so, do = self.rng.randrange(W_AREA - n + 1), self.rng.randrange(W_AREA - n + 1)
        s = c.seq_out[WRITE] + 1
        arr, region = c.src
        arr[W0 + so:W0 + so + n] = payload(self.o.seed, self.nid, c.nid, WRITE, s, n)
        wf = track(self.eng.write(region[W0 + so:W0 + so + n], c.remote[W0 + do:W0 + do + n],
                                  imm=imm_of(self.nid, WRITE)))
        c.seq_out[WRITE] = s
        ack = self._expect_ack(c, WRITE, s)
        mf = self._send(c, {"t": "I", "k": WRITE, "s": s, "c": 1, "o": do, "n": n})
        await self._finish(c, WRITE, s, [wf, mf], ack, t0)

    async def _tx_pages(self, c: Conn) -> None:
        t0 = time.monotonic()
        rng = self.rng
        ps = rng.choice(PAGE_SIZES)
        ss = ps + rng.choice((0, 0, ps, rng.randrange(1, ps + 1)))
        ds = ps + rng.choice((0, 0, ps, rng.randrange(1, ps + 1)))
        src_slots, dst_slots = (P_AREA - ps) // ss + 1, (P_AREA - ps) // ds + 1
        npages = rng.randint(1, min(64, dst_slots))
        sp = [rng.randrange(src_slots) for _ in range(npages)]  # sources may repeat
        dp = rng.sample(range(dst_slots), npages)               # targets may not
        s = c.seq_out[PAGES] + 1
        arr, region = c.src
        extent = max(sp) * ss + ps
        arr[P0:P0 + extent] = payload(self.o.seed, self.nid, c.nid, PAGES, s, extent)
        wf = track(self.eng.write_pages(region[P0:P0 + P_AREA], c.remote[P0:P0 + P_AREA], ps, sp, dp,
                                        src_stride=ss, dst_stride=ds, imm=imm_of(self.nid, PAGES)))
        c.seq_out[PAGES] = s
        ack = self._expect_ack(c, PAGES, s)
        mf = self._send(c, {"t": "I", "k": PAGES, "s": s, "c": npages, "ps": ps, "ss": ss, "ds": ds,
                            "sp": sp, "dp": dp})
        await self._finish(c, PAGES, s, [wf, mf], ack, t0)

    async def _tx_notify(self, c: Conn) -> None:
        t0 = time.monotonic()
        count = self.rng.randint(1, 3)
        s = c.seq_out[NOTIFY] + 1
        futs = [track(self.eng.notify(c.addr, imm_of(self.nid, NOTIFY))) for _ in range(count)]
        c.seq_out[NOTIFY] = s
        ack = self._expect_ack(c, NOTIFY, s)
        futs.append(self._send(c, {"t": "I", "k": NOTIFY, "s": s, "c": count}))
        await self._finish(c, NOTIFY, s, futs, ack, t0)

    async def _tx_msg(self, c: Conn) -> None:
        t0 = time.monotonic()
        n = log_size(self.rng, 1, self.max_msg)
        s = c.seq_out[MSG] + 1
        data = payload(self.o.seed, self.nid, c.nid, MSG, s, n).tobytes()
        mf = self._send(c, {"t": "I", "k": MSG, "s": s, "n": n, "p": data})
        c.seq_out[MSG] = s
        ack = self._expect_ack(c, MSG, s)
        await self._finish(c, MSG, s, [mf], ack, t0)

    def _ready_conns(self) -> list[Conn]:
        return [c for c in self.conns.values() if c.dead is None and c.remote is not None]

    async def _multi(self, kind: int) -> None:
        """One scatter or barrier to a random subset of the peers."""
        live = self._ready_conns()
        if not live:
            await asyncio.sleep(0.05)
            return
        targets = self.rng.sample(live, self.rng.randint(1, len(live)))
        imm = imm_of(self.nid, kind)
        t0 = time.monotonic()
        plan: list[tuple[Conn, dict[str, Any]]] = []
        try:
            if kind == SCATTER:
                n = log_size(self.rng, 1, S_AREA)
                pairs = []
                for c in targets:
                    s = c.seq_out[kind] + 1
                    so, do = self.rng.randrange(S_AREA - n + 1), self.rng.randrange(S_AREA - n + 1)
                    arr, region = c.src
                    arr[S0 + so:S0 + so + n] = payload(self.o.seed, self.nid, c.nid, kind, s, n)
                    pairs.append((region[S0 + so:S0 + so + n], c.remote[S0 + do:S0 + do + n]))
                    plan.append((c, {"t": "I", "k": kind, "s": s, "c": 1, "o": do, "n": n}))
                op = track(self.eng.scatter(pairs, imm=imm))
            else:
                peers = []
                for c in targets:
                    count = self.rng.randint(1, 2)
                    peers += [c.addr] * count
                    plan.append((c, {"t": "I", "k": kind, "s": c.seq_out[kind] + 1, "c": count}))
                self.rng.shuffle(peers)
                op = track(self.eng.barrier(peers, imm))
        except af.BrokenResourceError as exc:  # one target already failed: nothing was posted
            self.errors["BrokenResourceError"] += 1
            self.on_broken(exc, targets, f"{KIND[kind]} post")
            return
        waits: list[tuple[Conn | None, asyncio.Future[Any]]] = [(None, op)]
        acks: list[tuple[Conn, int, asyncio.Future[bool]]] = []
        for c, intent in plan:
            c.seq_out[kind] = intent["s"]
            if c.dead is not None:
                continue
            try:
                waits.append((c, self._send(c, intent)))
            except af.BrokenResourceError as exc:
                self.errors["BrokenResourceError"] += 1
                self.on_broken(exc, [c], f"{KIND[kind]} intent")
                continue
            acks.append((c, intent["s"], self._expect_ack(c, kind, intent["s"])))
        what = f"{KIND[kind]} to nodes {[c.nid for c in targets]}"
        for c, f in waits:
            try:
                await bounded(f, self.o.op_timeout, f"{what}: local completion")
            except af.BrokenResourceError as exc:
                self.errors["BrokenResourceError"] += 1
                self.on_broken(exc, targets if c is None else [c], what)
        for c, s, f in acks:
            try:
                if await bounded(f, self.o.op_timeout, f"{what}: ack of #{s} from node {c.nid}"):
                    self._done(kind, t0)
            except af.BrokenResourceError as exc:
                self.errors["BrokenResourceError"] += 1
                self.on_broken(exc, [c], what)

    async def _scatter_stream(self) -> None:
        while not self.stopping:
            await self._multi(SCATTER)
            await asyncio.sleep(self.rng.uniform(0, self.o.pace) if self.o.pace else 0)

    async def _barrier_stream(self) -> None:
        while not self.stopping:
            await self._multi(BARRIER)
            await asyncio.sleep(self.rng.uniform(0, self.o.pace) if self.o.pace else 0)


# ---------------------------------------------------------------- peer process


def peer_main(nid: int, opts: dict[str, Any], conn: Any) -> None:
    try:
        rc = asyncio.run(_peer(nid, Opts(**opts), conn))
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        rc = 3
    try:
        conn.close()
    except OSError:
        pass
    sys.exit(rc)


async def _peer(nid: int, opts: Opts, conn: Any) -> int:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple] = asyncio.Queue()

    def report(msg: tuple) -> None:
        try:
            conn.send(msg)
        except OSError:
            pass

    def on_pipe() -> None:
        while True:
            try:
                if not conn.poll():
                    return
                inbox.put_nowait(conn.recv())
            except (EOFError, OSError):
                loop.remove_reader(conn.fileno())
                inbox.put_nowait(("eof",))
                return

    node = Node(nid, opts, report)
    await node.open()
    loop.add_reader(conn.fileno(), on_pipe)
    report(("ready", nid, node.eng.address.to_bytes()))

    async def ticker() -> None:
        while True:
            await asyncio.sleep(1.0)
            report(("stats", nid, node.snapshot()))

    tick = asyncio.ensure_future(ticker())
    try:
        while True:
            cmd = await inbox.get()  # the coordinator paces the run (EOF if it goes away)
            if cmd[0] == "peers":
                for peer, addr in cmd[1]:
                    node.add_peer(peer, addr)
            elif cmd[0] == "quiesce":
                await node.quiesce()
                report(("quiet", nid))
            elif cmd[0] == "unwatch":
                await node.unwatch()
                report(("unwatched", nid, node.snapshot()))
            elif cmd[0] in ("close", "eof"):
                if cmd[0] == "eof":
                    node.finding("the coordinator went away")
                tick.cancel()
                try:
                    eng = await node.close()
                except Hang as exc:
                    node.finding(f"hang: {exc}")
                    eng = {}
                report(("closed", nid, node.snapshot(), eng))
                loop.remove_reader(conn.fileno())
                return 0 if node.findings == 0 else 1
    finally:
        tick.cancel()


# ---------------------------------------------------------------- coordinator


@dataclasses.dataclass
class Peer:
    nid: int
    proc: Any
    conn: Any
    ready: asyncio.Future[bytes]
    addr: bytes = b""
    killed: bool = False        # by us (SIGKILL) or found dead
    leaving: bool = False       # told to close at the end
    eof: bool = False
    phase: dict[str, asyncio.Future[Any]] = dataclasses.field(default_factory=dict)


class Coordinator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.opts = Opts(args.provider, args.seed, args.op_timeout, args.peer_timeout, args.pace)
        self.rng = random.Random(args.seed)
        self.peers: dict[int, Peer] = {}   # live peer processes
        self.next_nid = 1
        self.findings: list[str] = []
        self.stats: dict[int, dict[str, Any]] = {}
        self.engine_stats: dict[int, dict[str, Any]] = {}
        self.kills: dict[int, dict[str, Any]] = {}   # nid -> {t, knows, unexpected}
        self.knows: dict[int, set[int]] = collections.defaultdict(set)  # nid -> nodes told its address
        self.reports: dict[tuple[int, int], tuple[float, str, str]] = {}  # (observer, dead) -> first report
        self.false_reports: list[tuple] = []
        self.killed_at_end: set[int] = set()
        self.restarts = 0
        self.spawn_failures = 0
        self.unexpected = 0
        self.shutting_down = False
        self.t0 = 0.0
        self.false_alarms: set[tuple[int, int]] = set()
        self.recycled: dict[int, str] = {}
        self.background: set[asyncio.Task[Any]] = set()
        self.lock = asyncio.Lock()  # one kill or recycle at a time

    def finding(self, nid: int, text: str) -> None:
        line = f"[node {nid}] {text}"
        self.findings.append(line)
        at = time.monotonic() - self.t0 if self.t0 else 0.0
        if len(self.findings) <= 200:
            print(f"FINDING at {at:.1f} s: {line}", file=sys.stderr, flush=True)
        elif len(self.findings) == 201:
            print("FINDING ... (more findings are only counted; see the summary)", file=sys.stderr, flush=True)

    def on_event(self, msg: tuple, peer: Peer | None = None) -> None:
        kind = msg[0]
        if kind == "ready" and peer is not None:
            peer.addr = msg[2]
            if not peer.ready.done():
                peer.ready.set_result(msg[2])
        elif kind == "stats":
            self.stats[msg[1]] = msg[2]
        elif kind == "finding":
            self.finding(msg[1], msg[2])
            if msg[2].startswith("hang:"):
                self._recycle(msg[1], "its own operations hung")
        elif kind == "broken":
            _, observer, dead, t, what, err = msg
            key = (observer, dead)
            if key in self.reports:
                return
            self.reports[key] = (t, what, err)
            q = self.peers.get(dead)
            if dead not in self.kills and (dead == 0 or (q is not None and q.proc.is_alive())):
                # A live node declared failed: a false alarm (judged now, so
                # that the run can recycle the node and go on).
                self.false_alarms.add(key)
                self.finding(observer, f"declared node {dead} failed, but it is alive: {what}: {err}")
                if dead != 0:
                    self._recycle(dead, f"node {observer} declared it failed")
                else:
                    self._recycle(observer, "it declared node 0 failed")
        elif kind in ("quiet", "unwatched", "closed") and peer is not None:
            if kind != "quiet":
                self.stats[msg[1]] = msg[2]
            if kind == "closed":
                self.engine_stats[msg[1]] = msg[3]
            fut = peer.phase.get(kind)
            if fut is not None and not fut.done():
                fut.set_result(True)

    def _on_pipe(self, p: Peer) -> None:
        while True:
            try:
                if not p.conn.poll():
                    return
                msg = p.conn.recv()
            except (EOFError, OSError):
                asyncio.get_running_loop().remove_reader(p.conn.fileno())
                p.eof = True
                for fut in p.phase.values():
                    if not fut.done():
                        fut.set_result(False)
                if not p.ready.done():  # a start failure: _spawn reports it
                    p.ready.set_exception(EOFError(f"node {p.nid} exited before it was ready"))
                elif not p.killed and not p.leaving:
                    asyncio.ensure_future(self._died(p))
                return
            self.on_event(msg, p)

    async def _died(self, p: Peer) -> None:
        """A peer exited that nobody killed: a finding; count it as a kill so
        the survivors' detections are judged like those of a kill."""
        t = time.monotonic()
        p.killed = True
        self.unexpected += 1
        self.kills[p.nid] = {"t": t, "knows": set(self.knows[p.nid]), "unexpected": True, "why": "unexpected",
                             "pid": p.proc.pid}
        self.peers.pop(p.nid, None)
        await asyncio.to_thread(p.proc.join, 10)
        self.finding(p.nid, f"process died unexpectedly (exit code {p.proc.exitcode})")
        if not self.shutting_down:
            await self._replace()

    def _tell(self, p: Peer, msg: tuple) -> None:
        try:
            p.conn.send(msg)
        except OSError:
            pass

    async def _spawn(self) -> Peer | None:
        nid = self.next_nid
        self.next_nid += 1
        here, there = CTX.Pipe()
        proc = CTX.Process(target=peer_main, args=(nid, dataclasses.asdict(self.opts), there), daemon=True,
                           name=f"soak-node-{nid}")
        proc.start()
        there.close()
        p = Peer(nid, proc, here, asyncio.get_running_loop().create_future())
        asyncio.get_running_loop().add_reader(here.fileno(), self._on_pipe, p)
        try:
            await bounded(p.ready, 120, f"start of node {nid}")
        except (Hang, EOFError) as exc:
            self.spawn_failures += 1
            self.finding(nid, f"did not start: {exc}")
            p.killed = True
            proc.kill()
            await asyncio.to_thread(proc.join, 10)
            return None
        self.peers[nid] = p
        return p

    def _introduce(self, new: list[Peer]) -> None:
        """Tell every node about the newcomers, and the newcomers about everyone."""
        everyone = {0: self.node.eng.address.to_bytes(), **{n: p.addr for n, p in self.peers.items()}}
        for p in self.peers.values():
            if p in new:
                others = [(n, a) for n, a in everyone.items() if n != p.nid]
            else:
                others = [(q.nid, q.addr) for q in new]
            for n, _ in others:
                self.knows[n].add(p.nid)
            self._tell(p, ("peers", others))
        for q in new:
            self.knows[q.nid].add(0)
            self.node.add_peer(q.nid, q.addr)

    async def _replace(self) -> None:
        p = await self._spawn()
        if p is not None:
            self.restarts += 1
            self._introduce([p])
            if self.a.progress:
                print(f"started node {p.nid} (pid {p.proc.pid})", flush=True)

    async def _kill(self, v: Peer, why: str) -> None:
        """SIGKILL a peer and start its replacement."""
        v.killed = True
        self.peers.pop(v.nid, None)
        t = time.monotonic()
        os.kill(v.proc.pid, signal.SIGKILL)
        if self.a.progress:
            print(f"[{t - self.t0:6.1f} s] killed node {v.nid} (pid {v.proc.pid}): {why}", flush=True)
        self.kills[v.nid] = {"t": t, "knows": set(self.knows[v.nid]), "unexpected": False, "why": why,
                             "pid": v.proc.pid}
        await asyncio.to_thread(v.proc.join, 10)
        await self._replace()

    async def _kill_one(self) -> None:
        victims = [p for p in self.peers.values() if not p.killed]
        if victims:
            async with self.lock:
                v = self.rng.choice(victims)
                if not v.killed:
                    await self._kill(v, "chaos")

    def _recycle(self, nid: int, why: str) -> None:
        """A peer whose engine is wedged, or that a live node wrongly
        declared failed, is of no more use to the run: kill and replace it
        (the finding stays).  Node 0, the coordinator, cannot be recycled."""
        v = self.peers.get(nid)
        if not self.a.recycle or self.shutting_down or v is None or v.killed or nid in self.recycled:
            return
        self.recycled[nid] = why

        async def go() -> None:
            async with self.lock:
                if not v.killed and not self.shutting_down:
                    await self._kill(v, f"recycle: {why}")

        task = asyncio.ensure_future(go())
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _phase(self, name: str, seconds: float, local: Any) -> None:
        live = list(self.peers.values())
        loop = asyncio.get_running_loop()
        for p in live:
            p.phase[name] = loop.create_future()
            if name == "closed":
                p.leaving = True
            self._tell(p, ({"quiet": "quiesce", "unwatched": "unwatch", "closed": "close"}[name],))
        try:
            await bounded(local, seconds, f"coordinator's node: {name}")
        except Hang as exc:
            self.finding(0, f"hang: {exc}")
        for p in live:
            try:
                await bounded(p.phase[name], seconds, f"{name} of node {p.nid}")
            except Hang as exc:
                self.finding(p.nid, f"hang: {exc}")

    async def run(self) -> int:
        a = self.a
        loop = asyncio.get_running_loop()
        self.node = Node(0, self.opts, lambda msg: self.on_event(msg))
        await self.node.open()
        started = await asyncio.gather(*(self._spawn() for _ in range(a.peers)))
        self._introduce([p for p in started if p is not None])
        t0 = self.t0 = time.monotonic()
        deadline = t0 + a.minutes * 60
        next_kill = t0 + a.kill_every if a.kill_every > 0 else math.inf

        async def report_stats() -> None:
            while True:
                await asyncio.sleep(1.0)
                self.stats[0] = self.node.snapshot()

        ticker = asyncio.ensure_future(report_stats())
        last_line = t0
        while (now := time.monotonic()) < deadline:
            await asyncio.sleep(max(0.0, min(next_kill, deadline, now + 1.0) - now))
            now = time.monotonic()
            if now >= next_kill and now < deadline - 1.0:
                await self._kill_one()
                next_kill = max(next_kill + a.kill_every, time.monotonic() + 1.0)
            if a.progress and now - last_line >= a.progress:
                last_line = now
                done = self._totals()["completed"]
                print(f"[{now - t0:6.1f} s] kills {len(self.kills)} transfers {sum(done.values())} "
                      f"findings {len(self.findings)}", flush=True)
        traffic_s = time.monotonic() - t0
        self.shutting_down = True
        if self.background:
            await asyncio.wait(set(self.background), timeout=180)
        ticker.cancel()
        # Shutdown in three steps, so that no engine closes while another still
        # talks to it: nobody starts new work, nobody waits on anyone, close.
        await self._phase("quiet", 4 * a.op_timeout, self.node.quiesce())
        await self._phase("unwatched", 2 * a.op_timeout, self.node.unwatch())
        self.stats[0] = self.node.snapshot()
        await self._phase("closed", 2 * a.op_timeout, asyncio.sleep(0))
        for p in list(self.peers.values()):
            await asyncio.to_thread(p.proc.join, 30)
            if p.proc.exitcode is None:
                self.finding(p.nid, "did not exit within 30 s of being told to close")
                p.proc.kill()
                await asyncio.to_thread(p.proc.join, 10)
            elif p.proc.exitcode != 0:
                self.finding(p.nid, f"exited with code {p.proc.exitcode}")
            if not p.eof:
                loop.remove_reader(p.conn.fileno())
            p.conn.close()
        try:
            self.engine_stats[0] = await self.node.close()
        except Hang as exc:
            self.finding(0, f"hang: {exc}")
        self.stats[0] = self.node.snapshot()
        self.stale_shm = self._stale_shm(remove=not a.keep_shm)
        summary = self.summary(traffic_s)
        print_summary(summary)
        if a.json:
            Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")
        return 0 if not summary["findings"] else 1

    def _stale_shm(self, remove: bool) -> dict[str, Any]:
        """libfabric's shm provider names its region /dev/shm/<pid>:<ep>:<n> and
        only unlinks it when the endpoint closes: every SIGKILLed peer leaves
        one behind (and a later process with the same pid cannot open shm).
        Count them, then remove those of our dead peers."""
        files, size = [], 0
        if self.a.provider != "shm":
            return {"files": 0, "bytes": 0, "removed": remove}
        for k in self.kills.values():
            pid = k.get("pid")
            if pid is None or liveness.process_start(pid) >= 0:
                continue  # unknown, or the pid belongs to a live process now
            for f in glob.glob(f"/dev/shm/{pid}:*"):
                try:
                    size += os.stat(f).st_size
                    files.append(f)
                    if remove:
                        os.unlink(f)
                except OSError:
                    pass
        return {"files": len(files), "bytes": size, "removed": remove}

    def _totals(self) -> dict[str, Any]:
        slowest: dict[str, float] = {}
        completed: collections.Counter[str] = collections.Counter()
        verified: collections.Counter[str] = collections.Counter()
        errors: collections.Counter[str] = collections.Counter()
        out = {"bytes_verified": 0, "msgs_sent": 0, "msgs_received": 0}
        for s in self.stats.values():
            completed.update(s["completed"])
            verified.update(s["verified"])
            errors.update(s["errors"])
            for k, v in s.get("slowest", {}).items():
                slowest[k] = max(v, slowest.get(k, 0.0))
            for k in out:
                out[k] += s[k]
        return {"completed": dict(completed), "verified": dict(verified), "errors": dict(errors),
                "slowest": slowest, **out}

    def _detections(self) -> tuple[list[float], list[dict[str, Any]]]:
        """Judge every failure report: latency from the kill, or a false alarm;
        and every survivor that knew a killed peer must have reported it."""
        bound = self.a.detect_bound
        latencies, rows = [], []
        for (observer, dead), (t, what, err) in sorted(self.reports.items()):
            if (observer, dead) in self.false_alarms:
                continue
            k = self.kills.get(dead)
            if k is None or t < k["t"]:
                self.finding(observer, f"declared node {dead} failed, but it was not killed: {what}: {err}")
                continue
            lat = t - k["t"]
            latencies.append(lat)
            rows.append({"dead": dead, "observer": observer, "latency_s": round(lat, 4), "via": what})
            if lat > bound:
                self.finding(observer, f"detected the kill of node {dead} only after {lat:.2f} s "
                                       f"(bound {bound:g} s) via {what}")
        for dead, k in sorted(self.kills.items()):
            for observer in sorted(k["knows"]):
                if (observer, dead) in self.reports:
                    continue
                ok = self.kills.get(observer)
                if ok is not None and ok["t"] < k["t"] + bound:
                    continue  # the observer itself died before it had to notice
                state = self.stats.get(observer, {}).get("conns", {}).get(str(dead), "no connection")
                self.finding(observer, f"never reported the failure of node {dead} (killed "
                                       f"{'unexpectedly' if k['unexpected'] else 'by the soak'}); "
                                       f"its last statistics show, for node {dead}: {state}")
        return latencies, rows

    def summary(self, traffic_s: float) -> dict[str, Any]:
        lat, rows = self._detections()
        tot = self._totals()
        return {
            "duration_s": round(traffic_s, 1),
            "provider": self.a.provider,
            "libfabric": af.fabric_version(),
            "peers": self.a.peers,
            "seed": self.a.seed,
            "kill_every_s": self.a.kill_every,
            "kills": sum(1 for k in self.kills.values() if k.get("why") == "chaos"),
            "recycled": len([k for k in self.kills.values() if k.get("why", "").startswith("recycle")]),
            "false_alarms": len(self.false_alarms),
            "unexpected_deaths": self.unexpected,
            "restarts": self.restarts,
            "nodes_started": self.next_nid,
            "transfers_completed": tot["completed"],
            "transfers_completed_total": sum(tot["completed"].values()),
            "transfers_verified": tot["verified"],
            "slowest_transfer_s": tot["slowest"],
            "bytes_verified": tot["bytes_verified"],
            "messages_sent": tot["msgs_sent"],
            "messages_received": tot["msgs_received"],
            "errors_by_type": tot["errors"],
            "detection": {
                "count": len(lat),
                "median_s": round(statistics.median(lat), 4) if lat else None,
                "max_s": round(max(lat), 4) if lat else None,
                "bound_s": self.a.detect_bound,
                "via": dict(collections.Counter(_via(r["via"]) for r in rows)),
            },
            "stale_shm_regions": self.stale_shm,
            "detections": rows,
            "engines_at_close": self.engine_stats,
            "findings": self.findings,
            "finding_kinds": finding_kinds(self.findings),
        }


def _via(what: str) -> str:
    """'receive write #3 from node 5' -> 'receive write': what saw the error first."""
    return re.split(r" (?:#|of node|to node|from node)", what)[0]


def finding_kinds(findings: list[str]) -> list[dict[str, Any]]:
    """Findings grouped by shape (numbers and addresses blanked), most common first."""
    groups: dict[str, list[str]] = {}
    for f in findings:
        key = re.sub(r"\[engine:.*?\]", "", f)
        key = re.sub(r"incarnation=[0-9a-f]+", "incarnation=X", key)
        key = re.sub(r"\d+(\.\d+)?", "N", key.split("\n")[0])[:160]
        groups.setdefault(key, []).append(f)
    return [{"kind": k, "count": len(v), "first": v[0][:600]}
            for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))]


def print_summary(s: dict[str, Any]) -> None:
    d = s["detection"]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(s["transfers_completed"].items()))
    errs = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_type"].items())) or "none"
    slow = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(s["slowest_transfer_s"].items())) or "-"
    dash = "-"
    lines = [
        "soak summary",
        (f"  provider         {s['provider']} (libfabric {s['libfabric']}), {s['peers']} peers + coordinator, "
         f"seed {s['seed']}"),
        f"  duration         {s['duration_s']} s of traffic",
        (f"  kills            {s['kills']} (every {s['kill_every_s']:g} s), recycled {s['recycled']}, "
         f"restarts {s['restarts']}, unexpected deaths {s['unexpected_deaths']}"),
        f"  transfers        {s['transfers_completed_total']} completed and acked: {kinds}",
        f"  bytes verified   {s['bytes_verified']} ({s['bytes_verified'] / 2**30:.2f} GiB)",
        f"  slowest          {slow} (post to ack)",
        f"  messages         {s['messages_sent']} sent, {s['messages_received']} received",
        f"  errors by type   {errs}",
        (f"  stale shm files  {s['stale_shm_regions']['files']} left in /dev/shm by killed peers "
         f"({s['stale_shm_regions']['bytes'] / 2**20:.0f} MiB"
         f"{', removed' if s['stale_shm_regions']['removed'] and s['stale_shm_regions']['files'] else ''})"),
        (f"  detection        {d['count']} survivor detections, median "
         f"{d['median_s'] if d['median_s'] is not None else dash} s, max "
         f"{d['max_s'] if d['max_s'] is not None else dash} s (bound {d['bound_s']:g} s)"),
        f"  false alarms     {s['false_alarms']} (live nodes declared failed)",
        f"  findings         {len(s['findings'])} ({len(s['finding_kinds'])} kinds)",
    ]
    for g in s["finding_kinds"][:30]:
        lines.append(f"    {g['count']:5d} x {g['kind']}")
        lines.append(f"            e.g. {g['first'][:400]}")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, required=True, help="how long traffic runs (fractions allowed)")
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--peers", type=int, default=3, help="peer processes besides the coordinator")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kill-every", type=float, default=5.0, help="seconds between kills (0: never)")
    ap.add_argument("--json", help="write the summary here too")
    ap.add_argument("--op-timeout", type=float, default=30.0, help="bound of every await (s)")
    ap.add_argument("--peer-timeout", type=float, default=3.0, help="EngineConfig.peer_timeout (s)")
    ap.add_argument("--detect-bound", type=float, default=None,
                    help="a survivor must see BrokenResourceError this soon after a kill (default 2 x peer timeout)")
    ap.add_argument("--pace", type=float, default=0.0, help="random pause of up to this many s between transfers")
    ap.add_argument("--keep-shm", action="store_true",
                    help="leave the /dev/shm regions of killed peers in place (removed by default)")
    ap.add_argument("--no-recycle", dest="recycle", action="store_false",
                    help="keep a wedged or wrongly failed peer instead of killing and replacing it")
    ap.add_argument("--progress", type=float, default=0.0, help="print a progress line every this many s")
    a = ap.parse_args(argv)
    if a.minutes <= 0 or a.peers < 1 or a.seed < 0 or a.kill_every < 0 or a.op_timeout <= 0:
        ap.error("--minutes, --peers and --op-timeout must be positive, --seed and --kill-every not negative")
    if a.detect_bound is None:
        a.detect_bound = 2 * a.peer_timeout
    if not af.list_providers(a.provider):
        print(f"provider {a.provider!r} is not available", file=sys.stderr)
        return 2
    return asyncio.run(Coordinator(a).run())


if __name__ == "__main__":
    sys.exit(main())
