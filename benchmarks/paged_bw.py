"""Paged writes (``write_pages``) and an 8-peer ``scatter`` between processes,
against the raw libfabric C program (benchmarks/raw/fabric_raw.c, modes
``pages`` and ``scatter``) doing the same posts, measured in the same run.

    python -m benchmarks.paged_bw
    python -m benchmarks.paged_bw --providers shm --page-sizes 4096 --imm --json out.json
    python -m benchmarks.paged_bw --quick

Paged writes: one ``write_pages`` call moves one batch: ``pages`` pages of
``page`` bytes from the initiator's region at ``page * sidx[k]`` to the
target's region at ``page * didx[k]``; ``sidx`` and ``didx`` are the
deterministic shuffles of ``0..pages-1`` that fabric_raw.c uses
(``_raw.page_permutation``; the raw run's ``index_checksum`` is compared).
Pages per call: 4096 for pages of up to 16 KiB (4, 16, 64 MiB per call), and
above that as many as make 64 MiB (1024 x 64 KiB), so one call stays <= 64 MiB
and a call still takes >= ~10 ms at the rates of this machine (``--pages``
overrides).  The initiator keeps ``--calls`` (2) write_pages calls in flight
(await the oldest, post the next, FIFO); 0.2 s warm-up, then ``--seconds`` of
completed calls.  Raw C streams the same pages batch after batch with
``--inflight`` pages outstanding; default ``min(calls * pages, max_ops)`` with
aiofabric's ``EngineConfig.max_ops`` (4096): the most pages aiofabric's native
core can have at the provider.  Both are further bounded by the provider's
transmit queue (-FI_EAGAIN: read the CQ, post again; shm's holds 1024).
Without ``--imm`` every page is a plain fi_write, with ``--imm`` an
fi_writedata carrying one immediate (aiofabric: ``imm=``, one per page); the
targets check that every page landed and that exactly one immediate per page
arrived.

Scatter: one engine writes ``size`` bytes to each of 8 peer engines per round
(``engine.scatter`` with 8 pairs, ``--scatter-calls`` (4) calls in flight); the
8 target engines live in one process.  Raw C: one initiator endpoint, one
target process owning 8 endpoints (each its own domain, CQ and endpoint, as an
engine has), ``scatter-calls * 8`` writes outstanding.

Rounds alternate aiofabric and raw C (``--rounds``, default 3) and the table
shows medians; ratio = aiofabric median / raw median.  The PASS/FAIL lines
check the issue's goals (paged writes >= 80 % of raw's page rate for 4 KiB
pages, >= 90 % of raw's throughput for 64 KiB pages); they inform, they do
not fail the run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections import deque

for _k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
    os.environ.setdefault(_k, "lo")

import numpy as np  # noqa: E402

import aiofabric as af  # noqa: E402
from aiofabric.config import EngineConfig  # noqa: E402

from ._raw import PAGES_IMM, PERM_SEED_DST, PERM_SEED_SRC, index_checksum, page_permutation, run_raw  # noqa: E402
from .write_bw import _commit, _human  # noqa: E402

PROVIDERS = ("shm", "tcp;ofi_rxm")
PAGE_SIZES = (1024, 4096, 16384, 65536)
SCATTER_SIZES = (65536, 1 << 20)
PEERS = 8
CALL_BYTES = 64 << 20       # pages above 16 KiB: as many as make this per call
MANY_PAGES = 4096           # pages per call up to 16 KiB
GOALS = ((4096, "pages_per_s", 0.80, "page rate"), (65536, "gbit_per_s", 0.90, "throughput"))
CHECK_TIMEOUT = 10.0        # s a target waits for the last immediates


def pages_per_call(page: int, override: int | None = None) -> int:
    if override:
        return override
    return MANY_PAGES if page <= 16384 else max(1, CALL_BYTES // page)


# -- the target process ------------------------------------------------------


async def _conn_recv(conn):
    """conn.recv() without blocking the loop (the engines' completions keep flowing)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_reader(conn.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(conn.fileno())
    return conn.recv()


def _target(provider: str, conn, settings: dict, n_engines: int, region_bytes: int) -> None:
    """n_engines engines, a zeroed region of region_bytes each; answers checks until "stop"."""

    async def main() -> None:
        engines = [await af.open_engine(provider, **settings) for _ in range(n_engines)]
        try:
            bufs = [np.zeros(region_bytes, dtype=np.uint8) for _ in engines]
            regions = [e.register(b) for e, b in zip(engines, bufs)]
            counters = [e.imm_counter(PAGES_IMM) for e in engines]
            conn.send([(e.address.to_bytes(), r.descriptor().to_bytes()) for e, r in zip(engines, regions)])
            while True:
                msg = await _conn_recv(conn)
                if msg[0] == "stop":
                    break
                res = await _check(msg, bufs, counters)
                res["target_stats"] = [e.statistics().__dict__ for e in engines]
                conn.send(res)
        finally:
            for e in reversed(engines):  # the receiving side closes after the initiator
                await e.aclose()

    asyncio.run(main())


async def _check(msg, bufs, counters) -> dict:
    """What the initiator's completed writes left: one immediate per write (when
    imm) and the expected bytes.  Returns {"ok": bool, "error": str | None}."""
    kind, size, n, want_imms, imm = msg
    try:
        if imm:
            for c, want in zip(counters, want_imms):
                async with asyncio.timeout(CHECK_TIMEOUT):
                    await c.wait(want)
            await asyncio.sleep(0.01)
            extra = [c.available for c in counters]
            if any(extra):
                return {"ok": False, "error": f"more immediates than writes: {extra}"}
        if kind == "pages":
            sidx, didx = page_permutation(n, PERM_SEED_SRC), page_permutation(n, PERM_SEED_DST)
            pages = bufs[0][: n * size].reshape(n, size)
            tags = np.ascontiguousarray(pages[didx, :8]).view("<u8").ravel()
            if not np.array_equal(tags, sidx) or not (pages[:, -1] == 0xAB).all():
                bad = int(np.flatnonzero(tags != sidx)[0]) if not np.array_equal(tags, sidx) else -1
                return {"ok": False, "error": f"pages did not land where expected (first bad k={bad})"}
        else:
            for i, b in enumerate(bufs):
                if b[0] != 0xAB or b[size - 1] != 0xAB:
                    return {"ok": False, "error": f"scatter target {i} was not written"}
        for b in bufs:
            b[:] = 0
        return {"ok": True, "error": None}
    except TimeoutError:
        got = [c.available for c in counters]
        return {"ok": False, "error": f"immediates missing after {CHECK_TIMEOUT}s: have {got}, want {want_imms}"}


# -- the initiator -----------------------------------------------------------


async def _stream(post, calls: int, seconds: float) -> tuple[int, float, int]:
    """Keep `calls` futures from post() in flight (FIFO: await the oldest, post
    the next); 0.2 s warm-up, then count calls completed for `seconds`.
    Returns (calls completed in the window, window length, calls posted in all)."""
    q: deque = deque(post() for _ in range(calls))
    posted = calls
    loop = asyncio.get_running_loop()
    warm_end = loop.time() + 0.2
    while loop.time() < warm_end:
        await q.popleft()
        q.append(post())
        posted += 1
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        await q.popleft()
        done += 1
        if time.perf_counter() >= deadline:
            break
        q.append(post())
        posted += 1
    elapsed = time.perf_counter() - t0
    while q:
        await q.popleft()
    return done, elapsed, posted


async def _pages_initiator(provider: str, conn, args, settings: dict) -> dict:
    _, desc_b = conn.recv()[0]
    desc = af.RegionDescriptor.from_bytes(desc_b)
    out: dict = {}
    async with af.open_engine(provider, **settings) as eng:
        src = np.full(desc.nbytes, 0xAB, dtype=np.uint8)
        region = eng.register(src, remote_write=False)
        imm = PAGES_IMM if args.imm else None
        for page in args.page_sizes:
            n = pages_per_call(page, args.pages)
            sidx, didx = page_permutation(n, PERM_SEED_SRC), page_permutation(n, PERM_SEED_DST)
            src[:] = 0xAB
            src[: n * page].reshape(n, page)[:, :8] = np.arange(n, dtype="<u8").view(np.uint8).reshape(n, 8)
            sview, dview = region[0: n * page], desc[0: n * page]

            def post(sview=sview, dview=dview, page=page, sidx=sidx, didx=didx):
                return eng.write_pages(sview, dview, page, sidx, didx, imm=imm)

            done, el, posted = await _stream(post, args.calls, args.seconds)
            conn.send(("pages", page, n, [posted * n], bool(imm)))
            check = conn.recv()
            if not check["ok"]:
                raise RuntimeError(f"aiofabric {provider} pages {page}: {check['error']}")
            out[page] = {"pages": n, "calls": done, "seconds": el, "pages_per_s": done * n / el,
                         "gbit_per_s": done * n * page * 8 / el / 1e9, "imm": bool(imm),
                         "stats": eng.statistics().__dict__, "target_stats": check["target_stats"]}
    return out


async def _scatter_initiator(provider: str, conn, args, settings: dict) -> dict:
    targets = [(af.Address.from_bytes(a), af.RegionDescriptor.from_bytes(d)) for a, d in conn.recv()]
    out: dict = {}
    async with af.open_engine(provider, **settings) as eng:
        src = np.full(max(args.scatter_sizes) * len(targets), 0xAB, dtype=np.uint8)
        region = eng.register(src, remote_write=False)
        imm = PAGES_IMM if args.imm else None
        for size in args.scatter_sizes:
            pairs = [(region[p * size:(p + 1) * size], d[0:size]) for p, (_, d) in enumerate(targets)]
            done, el, posted = await _stream(lambda pairs=pairs: eng.scatter(pairs, imm=imm), args.scatter_calls,
                                             args.seconds)
            conn.send(("scatter", size, len(targets), [posted] * len(targets), bool(imm)))
            check = conn.recv()
            if not check["ok"]:
                raise RuntimeError(f"aiofabric {provider} scatter {size}: {check['error']}")
            out[size] = {"rounds": done, "seconds": el, "rounds_per_s": done / el,
                         "gbit_per_s": done * len(targets) * size * 8 / el / 1e9, "imm": bool(imm),
                         "stats": eng.statistics().__dict__, "target_stats": check["target_stats"]}
    return out


def _run_pair(provider: str, initiator, args, settings: dict, n_engines: int, region_bytes: int) -> dict:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_target, args=(provider, b, settings, n_engines, region_bytes), daemon=True)
    p.start()
    try:
        deadline = time.monotonic() + 60
        while not a.poll(0.1):
            if not p.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"aiofabric {provider}: the target process did not start (exit status {p.exitcode})")
        res = asyncio.run(initiator(provider, a, args, settings))
        a.send(("stop",))
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join()
    if p.exitcode:
        raise RuntimeError(f"aiofabric {provider}: target process exited with status {p.exitcode}")
    return res


