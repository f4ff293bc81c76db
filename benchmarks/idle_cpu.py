"""CPU used by an idle engine (worker thread included), per provider.

    python -m benchmarks.idle_cpu [--seconds 5]

An engine with nothing to do must not burn a core: the worker blocks on the
provider's wait fd, or backs off to sleeps of at most 1 ms where there is none.
Measured as process CPU time (user + system) over wall time, with one counter
wait pending (the worst idle case: someone awaits inbound traffic) and without.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource

for _k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
    os.environ.setdefault(_k, "lo")

import aiofabric as af  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(provider: str, seconds: float, waiting: bool) -> float:
    async with af.open_engine(provider) as eng:
        eng.register(bytearray(1 << 20))
        waiter = asyncio.ensure_future(eng.imm_counter(1).wait(1)) if waiting else None
        await asyncio.sleep(0.5)  # let the spin windows pass
        loop = asyncio.get_running_loop()
        c0, t0 = _cpu(), loop.time()
        await asyncio.sleep(seconds)
        c1, t1 = _cpu(), loop.time()
        if waiter:
            waiter.cancel()
        return (c1 - c0) / (t1 - t0) * 100


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--providers", nargs="+", default=["shm", "tcp;ofi_rxm", "udp;ofi_rxd"])
    args = ap.parse_args()
    print(f"{'provider':<14}{'idle':>12}{'idle, 1 wait pending':>24}   (% of one core)")
    for p in args.providers:
        idle = asyncio.run(measure(p, args.seconds, False))
        busy = asyncio.run(measure(p, args.seconds, True))
        print(f"{p:<14}{idle:>11.2f}%{busy:>23.2f}%")


if __name__ == "__main__":
    main()
