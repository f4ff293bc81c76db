"""Writes, immediates, counters and messages between two engines in one
process, on every local provider.  No test relies on arrival order."""
from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

import aiofabric as af
from conftest import bounded

pytestmark = pytest.mark.asyncio


async def test_write_with_imm_lands_byte_for_byte(pair):
    a, b = pair
    src = bytearray(random.randbytes(1 << 16))
    dst = bytearray(1 << 16)
    ra, rb = a.register(src), b.register(dst)
    desc = af.RegionDescriptor.from_bytes(rb.descriptor().to_bytes())
    await bounded(a.write(ra[0:4096], desc[8192:12288], imm=7))
    await bounded(b.imm_counter(7).wait(1))
    assert dst[8192:12288] == src[0:4096]
    assert dst[:8192] == bytes(8192) and dst[12288:] == bytes(len(dst) - 12288)


async def test_random_sizes_and_offsets(pair):
    a, b = pair
    rng = random.Random(1234)
    n = 1 << 20
    src = np.frombuffer(rng.randbytes(n), dtype=np.uint8).copy()
    dst = np.zeros(n, dtype=np.uint8)
    ra, rb = a.register(src), b.register(dst)
    desc = rb.descriptor()
    expect = np.zeros(n, dtype=np.uint8)
    # Disjoint destination slots so the expected image does not depend on order.
    slot = n // 32
    futs = []
    for k in range(32):
        size = rng.randint(1, slot)
        so = rng.randint(0, n - size)
        do = k * slot + rng.randint(0, slot - size)
        futs.append(a.write(ra[so:so + size], desc[do:do + size], imm=11))
        expect[do:do + size] = src[so:so + size]
    await bounded(asyncio.gather(*futs))
    await bounded(b.imm_counter(11).wait(32))
    assert np.array_equal(dst, expect)


async def test_write_without_imm_then_notify(pair):
    a, b = pair
    src, dst = bytearray(b"\xab" * 100_000), bytearray(100_000)
    ra, rb = a.register(src), b.register(dst)
    await bounded(a.write(ra, rb.descriptor()))
    # Writes without imm tell the target nothing; a later notify does not
    # imply the write landed either (no ordering), but its local completion
    # does mean the data left.  Poll the bytes with a bound instead.
    await bounded(a.notify(b.address, 5))
    await bounded(b.imm_counter(5).wait(1))
    async with asyncio.timeout(10):
        while dst != src:
            await asyncio.sleep(0.001)


async def test_counter_fed_before_and_after_wait(pair):
    a, b = pair
    c = b.imm_counter(9)
    for _ in range(3):
        await bounded(a.notify(b.address, 9))
    async with asyncio.timeout(10):  # arrivals before any wait are kept
        while c.available < 3:
            await asyncio.sleep(0.001)
    waiter = asyncio.ensure_future(c.wait(5))
    await asyncio.sleep(0)
    assert not waiter.done()
    await bounded(asyncio.gather(a.notify(b.address, 9), a.notify(b.address, 9)))
    await bounded(waiter)
    assert c.available == 0 and c.total == 5


async def test_counter_created_after_arrivals_counts_them(pair):
    a, b = pair
    await bounded(asyncio.gather(*(a.notify(b.address, 77) for _ in range(4))))
    async with asyncio.timeout(10):
        while b.statistics().imms_received < 4:
            await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    await bounded(b.imm_counter(77).wait(4))


async def test_counters_from_several_peers(provider, loop_errors):
    target = await af.open_engine(provider)
    peers = [await af.open_engine(provider) for _ in range(3)]
    try:
        dst = bytearray(4 * 4096)
        desc = target.register(dst).descriptor()
        futs = []
        for i, p in enumerate(peers):
            r = p.register(bytearray(bytes([i + 1]) * 4096))
            futs.append(p.write(r, desc[i * 4096:(i + 1) * 4096], imm=3))
            futs.append(p.notify(target.address, 4))
        await bounded(asyncio.gather(*futs))
        await bounded(asyncio.gather(target.imm_counter(3).wait(3), target.imm_counter(4).wait(3)))
        for i in range(3):
            assert dst[i * 4096:(i + 1) * 4096] == bytes([i + 1]) * 4096
    finally:
        await target.aclose()  # the receiver first (see conftest.pair)
        for p in peers:
            await p.aclose()


async def test_many_concurrent_writes(pair):
    a, b = pair
    n, size = 2000, 256
    src = bytearray(random.randbytes(n * size))
    dst = bytearray(n * size)
    ra, rb = a.register(src), b.register(dst)
    d = rb.descriptor()
    futs = [a.write(ra[i * size:(i + 1) * size], d[i * size:(i + 1) * size], imm=1) for i in range(n)]
    await bounded(asyncio.gather(*futs), 60)
    await bounded(b.imm_counter(1).wait(n), 60)
    assert dst == src
    st = a.statistics()
    assert st.writes_posted >= n and st.errors == 0


async def test_messages_roundtrip(pair):
    a, b = pair
    payloads = [random.randbytes(random.randint(0, 2000)) for _ in range(50)]
    await bounded(asyncio.gather(*(a.send(b.address, p) for p in payloads)))
    got = [await bounded(b.recv()) for _ in payloads]
    assert sorted(m.data for m in got) == sorted(payloads)  # no order assumed
    assert all(m.sender == a.address for m in got)
    big = b"z" * a.max_message_size
    await bounded(a.send(b.address, big))
    assert (await bounded(b.recv())).data == big


async def test_more_sends_than_send_slots(pair):
    a, b = pair
    n = a.config.send_slots * 3
    futs = [a.send(b.address, i.to_bytes(4, "little")) for i in range(n)]
    received = set()
    for _ in range(n):
        received.add(int.from_bytes((await bounded(b.recv())).data, "little"))
    await bounded(asyncio.gather(*futs))
    assert received == set(range(n))


async def test_message_too_large_is_rejected(pair):
    a, b = pair
    with pytest.raises(ValueError, match="max_message_size"):
        a.send(b.address, b"x" * (a.max_message_size + 1))
    assert a.statistics().sends_posted == 0


async def test_statistics_and_repr(pair):
    a, b = pair
    st = a.statistics()
    assert st.provider == a.provider and st.pending_futures == 0
    assert "TransferEngine" in repr(a) and a.address.provider == a.provider
    assert isinstance(hash(a.address), int)


async def test_readonly_buffer_is_a_write_source(pair):
    a, b = pair
    ro = a.register(b"hello world!" * 10, remote_write=False)
    with pytest.raises(ValueError, match="no descriptor"):
        ro.descriptor()
    dst = bytearray(120)
    await bounded(a.write(ro, b.register(dst).descriptor(), imm=2))
    await bounded(b.imm_counter(2).wait(1))
    assert dst == b"hello world!" * 10


async def test_region_slicing_and_views(pair):
    a, _ = pair
    r = a.register(bytearray(100))
    v = r[10:50][5:15]
    assert (v.offset, v.nbytes) == (15, 10) and len(r[-10:]) == 10
    with pytest.raises(ValueError):
        r[0:101]
    with pytest.raises(ValueError):
        r[::2]
    with pytest.raises(TypeError):
        r[3]