def run_aiofabric_pages(provider: str, args, settings: dict) -> dict:
    nbytes = max(pages_per_call(pg, args.pages) * pg for pg in args.page_sizes)
    return _run_pair(provider, _pages_initiator, args, settings, 1, nbytes)


def run_aiofabric_scatter(provider: str, args, settings: dict) -> dict:
    return _run_pair(provider, _scatter_initiator, args, settings, PEERS, max(args.scatter_sizes))


def raw_inflight(page: int, args) -> int:
    if args.inflight:
        return args.inflight
    max_ops = args.settings.get("max_ops", EngineConfig.max_ops)
    return min(args.calls * pages_per_call(page, args.pages), max_ops)


def run_raw_pages(provider: str, args) -> dict:
    out = {}
    for page in args.page_sizes:
        n = pages_per_call(page, args.pages)
        r = run_raw(provider, "pages", size=page, pages=n, inflight=raw_inflight(page, args),
                    seconds=args.seconds, imm=args.imm)
        want = index_checksum(page_permutation(n, PERM_SEED_SRC), page_permutation(n, PERM_SEED_DST))
        if r["index_checksum"] != want:
            raise RuntimeError(f"fabric_raw's page permutation differs from page_permutation() (n={n})")
        out[page] = r
    return out


def run_raw_scatter(provider: str, args) -> dict:
    return {size: run_raw(provider, "scatter", size=size, peers=PEERS, inflight=args.scatter_calls * PEERS,
                          seconds=args.seconds, imm=args.imm)
            for size in args.scatter_sizes}


