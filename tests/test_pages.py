"""Paged writes, scatter and barrier: one call, many transfers, exact
immediate counts, bad input rejected before anything is posted."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

import aiofabric as af
from conftest import bounded

pytestmark = pytest.mark.asyncio


async def test_write_pages_with_strides(pair):
    a, b = pair
    rng = np.random.default_rng(5)
    page, sstride, dstride, n = 512, 768, 1024, 300
    src = rng.integers(0, 256, size=sstride * 400, dtype=np.uint8)
    dst = np.zeros(dstride * 400, dtype=np.uint8)
    ra, rb = a.register(src), b.register(dst)
    sidx = rng.choice(400, size=n, replace=False)
    didx = rng.permutation(400)[:n]
    await bounded(a.write_pages(ra, rb.descriptor(), page, sidx, didx, src_stride=sstride,
                                dst_stride=dstride, imm=12), 30)
    await bounded(b.imm_counter(12).wait(n), 30)  # one immediate per page
    expect = np.zeros_like(dst)
    for s_, d_ in zip(sidx, didx):
        expect[d_ * dstride:d_ * dstride + page] = src[s_ * sstride:s_ * sstride + page]
    assert np.array_equal(dst, expect)
    await asyncio.sleep(0.02)
    assert b.imm_counter(12).available == 0  # exactly n, not more


async def test_write_pages_many_pages_and_views(pair):
    a, b = pair
    n, page = 5000, 64  # more pages than the worker posts per pass, more than max_ops
    src = np.arange(n * page, dtype=np.uint8)
    dst = np.zeros(n * page + 4096, dtype=np.uint8)
    ra, rb = a.register(src), b.register(dst)
    idx = np.arange(n)
    view = rb.descriptor()[4096:]
    await bounded(a.write_pages(ra, view, page, idx[::-1], idx[::-1].astype(np.int32), imm=13), 60)
    await bounded(b.imm_counter(13).wait(n), 60)
    assert np.array_equal(dst[4096:], src) and not dst[:4096].any()


async def test_write_pages_empty_and_without_imm(pair):
    a, b = pair
    ra = a.register(bytearray(4096))
    dst = bytearray(4096)
    d = b.register(dst).descriptor()
    await bounded(a.write_pages(ra, d, 1024, [], []))
    assert a.statistics().writes_posted == 0
    ra.obj[:] = b"\x07" * 4096
    await bounded(a.write_pages(ra, d, 1024, [0, 1, 2, 3], [3, 2, 1, 0]))
    async with asyncio.timeout(10):
        while dst != b"\x07" * 4096:
            await asyncio.sleep(0.001)


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"page_size": 0}, ValueError),
        ({"page_size": 1.5}, TypeError),
        ({"src_pages": [0, 1], "dst_pages": [0]}, ValueError),
        ({"src_pages": [0, -1], "dst_pages": [0, 1]}, ValueError),
        ({"src_pages": [0, 16], "dst_pages": [0, 1]}, ValueError),      # src out of range
        ({"src_pages": [0, 1], "dst_pages": [0, 8]}, ValueError),       # dst out of range
        ({"src_pages": [0.0, 1.0], "dst_pages": [0, 1]}, TypeError),
        ({"src_pages": [True, False], "dst_pages": [0, 1]}, TypeError),
        ({"src_pages": [[0, 1]], "dst_pages": [[0, 1]]}, ValueError),
        ({"src_stride": 0}, ValueError),
        ({"dst_stride": 4096}, ValueError),                              # index 1 * 4096 + 256 > 2048
        ({"imm": -1}, ValueError),
    ],
)
async def test_write_pages_rejects(pair, kwargs, exc):
    a, b = pair
    ra = a.register(bytearray(4096))
    dst = bytearray(2048)
    d = b.register(dst).descriptor()
    args = {"page_size": 256, "src_pages": [0, 1], "dst_pages": [0, 1], **kwargs}
    page_size = args.pop("page_size")
    with pytest.raises(exc):
        a.write_pages(ra, d, page_size, args.pop("src_pages"), args.pop("dst_pages"), **args)
    assert a.statistics().writes_posted == 0 and a.statistics().pending_futures == 0
    assert dst == bytes(2048)


async def test_scatter_to_several_peers(provider, loop_errors):
    src_eng = await af.open_engine(provider)
    targets = [await af.open_engine(provider) for _ in range(3)]
    try:
        bufs = [bytearray(1024) for _ in targets]
        descs = [t.register(buf).descriptor() for t, buf in zip(targets, bufs)]
        r = src_eng.register(bytearray(b"".join(bytes([k + 1]) * 1024 for k in range(3))))
        await bounded(src_eng.scatter([(r[k * 1024:(k + 1) * 1024], descs[k]) for k in range(3)], imm=14))
        await bounded(asyncio.gather(*(t.imm_counter(14).wait(1) for t in targets)))
        assert [bytes(b) for b in bufs] == [bytes([k + 1]) * 1024 for k in range(3)]
        await bounded(src_eng.barrier([t.address for t in targets], 15))
        await bounded(asyncio.gather(*(t.imm_counter(15).wait(1) for t in targets)))
    finally:
        for t in targets:
            await t.aclose()
        await src_eng.aclose()


async def test_scatter_and_barrier_validate_everything_first(pair):
    a, b = pair
    r = a.register(bytearray(64))
    d = b.register(bytearray(64)).descriptor()
    with pytest.raises(ValueError):
        a.scatter([(r[0:32], d[0:32]), (r[0:32], d[0:16])])
    with pytest.raises(TypeError):
        a.scatter([(r, d), "junk"])
    with pytest.raises(TypeError):
        a.barrier([b.address, b"addr"], 1)
    with pytest.raises(ValueError):
        a.barrier([b.address], -3)
    assert a.statistics().writes_posted == 0
