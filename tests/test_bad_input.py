"""Every bad argument is rejected before anything is posted: a named error,
no bytes moved, no operation left behind."""
from __future__ import annotations


import numpy as np
import pytest

import aiofabric as af
from conftest import bounded

pytestmark = pytest.mark.asyncio


async def _setup(pair):
    a, b = pair
    src = bytearray(b"\x5a" * 8192)
    dst = bytearray(8192)
    return a, b, a.register(src), b.register(dst), dst


def _nothing_posted(a, before):
    st = a.statistics()
    assert st.writes_posted == before.writes_posted and st.pending_futures == 0


@pytest.mark.parametrize(
    "make, exc",
    [
        (lambda ra, d: ((ra[0:100], d[0:200]), {}), ValueError),          # lengths differ
        (lambda ra, d: ((ra, d[0:4096]), {}), ValueError),                 # whole vs part
        (lambda ra, d: ((b"abc", d[0:3]), {}), TypeError),                 # src not registered
        (lambda ra, d: ((ra[0:16], b"desc"), {}), TypeError),              # dst not a descriptor
        (lambda ra, d: ((ra[0:16], d[0:16]), {"imm": -1}), ValueError),
        (lambda ra, d: ((ra[0:16], d[0:16]), {"imm": 1 << 32}), ValueError),
        (lambda ra, d: ((ra[0:16], d[0:16]), {"imm": 1.5}), TypeError),
        (lambda ra, d: ((ra[0:16], d[0:16]), {"imm": True}), TypeError),
        (lambda ra, d: ((ra[0:16], d[0:16]), {"imm": "7"}), TypeError),
    ],
)
async def test_write_rejects(pair, make, exc):
    a, b, ra, rb, dst = await _setup(pair)
    before = a.statistics()
    args, kw = make(ra, rb.descriptor())
    with pytest.raises(exc):
        a.write(*args, **kw)
    _nothing_posted(a, before)
    assert dst == bytes(8192)


async def test_slices_out_of_range_never_clamp(pair):
    a, b, ra, rb, dst = await _setup(pair)
    d = rb.descriptor()
    for bad in (slice(0, 8193), slice(-8193, None), slice(10, 5), slice(0, 10, 2)):
        with pytest.raises(ValueError):
            ra[bad]
        with pytest.raises(ValueError):
            d[bad]
    with pytest.raises(TypeError):
        d[1]
    with pytest.raises(TypeError):
        ra["a":"b"]


async def test_src_from_another_engine(pair):
    a, b, ra, rb, dst = await _setup(pair)
    foreign = b.register(bytearray(16))
    before = a.statistics()
    with pytest.raises(ValueError, match="another engine"):
        a.write(foreign, rb.descriptor()[0:16])
    _nothing_posted(a, before)


async def test_closed_source_region(pair):
    a, b, ra, rb, dst = await _setup(pair)
    ra.close()
    ra.close()  # idempotent
    before = a.statistics()
    with pytest.raises(af.ClosedResourceError):
        a.write(ra[0:16], rb.descriptor()[0:16])
    _nothing_posted(a, before)
    assert ra.closed


async def test_peer_with_other_provider(pair):
    a, b, ra, rb, dst = await _setup(pair)
    other = "tcp;ofi_rxm" if a.provider != "tcp;ofi_rxm" else "shm"
    async with af.open_engine(other) as c:
        d = c.register(bytearray(16)).descriptor()
        with pytest.raises(ValueError, match="provider"):
            a.write(ra[0:16], d)
        with pytest.raises(ValueError, match="provider"):
            a.notify(c.address, 1)


async def test_notify_send_recv_bad_arguments(pair):
    a, b, *_ = await _setup(pair)
    with pytest.raises(TypeError):
        a.notify(b.address.to_bytes(), 1)
    with pytest.raises(ValueError):
        a.notify(b.address, -5)
    with pytest.raises(TypeError):
        a.send("peer", b"x")
    with pytest.raises(TypeError):
        a.send(b.address, 42)
    with pytest.raises(TypeError):
        a.imm_counter("x")
    with pytest.raises(ValueError):
        a.imm_counter(1 << 33)
    with pytest.raises(ValueError):
        await a.imm_counter(1).wait(-1)
    assert a.statistics().writes_posted == 0 and a.statistics().sends_posted == 0


async def test_register_rejects(pair):
    a, *_ = await _setup(pair)
    with pytest.raises(ValueError, match="empty"):
        a.register(bytearray())
    with pytest.raises(TypeError):
        a.register(12345)
    with pytest.raises(TypeError):
        a.register(np.zeros((8, 8))[:, ::2])  # not contiguous
    with pytest.raises(ValueError, match="read-only"):
        a.register(b"immutable")  # remote_write defaults to True


async def test_corrupt_descriptor_and_address_bytes(pair):
    a, b, ra, rb, dst = await _setup(pair)
    blob = rb.descriptor().to_bytes()
    for bad in (blob[:-1], blob + b"\x00", b"", b"\xc1" * 10, blob.replace(b"af.region", b"af.regioX")):
        with pytest.raises(af.ProtocolError):
            af.RegionDescriptor.from_bytes(bad)
    with pytest.raises(af.ProtocolError):
        af.Address.from_bytes(a.address.to_bytes()[:-2])


async def test_closed_engine_rejects_everything(provider):
    e = await af.open_engine(provider)
    r = e.register(bytearray(64))
    d = r.descriptor()
    await e.aclose()
    await e.aclose()  # idempotent
    assert e.closed and r.closed
    for call in (lambda: e.write(r, d), lambda: e.notify(e.address, 1), lambda: e.send(e.address, b"x"),
                 lambda: e.register(bytearray(8))):
        with pytest.raises(af.ClosedResourceError):
            call()
    with pytest.raises(af.ClosedResourceError):
        await e.recv()
    with pytest.raises(af.ClosedResourceError):
        await e.imm_counter(1).wait(1)


async def test_open_engine_bad_arguments():
    with pytest.raises(af.UnavailableError):
        await af.open_engine("no-such-provider")
    with pytest.raises(TypeError):
        af.open_engine(provider=42)
    with pytest.raises(TypeError, match="unknown engine setting"):
        af.open_engine("shm", bogus=1)
    with pytest.raises(ValueError, match="power of two"):
        await af.open_engine("shm", sq_slots=1000)
    with pytest.raises(ValueError, match="1 to 4 NICs"):
        af.open_engine("shm", nics=["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="1 to 4 NICs"):
        af.open_engine("shm", nics=[])
    with pytest.raises(ValueError, match="non-empty"):
        af.open_engine("shm", nics=["lo", ""])
    with pytest.raises(ValueError, match="stripe_threshold"):
        await af.open_engine("shm", stripe_threshold=0)
    with pytest.raises(TypeError):
        af.open_engine("shm", nics="lo")


async def test_nics_selects_the_domain():
    async with af.open_engine("tcp;ofi_rxm", nics=["lo"]) as e:
        assert e.domain == "lo"
    with pytest.raises(af.UnavailableError, match="no-such-nic"):
        await af.open_engine("tcp;ofi_rxm", nics=["no-such-nic"])


async def test_message_larger_than_the_peer_receives(provider, loop_errors):
    async with af.open_engine(provider) as a, af.open_engine(provider, msg_size=2048) as b:
        assert b.address._body.max_frame == 2048
        with pytest.raises(ValueError, match="peer receives frames of up to 2048"):
            a.send(b.address, b"x" * 3000)
        assert a.statistics().sends_posted == 0
        await bounded(a.send(b.address, b"y" * 1500))
        assert (await bounded(b.recv())).data == b"y" * 1500