# -- report ------------------------------------------------------------------


def _median(runs: list[dict], key, metric: str) -> float | None:
    return statistics.median(r[key][metric] for r in runs) if runs else None


def _fmt(v: float | None, spec: str, width: int) -> str:
    return format(format(v, spec) if v is not None else "-", f">{width}")


def _ratio(a: float | None, r: float | None) -> float | None:
    return a / r if a is not None and r else None


def _table(provider: str, res: dict, args) -> list[str]:
    lines = []
    if args.page_sizes:
        lines.append(f"{'paged writes':<14}{'pages/call':>10}{'raw pages/s':>14}{'raw Gb/s':>10}"
                     f"{'aiofabric pages/s':>19}{'aiof. Gb/s':>11}{'ratio':>7}")
        for page in args.page_sizes:
            rp, rg = _median(res["raw_pages"], page, "pages_per_s"), _median(res["raw_pages"], page, "gbit_per_s")
            ap, ag = _median(res["af_pages"], page, "pages_per_s"), _median(res["af_pages"], page, "gbit_per_s")
            lines.append(f"{_human(page) + ' pages':<14}{pages_per_call(page, args.pages):>10}{_fmt(rp, ',.0f', 14)}"
                         f"{_fmt(rg, '.2f', 10)}{_fmt(ap, ',.0f', 19)}{_fmt(ag, '.2f', 11)}{_fmt(_ratio(ap, rp), '.2f', 7)}")
    if args.scatter_sizes:
        lines.append(f"{'scatter x' + str(PEERS):<14}{'':>10}{'raw rounds/s':>14}{'raw Gb/s':>10}"
                     f"{'aiof. rounds/s':>19}{'aiof. Gb/s':>11}{'ratio':>7}")
        for size in args.scatter_sizes:
            rr, rg = _median(res["raw_scatter"], size, "rounds_per_s"), _median(res["raw_scatter"], size, "gbit_per_s")
            ar, ag = _median(res["af_scatter"], size, "rounds_per_s"), _median(res["af_scatter"], size, "gbit_per_s")
            lines.append(f"{_human(size) + ' each':<14}{'':>10}{_fmt(rr, ',.0f', 14)}{_fmt(rg, '.2f', 10)}"
                         f"{_fmt(ar, ',.0f', 19)}{_fmt(ag, '.2f', 11)}{_fmt(_ratio(ar, rr), '.2f', 7)}")
    return lines


