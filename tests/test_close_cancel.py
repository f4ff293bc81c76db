"""Cancellation abandons waits, not transfers; closing fails what is pending."""
from __future__ import annotations

import asyncio

import pytest

import aiofabric as af
from conftest import bounded

pytestmark = pytest.mark.asyncio


async def test_cancel_write_future_keeps_engine_consistent(pair):
    a, b = pair
    src, dst = bytearray(b"\x11" * (1 << 20)), bytearray(1 << 20)
    ra, rb = a.register(src), b.register(dst)
    d = rb.descriptor()
    futs = [a.write(ra, d, imm=4) for _ in range(8)]
    for f in futs[::2]:
        f.cancel()
    # The transfers still run to completion and still deliver their immediates.
    await bounded(b.imm_counter(4).wait(8))
    async with asyncio.timeout(10):
        while a.statistics().pending_futures:
            await asyncio.sleep(0.001)
    assert all(f.done() for f in futs)
    assert dst == src
    await bounded(a.write(ra[0:8], d[0:8], imm=5))
    await bounded(b.imm_counter(5).wait(1))


async def test_cancel_counter_wait_consumes_nothing(pair):
    a, b = pair
    c = b.imm_counter(6)
    t = asyncio.create_task(c.wait(2))
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    await bounded(asyncio.gather(a.notify(b.address, 6), a.notify(b.address, 6)))
    await bounded(c.wait(2))
    assert c.available == 0


async def test_cancel_recv_loses_no_message(pair):
    a, b = pair
    t = asyncio.create_task(b.recv())
    await asyncio.sleep(0.01)
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    await bounded(a.send(b.address, b"kept"))
    assert (await bounded(b.recv())).data == b"kept"


async def test_close_region_with_writes_in_flight(pair):
    a, b = pair
    ra = a.register(bytearray(1 << 20))
    d = b.register(bytearray(1 << 20)).descriptor()
    futs = [a.write(ra, d, imm=1) for _ in range(16)]
    ra.close()  # deregistration waits for the writes to complete
    with pytest.raises(af.ClosedResourceError):
        a.write(ra, d)
    await bounded(asyncio.gather(*futs))
    await bounded(b.imm_counter(1).wait(16))
    assert a.statistics().regions == 0


async def test_close_engine_with_work_in_flight(provider, loop_errors):
    if provider == "shm":
        pytest.skip("libfabric 1.17 shm intermittently segfaults in fi_close(ep) when a same-process "
                    "peer is mid-transfer (about 1 run in 10; docs/design.md, provider hazards)")
    a = await af.open_engine(provider)
    b = await af.open_engine(provider)
    try:
        ra = a.register(bytearray(4 << 20))
        d = b.register(bytearray(4 << 20)).descriptor()
        futs = [a.write(ra, d, imm=1) for _ in range(64)]
        waiter = asyncio.ensure_future(a.imm_counter(99).wait(1))
        receiver = asyncio.ensure_future(a.recv())
        await asyncio.sleep(0)
        await a.aclose()
        results = await bounded(asyncio.gather(*futs, waiter, receiver, return_exceptions=True))
        # Every future ended: completed before the close, or failed with a clear error.
        for r in results:
            assert r is None or isinstance(r, af.ClosedResourceError), r
        assert isinstance(results[-1], af.ClosedResourceError)
        assert isinstance(results[-2], af.ClosedResourceError)
        assert ra.closed
    finally:
        await a.aclose()
        await b.aclose()


async def test_engine_open_close_many_times(provider):
    for _ in range(20):
        async with af.open_engine(provider) as e:
            e.register(bytearray(4096))


@pytest.fixture
def closed_region_gap(provider, request):
    # Measured with libfabric 1.17: shm and rxd never complete a write to a
    # revoked key; tcp completes it silently, dropping the bytes (DID NOT
    # RAISE).  On rxd the stuck write also wedges everything after it to that
    # peer, so failure detection declares the peer failed (BrokenResourceError
    # after peer_timeout): that passes.  shm keeps answering probes, so its
    # write stays pending (TimeoutError here).
    if provider != "udp;ofi_rxd":
        request.applymarker(pytest.mark.xfail(
            strict=True, raises=(TimeoutError, pytest.fail.Exception),
            reason=f"libfabric 1.17 {provider} does not report writes to a revoked key"))


async def test_write_into_closed_remote_region_fails_and_corrupts_nothing(closed_region_gap, provider):
    """The target deregistered the region, so its key is dead: the write must
    fail with a named error (verbs/efa: RemoteAccessError; tcp drops the
    connection: BrokenResourceError) and no byte may land."""
    async with af.open_engine(provider) as a, af.open_engine(provider) as b:
        dst = bytearray(8192)
        rb = b.register(dst)
        d = rb.descriptor()
        rb.close()
        ra = a.register(bytearray(b"\xee" * 8192))
        try:
            with pytest.raises(af.FabricError):
                await bounded(a.write(ra, d, imm=21), 10)
        finally:
            await asyncio.sleep(0.05)
            assert dst == bytes(8192), "a write through a revoked key landed"
            assert b.imm_counter(21).total == 0


@pytest.mark.parametrize("provider", ["tcp;ofi_rxm", "udp;ofi_rxd"])
async def test_hard_close_fails_what_is_in_flight(provider, loop_errors):
    """close_timeout=0: nothing is waited for; every pending future fails with
    ClosedResourceError.  (Not on shm: libfabric 1.17's shm crashes the *peer*
    when an endpoint closes under in-flight writes, which is why aclose() waits
    by default — see docs/design.md.)"""
    a = await af.open_engine(provider, close_timeout=0)
    b = await af.open_engine(provider)
    try:
        ra = a.register(bytearray(4 << 20))
        d = b.register(bytearray(4 << 20)).descriptor()
        futs = [a.write(ra, d, imm=1) for _ in range(64)]
        await a.aclose()
        results = await bounded(asyncio.gather(*futs, return_exceptions=True))
        assert all(r is None or isinstance(r, af.ClosedResourceError) for r in results)
        assert any(isinstance(r, af.ClosedResourceError) for r in results)
        assert a.statistics().pending_futures == 0
    finally:
        await a.aclose()
        await b.aclose()
