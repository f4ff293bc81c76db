"""DomainGroups of several NICs, on one machine: a NIC name may repeat, so two
rails over ``lo`` (or shm) exercise striping, path choice and interoperation
between engines with different NIC counts.  The two-host rig with real,
rate-limited rails is tests/test_netrig_fabric.py."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

import aiofabric as af

from conftest import bounded

pytestmark = pytest.mark.asyncio

#: (NICs of the writer, NICs of the target)
SHAPES = [(2, 2), (1, 2), (2, 1), (4, 3), (3, 4)]


async def _domain(provider: str) -> str:
    async with af.open_engine(provider) as e:
        return e.domain


async def _engines(provider: str, na: int, nb: int, **settings):
    dom = await _domain(provider)
    a = await af.open_engine(provider, nics=[dom] * na, **settings)
    b = await af.open_engine(provider, nics=[dom] * nb, **settings)
    return a, b


async def _close(a, b) -> None:
    for e in (a, b):
        assert e.statistics().pending_futures == 0
    await b.aclose()
    await a.aclose()


async def _settle(counter: af.ImmCounter, engine, expected: int) -> None:
    """Wait for ``expected`` arrivals, then check no extra immediate follows."""
    await bounded(counter.wait(expected))
    await asyncio.sleep(0.05)
    assert counter.available == 0, "more immediates arrived than the operation documents"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_striped_write_is_exact_and_uses_every_path(provider, shape, loop_errors):
    na, nb = shape
    a, b = await _engines(provider, na, nb, stripe_threshold=64 * 1024)
    try:
        assert a.nics == (a.domain,) * na and len(b.address.nics) == nb
        paths = max(na, nb)
        assert a.paths(b.address) == paths
        size = 3 * 1024 * 1024 + 12345  # not a multiple of the shard size
        src = np.random.default_rng(na * 10 + nb).integers(0, 256, size, dtype=np.uint8)
        dst = np.zeros(size + 8192, np.uint8)
        rs, rd = a.register(src, remote_write=False), b.register(dst)
        c = b.imm_counter(11)
        await bounded(a.write(rs, rd.descriptor()[4096 : 4096 + size], imm=11))
        await _settle(c, b, 1)  # one immediate per write, however it is striped
        assert np.array_equal(dst[4096 : 4096 + size], src)
        assert not dst[:4096].any() and not dst[4096 + size :].any()
        per_nic = a.statistics().bytes_per_nic
        assert len(per_nic) == na and sum(per_nic) == size
        assert all(n > 0 for n in per_nic), per_nic
        assert b.statistics().imms_received == 1
    finally:
        await _close(a, b)


async def test_short_writes_take_the_paths_in_turn(provider, loop_errors):
    a, b = await _engines(provider, 2, 2)
    try:
        src = bytearray(range(256)) * 16
        dst = bytearray(len(src) * 8)
        rs, rd = a.register(src, remote_write=False), b.register(dst)
        desc = rd.descriptor()
        c = b.imm_counter(1)
        n = len(src)
        await bounded(asyncio.gather(*(a.write(rs, desc[k * n : (k + 1) * n], imm=1) for k in range(8))))
        await _settle(c, b, 8)
        assert dst == src * 8
        assert a.statistics().bytes_per_nic == (4 * n, 4 * n)
    finally:
        await _close(a, b)


async def test_below_the_threshold_nothing_is_striped(provider, loop_errors):
    a, b = await _engines(provider, 2, 2, stripe_threshold=1 << 20)
    try:
        src = np.full((1 << 20) - 1, 7, np.uint8)
        dst = np.zeros(1 << 20, np.uint8)
        rs, rd = a.register(src, remote_write=False), b.register(dst)
        await bounded(a.write(rs, rd.descriptor()[0 : len(src)]))
        assert sorted(a.statistics().bytes_per_nic) == [0, len(src)]
        assert a.statistics().writes_posted == 1
    finally:
        await _close(a, b)


@pytest.mark.parametrize("shape", [(2, 2), (1, 3), (4, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
async def test_pages_split_into_one_range_per_path(provider, shape, loop_errors):
    na, nb = shape
    a, b = await _engines(provider, na, nb)
    try:
        page, n = 1024, 999
        rng = np.random.default_rng(5)
        src = rng.integers(0, 256, page * n, dtype=np.uint8)
        dst = np.zeros(page * (n + 1), np.uint8)
        rs, rd = a.register(src, remote_write=False), b.register(dst)
        sidx = rng.permutation(n).astype(np.int64)
        didx = rng.permutation(n + 1)[:n].astype(np.int64)
        c = b.imm_counter(3)
        await bounded(a.write_pages(rs, rd.descriptor(), page, sidx, didx, imm=3))
        await _settle(c, b, n)  # one immediate per page
        got = dst.reshape(n + 1, page)
        want = src.reshape(n, page)
        assert np.array_equal(got[didx], want[sidx])
        unused = np.setdiff1d(np.arange(n + 1), didx)
        assert not got[unused].any()
        per_nic = a.statistics().bytes_per_nic
        paths = max(na, nb)
        # Page ranges per path differ by at most one page; a rail carries the
        # ranges of the paths that start on it.
        share = [sum(n * (k + 1) // paths - n * k // paths for k in range(paths) if k % na == r) for r in range(na)]
        assert per_nic == tuple(s * page for s in share)
    finally:
        await _close(a, b)


async def test_scatter_spreads_peers_over_nics(provider, loop_errors):
    dom = await _domain(provider)
    a = await af.open_engine(provider, nics=[dom, dom])
    peers = [await af.open_engine(provider) for _ in range(4)]
    try:
        src = np.arange(4096, dtype=np.uint8)
        rs = a.register(src, remote_write=False)
        bufs = [np.zeros(4096, np.uint8) for _ in peers]
        descs = [p.register(buf).descriptor() for p, buf in zip(peers, bufs)]
        await bounded(a.scatter([(rs, d) for d in descs], imm=2))
        for p, buf in zip(peers, bufs):
            await bounded(p.imm_counter(2).wait(1))
            assert np.array_equal(buf, src)
        assert a.statistics().bytes_per_nic == (2 * 4096, 2 * 4096)
    finally:
        for p in reversed(peers):
            await p.aclose()
        await a.aclose()


async def test_notify_barrier_and_messages_across_nic_counts(provider, loop_errors):
    a, b = await _engines(provider, 2, 3)
    try:
        await bounded(a.barrier([b.address] * 5, imm=9))
        await _settle(b.imm_counter(9), b, 5)
        await bounded(b.notify(a.address, 4))
        await _settle(a.imm_counter(4), a, 1)
        await bounded(a.send(b.address, b"hello over rail 0"))
        msg = await bounded(b.recv())
        assert msg.data == b"hello over rail 0" and msg.sender == a.address
        await bounded(b.send(msg.sender, b"back"))
        assert (await bounded(a.recv())).data == b"back"
    finally:
        await _close(a, b)


async def test_descriptor_keys_must_match_the_owner_nics():
    async with af.open_engine("shm", nics=["shm", "shm"]) as a:
        region = a.register(bytearray(64))
        d = region.descriptor()
        assert len(d.keys) == 2 and len(a.address.nics) == 2
        with pytest.raises(ValueError, match="1 keys for an owner with 2 NICs"):
            af.RegionDescriptor(d.owner, d.addr, d.nbytes, d.keys[:1])
        again = af.RegionDescriptor.from_bytes(d.to_bytes())
        assert again == d and again.keys == d.keys
        with pytest.raises(TypeError):
            a.paths(b"not an address")


async def test_one_provider_per_engine():
    with pytest.raises(af.UnavailableError, match="no NIC"):
        await af.open_engine("tcp;ofi_rxm", nics=["lo", "no-such-nic"])


async def test_nic_by_address():
    async with af.open_engine("tcp;ofi_rxm", nics=["127.0.0.1"]) as e:
        assert e.nics == ("lo",)
    with pytest.raises(ValueError, match="198.18.255.254"):
        await af.open_engine("tcp;ofi_rxm", nics=["198.18.255.254"])