def _goals(provider: str, res: dict, args) -> list[dict]:
    out = []
    for page, metric, goal, what in GOALS:
        if page not in args.page_sizes or not res["raw_pages"]:
            continue
        ratio = _median(res["af_pages"], page, metric) / _median(res["raw_pages"], page, metric)
        out.append({"provider": provider, "page": page, "metric": metric, "goal": goal, "ratio": ratio,
                    "pass": ratio >= goal, "what": what})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS))
    ap.add_argument("--page-sizes", type=int, nargs="*", default=list(PAGE_SIZES))
    ap.add_argument("--pages", type=int, default=None, help="pages per call (default: see above)")
    ap.add_argument("--calls", type=int, default=2, help="write_pages calls in flight")
    ap.add_argument("--inflight", type=int, default=None, help="raw C pages outstanding (default: see above)")
    ap.add_argument("--scatter-sizes", type=int, nargs="*", default=list(SCATTER_SIZES), help="none: skip scatter")
    ap.add_argument("--scatter-calls", type=int, default=4, help="scatter calls in flight (x8 writes)")
    ap.add_argument("--imm", action="store_true", help="one immediate per page / per scatter write")
    ap.add_argument("--seconds", type=float, default=1.0, help="per workload and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating aiofabric/raw rounds; medians are reported")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=INT",
                    help="an EngineConfig setting for every engine, e.g. --set spin_us=1000")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round x 0.3 s, 512 pages per call, 64 KiB scatter")
    ap.add_argument("--no-raw", action="store_true", help="skip the raw C baseline")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, min(args.seconds, 0.3)
        args.pages = args.pages or 512
        args.scatter_sizes = [s for s in args.scatter_sizes if s <= 65536][:1]
    if args.rounds < 1 or args.seconds <= 0 or args.calls < 1 or args.scatter_calls < 1:
        ap.error("--rounds, --seconds, --calls and --scatter-calls must be positive")
    if any(p < 8 for p in args.page_sizes) or any(s < 1 for s in args.scatter_sizes):
        ap.error("page sizes must be >= 8 bytes (each page carries its index), scatter sizes positive")
    args.settings = {}
    for kv in args.set:
        k, _, v = kv.partition("=")
        args.settings[k] = int(v) if v.lstrip("-").isdigit() else v
    settings = args.settings

    results: dict = {}
    for provider in args.providers:
        res = results[provider] = {"af_pages": [], "raw_pages": [], "af_scatter": [], "raw_scatter": []}
        for _ in range(args.rounds):  # alternate, so drift on a noisy machine hits both alike
            if args.page_sizes:
                res["af_pages"].append(run_aiofabric_pages(provider, args, settings))
                if not args.no_raw:
                    res["raw_pages"].append(run_raw_pages(provider, args))
            if args.scatter_sizes:
                res["af_scatter"].append(run_aiofabric_scatter(provider, args, settings))
                if not args.no_raw:
                    res["raw_scatter"].append(run_raw_scatter(provider, args))

    print(f"libfabric {af.fabric_version()}  {platform.node()}  {os.cpu_count()} cpus  {args.rounds} rounds x "
          f"{args.seconds}s  write_pages calls in flight {args.calls}  scatter calls in flight {args.scatter_calls}  "
          f"imm {'per page' if args.imm else 'none'}  settings {settings or 'default'}")
    goals = []
    for provider, res in results.items():
        print(f"\n{provider}  (medians; ratio = aiofabric / raw C)")
        for line in _table(provider, res, args):
            print(line)
        goals += _goals(provider, res, args)
    if goals:
        print()
    for g in goals:
        print(f"{'PASS' if g['pass'] else 'FAIL'}  {g['provider']:<12} {_human(g['page'])} pages: aiofabric "
              f"{g['ratio']:.2f} of raw C's {g['what']} (goal >= {g['goal']:.2f})")
    if args.json:
        doc = {
            "libfabric": af.fabric_version(),
            "machine": {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": sys.version.split()[0]},
            "commit": _commit(),
            "settings": {"calls": args.calls, "scatter_calls": args.scatter_calls, "seconds": args.seconds,
                         "rounds": args.rounds, "imm": args.imm, "pages": args.pages, "inflight": args.inflight,
                         "engine": settings},
            "pages_per_call": {pg: pages_per_call(pg, args.pages) for pg in args.page_sizes},
            "raw_inflight": {pg: raw_inflight(pg, args) for pg in args.page_sizes},
            "median": {
                p: {
                    "pages": {pg: {side: {m: _median(r[key], pg, m) for m in ("pages_per_s", "gbit_per_s")}
                                   for side, key in (("aiofabric", "af_pages"), ("raw", "raw_pages"))}
                              for pg in args.page_sizes},
                    "scatter": {s: {side: {m: _median(r[key], s, m) for m in ("rounds_per_s", "gbit_per_s")}
                                    for side, key in (("aiofabric", "af_scatter"), ("raw", "raw_scatter"))}
                                for s in args.scatter_sizes},
                }
                for p, r in results.items()
            },
            "goals": goals,
            "runs": results,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
