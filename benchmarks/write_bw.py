"""Single-write bandwidth, 4 KiB write rate and notify round trip between two
processes, against the raw libfabric C program (benchmarks/raw/fabric_raw.c)
measured in the same run.

    python -m benchmarks.write_bw --provider shm
    python -m benchmarks.write_bw --provider "tcp;ofi_rxm" --json out.json

Prints a table with the ratio aiofabric / raw and writes JSON (provider,
libfabric version, machine, commit).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import time

for _k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
    os.environ.setdefault(_k, "lo")

import aiofabric as af  # noqa: E402

from ._raw import run_raw  # noqa: E402

SIZES = (4096, 65536, 1 << 20, 16 << 20, 64 << 20)
MAX = 64 << 20
RTT_IMM_PING, RTT_IMM_PONG = 1, 2


def _target(provider: str, conn, settings: dict) -> None:
    async def main() -> None:
        async with af.open_engine(provider, **settings) as eng:
            buf = bytearray(MAX)
            region = eng.register(buf)
            conn.send((eng.address.to_bytes(), region.descriptor().to_bytes()))
            ping = eng.imm_counter(RTT_IMM_PING)
            peer = af.Address.from_bytes(conn.recv())
            loop = asyncio.get_running_loop()
            stop = loop.create_future()
            loop.add_reader(conn.fileno(), lambda: stop.done() or stop.set_result(None))

            async def pong() -> None:
                sent = None
                while True:
                    await ping.wait(1)
                    if sent is not None:
                        await sent  # the previous pong's local completion
                    sent = eng.notify(peer, RTT_IMM_PONG)

            task = asyncio.create_task(pong())
            await stop
            loop.remove_reader(conn.fileno())
            task.cancel()
            conn.recv()

    asyncio.run(main())


async def _keep_in_flight(eng, src, dst, inflight: int, seconds: float) -> tuple[int, float]:
    """Keep `inflight` writes outstanding (FIFO: await the oldest, post a new
    one); return (ops, elapsed) after a 0.2 s warm-up.  The raw C program
    does the same."""
    from collections import deque

    q: deque = deque(eng.write(src, dst) for _ in range(inflight))
    loop = asyncio.get_running_loop()
    warm_end = loop.time() + 0.2
    while loop.time() < warm_end:
        await q.popleft()
        q.append(eng.write(src, dst))
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        await q.popleft()
        q.append(eng.write(src, dst))
        n += 1
        if n % inflight == 0 and time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - t0
    while q:
        await q.popleft()
    return n, elapsed


async def _rate(eng, src, dst, inflight: int, seconds: float) -> tuple[int, float]:
    """Each write its own awaited future, `inflight` outstanding, FIFO."""
    from collections import deque

    q: deque = deque()
    write = eng.write
    for _ in range(inflight):
        q.append(write(src, dst))
    loop = asyncio.get_running_loop()
    warm_end = loop.time() + 0.2
    while loop.time() < warm_end:
        for _ in range(inflight):
            await q.popleft()
            q.append(write(src, dst))
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(inflight):
            await q.popleft()
            q.append(write(src, dst))
        n += inflight
        if time.perf_counter() >= deadline:
            break
    elapsed = time.perf_counter() - t0
    while q:
        await q.popleft()
    return n, elapsed


async def _initiator(provider: str, conn, args, settings: dict) -> dict:
    addr_b, desc_b = conn.recv()
    peer = af.Address.from_bytes(addr_b)
    desc = af.RegionDescriptor.from_bytes(desc_b)
    out: dict = {"bw": {}, "rate": None, "rtt": None}
    async with af.open_engine(provider, **settings) as eng:
        conn.send(eng.address.to_bytes())
        buf = bytearray(MAX)
        region = eng.register(buf)
        for size in args.sizes:
            ops, el = await _keep_in_flight(eng, region[0:size], desc[0:size], args.inflight, args.seconds)
            out["bw"][size] = {"ops_per_s": ops / el, "gbit_per_s": ops * size * 8 / el / 1e9}
        ops, el = await _rate(eng, region[0:4096], desc[0:4096], 64, args.seconds)
        out["rate"] = {"ops_per_s": ops / el}
        pong = eng.imm_counter(RTT_IMM_PONG)
        samples = []
        for i in range(args.rtt_iters + 1000):
            t = time.perf_counter()
            sent = eng.notify(peer, RTT_IMM_PING)
            await pong.wait(1)
            await sent  # local completion; usually already there
            if i >= 1000:
                samples.append((time.perf_counter() - t) * 1e6)
        samples.sort()
        out["rtt"] = {
            "rtt_us_median": statistics.median(samples),
            "rtt_us_p99": samples[int(len(samples) * 0.99) - 1],
        }
        out["stats"] = eng.statistics().__dict__
    return out


def run_aiofabric(provider: str, args, settings: dict) -> dict:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_target, args=(provider, b, settings), daemon=True)
    p.start()
    try:
        res = asyncio.run(_initiator(provider, a, args, settings))
        a.send("stop")
    finally:
        p.join(30)
        if p.is_alive():
            p.kill()
    return res


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def wakeup_floor(iters: int = 3000) -> float:
    """Median round trip of a blocking pipe ping-pong between two processes:
    what two thread wake-ups cost on this machine (a loop that sleeps between
    events pays at least this per round trip; a busy-polling C program does not)."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        for _ in range(iters):
            os.read(r1, 1)
            os.write(w2, b"x")
        os._exit(0)
    samples = []
    for _ in range(iters):
        t = time.perf_counter()
        os.write(w1, b"x")
        os.read(r2, 1)
        samples.append((time.perf_counter() - t) * 1e6)
    os.waitpid(pid, 0)
    for fd in (r1, w1, r2, w2):
        os.close(fd)
    return statistics.median(samples[iters // 5:])


def _raw_suite(args) -> dict:
    raw: dict = {"bw": {}}
    for size in args.sizes:
        raw["bw"][size] = run_raw(args.provider, "bw", size=size, inflight=args.inflight, seconds=args.seconds)
    raw["rate"] = run_raw(args.provider, "rate", size=4096, inflight=64, seconds=args.seconds)
    raw["rtt"] = run_raw(args.provider, "rtt", iters=args.rtt_iters)
    return raw


def _metrics(run: dict, sizes) -> dict[str, float]:
    """Flatten one suite's results: name -> value."""
    out = {f"bw {s}": run["bw"][s]["gbit_per_s"] for s in sizes}
    out["rate"] = run["rate"]["ops_per_s"]
    out["rtt"] = run["rtt"]["rtt_us_median"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=1.0, help="per workload and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating aiofabric/raw rounds; medians are reported")
    ap.add_argument("--rtt-iters", type=int, default=5000)
    ap.add_argument("--direct-post", action="store_true", help="caller thread posts (see docs/design.md)")
    ap.add_argument("--loop-spin-us", type=int, default=None, help="event-loop polling window (EngineConfig.loop_spin_us)")
    ap.add_argument("--spin-us", type=int, default=None, help="worker polling window (EngineConfig.spin_us)")
    ap.add_argument("--poll-pause-ns", type=int, default=None, help="worker pause between polls (EngineConfig.poll_pause_ns)")
    ap.add_argument("--no-raw", action="store_true", help="skip the raw C baseline")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or args.inflight < 1:
        ap.error("--rounds, --seconds and --inflight must be positive")
    settings: dict = {"direct_post": True} if args.direct_post else {}
    if args.loop_spin_us is not None:
        settings["loop_spin_us"] = args.loop_spin_us
    if args.spin_us is not None:
        settings["spin_us"] = args.spin_us
    if args.poll_pause_ns is not None:
        settings["poll_pause_ns"] = args.poll_pause_ns
    af_runs, raw_runs = [], []
    for _ in range(args.rounds):  # alternate, so drift on a noisy machine hits both alike
        af_runs.append(run_aiofabric(args.provider, args, settings))
        if not args.no_raw:
            raw_runs.append(_raw_suite(args))
    a_med = {k: statistics.median(_metrics(r, args.sizes)[k] for r in af_runs) for k in _metrics(af_runs[0], args.sizes)}
    r_med = ({k: statistics.median(_metrics(r, args.sizes)[k] for r in raw_runs) for k in a_med}
             if raw_runs else {})

    def row(name: str, key: str, unit: str, fmt: str, lower_is_better: bool = False) -> None:
        a, r = a_med[key], r_med.get(key)
        ratio = (r / a if lower_is_better else a / r) if r else None
        rs = format(r, fmt) if r is not None else "-"
        print(f"{name:<22}{format(a, fmt):>12} {unit:<5}{rs:>12} {unit:<5}{(f'{ratio:.2f}' if ratio else '-'):>7}")

    print(f"provider {args.provider}  libfabric {af.fabric_version()}  {platform.node()}  {os.cpu_count()} cpus  "
          f"in flight {args.inflight}  {args.rounds} rounds x {args.seconds}s  settings {settings or 'default'}")
    print(f"{'workload (medians)':<22}{'aiofabric':>18}{'raw C':>18}{'ratio':>7}")
    for size in args.sizes:
        row(f"write {_human(size)}", f"bw {size}", "Gb/s", ".2f")
    row("4 KiB rate (64 fl.)", "rate", "/s", ",.0f")
    row("notify round trip", "rtt", "us", ".1f", lower_is_better=True)
    floor = wakeup_floor()
    print(f"{'wake-up floor':<22}{floor:>12.1f} us    (blocking pipe ping-pong between two processes)")
    print("ratio: aiofabric / raw for throughput, raw / aiofabric for the round trip (1.00 = same)")
    if args.json:
        doc = {
            "provider": args.provider,
            "libfabric": af.fabric_version(),
            "machine": {"node": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": sys.version.split()[0]},
            "commit": _commit(),
            "settings": {"inflight": args.inflight, "seconds": args.seconds, "rounds": args.rounds, **settings},
            "median": {"aiofabric": a_med, "raw": r_med},
            "wakeup_floor_us": floor,
            "runs": {"aiofabric": af_runs, "raw": raw_runs},
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=str)
    return 0


def _human(n: int) -> str:
    for unit, s in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= s and n % s == 0:
            return f"{n // s} {unit}"
    return f"{n} B"


if __name__ == "__main__":
    sys.exit(main())
