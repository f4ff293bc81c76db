"""Shared fixtures.  Traffic stays on loopback: the tcp/udp providers are
pinned to ``lo`` before libfabric initialises."""
from __future__ import annotations

import asyncio
import os

for _k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
    os.environ[_k] = "lo"

import pytest  # noqa: E402
import pytest_asyncio  # noqa: E402

import aiofabric as af  # noqa: E402

#: The providers every engine test runs on (rxd: the local stand-in for EFA SRD).
PROVIDERS = ("shm", "tcp;ofi_rxm", "udp;ofi_rxd")


@pytest.fixture(params=PROVIDERS)
def provider(request) -> str:
    return request.param


@pytest_asyncio.fixture
async def loop_errors():
    """Fail the test on any exception the event loop swallowed."""
    loop = asyncio.get_running_loop()
    seen: list[dict] = []
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    yield seen
    loop.set_exception_handler(None)
    assert not seen, f"event loop swallowed errors: {seen}"


@pytest_asyncio.fixture
async def pair(provider, loop_errors):
    """Two engines in this process on ``provider``; checked for leftovers."""
    a = await af.open_engine(provider)
    b = await af.open_engine(provider)
    try:
        yield a, b
        for e in (a, b):
            assert e.statistics().pending_futures == 0, "operations left in flight"
    finally:
        # The receiving side first: libfabric 1.17's shm can crash an engine that
        # still processes commands from a same-process peer whose endpoint is gone.
        await b.aclose()
        await a.aclose()


async def bounded(aw, seconds: float = 10.0):
    """Await with a timeout: no test waits forever."""
    async with asyncio.timeout(seconds):
        return await aw


def cuda_devices() -> tuple[int, str]:
    """(visible CUDA devices, why there are none) for the GPU tests' skips."""
    try:
        import cupy
    except ImportError:
        return 0, "CuPy is not installed"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - no driver, no device: any CUDA error means skip
        return 0, f"no usable CUDA device ({type(e).__name__}: {e})"
    return n, "no CUDA device" if n == 0 else ""

