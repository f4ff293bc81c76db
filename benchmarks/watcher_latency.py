"""Watcher trigger latency and CPU, against the same trigger done in Python.

    python -m benchmarks.watcher_latency [--provider shm] [--bumps 10000] [--poll-ns 0 2000 50000] [--json out.json]

A producer thread stores 1, 2, 3, ... into one slot (``Watcher.bump``, which
stamps CLOCK_MONOTONIC just before its release store), waiting between two
bumps until the previous one was acted on (plus a random 0.1-0.4 ms) so that
every bump is observed on its own.

* **native arm**: one ``arm_write`` (64 bytes, imm) per value, armed up front.
  The watcher thread records when it saw the slot reach the value (``seen``)
  and when ``afc_write`` returned (``posted``: queued for the worker, or posted
  with ``direct_post``).  Latency = those times minus the bump's stamp.
* **baseline, Python**: what an application does without arms: a task
  iterates ``watcher.watch(slot)`` and calls ``engine.write`` for each change
  (TransferEngine's Python watcher callback does the same hop).  Latency = the
  time write() returned minus the bump's stamp.

CPU: the watcher thread's own CPU time (``/proc/self/task/<tid>/stat``,
thread name ``af-watcher``) over ``--cpu-seconds`` with one arm waiting and no
bumps, and with nothing armed (it should block: 0 %).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import threading
import time

for _k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
    os.environ.setdefault(_k, "lo")

import numpy as np  # noqa: E402

import aiofabric as af  # noqa: E402

from .write_bw import _commit, wakeup_floor  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


def _thread_cpu(name: str) -> float:
    """CPU seconds of this process's thread called ``name`` (summed if several)."""
    total = 0.0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() != name:
                    continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK
        except OSError:
            continue
    return total


def _pct(a: np.ndarray) -> dict[str, float]:
    us = a / 1000.0
    return {"p50": float(np.percentile(us, 50)), "p99": float(np.percentile(us, 99)), "max": float(us.max()),
            "n": int(len(us))}


def _producer(w: af.Watcher, n: int, done: list[int], stop: threading.Event) -> None:
    rng = random.Random(1)
    for k in range(1, n + 1):
        if stop.is_set():
            return
        w.bump(0, k)
        deadline = time.monotonic() + 5
        while done[0] < k and time.monotonic() < deadline and not stop.is_set():
            time.sleep(0.00005)
        time.sleep(rng.uniform(0.0001, 0.0004))


async def native(provider: str, n: int, poll_ns: int, cpu_seconds: float, settings: dict) -> dict:
    async with af.open_engine(provider, **settings) as a, af.open_engine(provider, **settings) as b:
        ra = a.register(bytearray(64))
        d = b.register(bytearray(64)).descriptor()
        w = a.watcher(slots=1, poll_ns=poll_ns)
        # CPU: nothing armed (blocked), then one arm waiting and no bumps.
        await asyncio.sleep(0.2)
        c0, t0 = _thread_cpu("af-watcher"), time.monotonic()
        await asyncio.sleep(cpu_seconds)
        idle = (_thread_cpu("af-watcher") - c0) / (time.monotonic() - t0) * 100
        parked = w.arm_write(0, 1 << 62, ra, d, imm=8)
        await asyncio.sleep(0.2)
        c0, t0 = _thread_cpu("af-watcher"), time.monotonic()
        await asyncio.sleep(cpu_seconds)
        armed = (_thread_cpu("af-watcher") - c0) / (time.monotonic() - t0) * 100
        w.disarm(parked)

        w.trace(n)
        futs = [w.arm_write(0, k, ra, d, imm=7) for k in range(1, n + 1)]
        done = [0]

        def count(_f: object) -> None:
            done[0] += 1

        for f in futs:
            f.add_done_callback(count)
        stop = threading.Event()
        t = threading.Thread(target=_producer, args=(w, n, done, stop))
        t.start()
        try:
            async with asyncio.timeout(max(60, n * 0.01)):
                await asyncio.gather(*futs)
                await b.imm_counter(7).wait(n)
        finally:
            stop.set()
            t.join()
        s = w.trace_samples()
        assert len(s) == n and np.all(np.diff(s["target"].astype(np.int64)) == 1), "one sample per arm, in order"
        exact = s["value"] == s["target"]  # seen on its own, not coalesced with a later bump
        seen = (s["seen_ns"] - s["bump_ns"]).astype(np.int64)[exact]
        posted = (s["posted_ns"] - s["bump_ns"]).astype(np.int64)[exact]
        w.close()
        return {"seen": _pct(seen), "posted": _pct(posted), "cpu_idle_pct": idle, "cpu_armed_pct": armed,
                "coalesced": int((~exact).sum())}


async def python_path(provider: str, n: int, poll_ns: int, settings: dict) -> dict:
    async with af.open_engine(provider, **settings) as a, af.open_engine(provider, **settings) as b:
        ra = a.register(bytearray(64))
        d = b.register(bytearray(64)).descriptor()
        w = a.watcher(slots=1, poll_ns=poll_ns)
        w.trace(1)  # stamps bumps; no arms fire
        lat: list[int] = []
        done = [0]
        futs = []

        async def consumer() -> None:
            async for _old, new in w.watch(0):
                futs.append(a.write(ra, d, imm=7))
                t1 = time.monotonic_ns()  # time.monotonic_ns() is CLOCK_MONOTONIC, as the stamps
                lat.append(t1 - w.last_bump_ns(0))
                done[0] = new
                if new >= n:
                    return

        task = asyncio.create_task(consumer())
        await asyncio.sleep(0.01)
        stop = threading.Event()
        t = threading.Thread(target=_producer, args=(w, n, done, stop))
        t.start()
        try:
            async with asyncio.timeout(max(60, n * 0.01)):
                await task
                await asyncio.gather(*futs)
                await b.imm_counter(7).wait(len(futs))
        finally:
            stop.set()
            t.join()
        w.close()
        return {"posted": _pct(np.array(lat, dtype=np.int64)), "coalesced": n - len(lat)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--bumps", type=int, default=10000)
    ap.add_argument("--poll-ns", type=int, nargs="+", default=[0, 2000, 50000])
    ap.add_argument("--cpu-seconds", type=float, default=2.0)
    ap.add_argument("--spin-us", type=int, default=None,
                    help="EngineConfig.spin_us of both engines (default: the engine default, 20000); with 0 "
                         "the engines' workers block right after each write instead of polling 20 ms, "
                         "leaving the cores to the watcher thread")
    ap.add_argument("--direct-post", action="store_true",
                    help="EngineConfig.direct_post: the watcher thread posts single writes itself")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    settings: dict = {} if args.spin_us is None else {"spin_us": args.spin_us}
    if args.direct_post:
        settings["direct_post"] = True
    floor = wakeup_floor()
    print(f"provider {args.provider}, libfabric {af.fabric_version()}, {os.cpu_count()} CPUs, "
          f"{args.bumps} bumps per row, engine settings {settings or 'default'}, load average "
          f"{os.getloadavg()[0]:.1f}; wake-up floor (pipe ping-pong RTT) {floor:.1f} us")
    print(f"{'poll_ns':>8}  {'path':<22}{'p50 us':>9}{'p99 us':>9}{'max us':>10}{'coalesced':>11}"
          f"{'CPU armed':>11}{'CPU idle':>10}")
    results = []
    for p in args.poll_ns:
        r = asyncio.run(native(args.provider, args.bumps, p, args.cpu_seconds, settings))
        py = asyncio.run(python_path(args.provider, args.bumps, p, settings))
        results.append({"poll_ns": p, "native": r, "python": py})
        rows = (("arm: bump -> seen", r["seen"], r["coalesced"], f"{r['cpu_armed_pct']:.1f}%",
                 f"{r['cpu_idle_pct']:.1f}%"),
                ("arm: bump -> posted", r["posted"], r["coalesced"], "", ""),
                ("python: watch+write", py["posted"], py["coalesced"], "", ""))
        for name, q, co, c1, c2 in rows:
            print(f"{p:>8}  {name:<22}{q['p50']:>9.1f}{q['p99']:>9.1f}{q['max']:>10.1f}{co:>11}{c1:>11}{c2:>10}")
    if args.json:
        doc = {"provider": args.provider, "settings": settings, "libfabric": af.fabric_version(), "bumps": args.bumps,
               "machine": {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
                           "python": sys.version.split()[0]},
               "commit": _commit(), "wakeup_floor_us": floor, "results": results}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
