"""Peer failure: a peer process is SIGKILLed while this engine has writes in
flight to it, a counter wait and a recv that name it.  Every one of them must
fail with BrokenResourceError (peer and cause in the message) within a
bounded time, the engine must keep serving its other peers, and a restarted
peer must be reachable at its new address."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time

import pytest

import _peer
import aiofabric as af
from conftest import bounded

pytestmark = pytest.mark.asyncio

CTX = mp.get_context("spawn")


def start_victim(provider: str, size: int = 1 << 20):
    here, there = CTX.Pipe()
    proc = CTX.Process(target=_peer.victim, args=(provider, size, there), daemon=True)
    proc.start()
    if not here.poll(60):
        proc.kill()
        raise AssertionError("victim did not start")
    addr, desc = here.recv()
    return proc, af.Address.from_bytes(addr), af.RegionDescriptor.from_bytes(desc)


async def test_killed_peer_fails_everything_that_depends_on_it(provider, loop_errors):
    proc, peer, desc = await asyncio.to_thread(start_victim, provider)
    survivor = await af.open_engine(provider)
    async with af.open_engine(provider, peer_timeout=2.0) as eng:
        try:
            src = eng.register(bytearray(1 << 20), remote_write=False)
            await bounded(eng.write(src[0:4096], desc[0:4096], imm=1))  # the peer works
            # Keep writes in flight, a counter wait and a recv naming the peer.
            wait = asyncio.ensure_future(eng.imm_counter(5).wait(1, peer=peer))
            recv = asyncio.ensure_future(eng.recv(peer=peer))
            other_recv = asyncio.ensure_future(eng.recv())  # names nobody: unaffected
            writes = [eng.write(src, desc, imm=2) for _ in range(8)]
            await asyncio.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            results = await bounded(asyncio.gather(wait, recv, *writes, return_exceptions=True), 15)
            detected = time.monotonic() - t0
            await asyncio.to_thread(proc.join, 10)
            broken = [r for r in results if isinstance(r, af.BrokenResourceError)]
            # Writes posted before the kill may have completed; the waits cannot have.
            assert isinstance(results[0], af.BrokenResourceError), results[0]
            assert isinstance(results[1], af.BrokenResourceError), results[1]
            assert all(r is None or isinstance(r, af.BrokenResourceError) for r in results[2:]), results
            assert "failed" in str(results[0]) and repr(peer) in str(results[0])
            assert detected < 2.0 + 3.0, f"detection took {detected:.2f} s"
            print(f"\n{provider}: {len(broken)} operations failed {detected:.3f} s after the kill: {results[0]}")
            assert isinstance(eng.peer_failed(peer), af.BrokenResourceError)
            assert eng.statistics().failed_peers == 1
            # New work to the dead peer fails at once.
            with pytest.raises(af.BrokenResourceError):
                eng.write(src[0:64], desc[0:64])
            with pytest.raises(af.BrokenResourceError):
                await eng.imm_counter(5).wait(1, peer=peer)
            assert not other_recv.done()
            # Other peers are still served.
            buf = bytearray(4096)
            d2 = survivor.register(buf).descriptor()
            await bounded(eng.write(src[0:4096], d2, imm=3))
            await bounded(survivor.imm_counter(3).wait(1))
            await bounded(eng.send(survivor.address, b"still here"))
            assert (await bounded(survivor.recv())).data == b"still here"
            # A restarted peer has a new address and is reachable.
            proc2, peer2, desc2 = await asyncio.to_thread(start_victim, provider)
            try:
                assert peer2 != peer
                await bounded(eng.write(src[0:4096], desc2[0:4096]))
                assert eng.peer_failed(peer2) is None
            finally:
                proc2.kill()
                await asyncio.to_thread(proc2.join, 10)
            other_recv.cancel()
        finally:
            if proc.is_alive():
                proc.kill()
            await survivor.aclose()


async def test_peer_timeout_must_be_positive():
    with pytest.raises(ValueError, match="peer_timeout"):
        await af.open_engine("shm", peer_timeout=0)
    with pytest.raises(TypeError):
        async with af.open_engine("shm") as e:
            await e.imm_counter(1).wait(1, peer="nobody")
    with pytest.raises(TypeError):
        async with af.open_engine("shm") as e:
            await e.recv(peer=b"nobody")


async def test_waits_naming_a_live_peer_are_served(provider, loop_errors):
    async with af.open_engine(provider, peer_timeout=0.5) as a, af.open_engine(provider) as b:
        wait = asyncio.ensure_future(a.imm_counter(8).wait(2, peer=b.address))
        recv = asyncio.ensure_future(a.recv(peer=b.address))
        await asyncio.sleep(1.5)  # several probe rounds: a live peer answers them
        assert not wait.done() and not recv.done()
        await bounded(b.barrier([a.address, a.address], 8))
        await bounded(b.send(a.address, b"x"))
        await bounded(wait)
        assert (await bounded(recv)).data == b"x"
        assert a.peer_failed(b.address) is None


async def test_recv_from_one_peer_leaves_the_others(provider, loop_errors):
    async with af.open_engine(provider) as a, af.open_engine(provider) as b, af.open_engine(provider) as c:
        await bounded(b.send(a.address, b"from b"))
        await bounded(c.send(a.address, b"from c"))
        got_c = await bounded(a.recv(peer=c.address))
        assert got_c.data == b"from c"
        assert (await bounded(a.recv())).data == b"from b"


async def test_sends_stuck_at_a_dead_peer_give_their_slots_back(provider, loop_errors):
    """rxd (and shm) never complete sends to a peer that died: the engine
    replaces their message slots when it declares the peer failed, so the dead
    peer cannot take every slot that messages to live peers need."""
    if provider == "shm":
        pytest.skip("libfabric 1.17 shm: a send to a killed peer can spin for ever inside fi_send on a queue "
                    "lock the dead process held (docs/failures.md); the write-off is exercised on udp;ofi_rxd")
    live_size = 5000  # above every provider's inject size
    slots = 8
    proc, peer, _ = await asyncio.to_thread(start_victim, provider)
    # A long peer_timeout: the sends below are posted before the kill is noticed.
    async with af.open_engine(provider, send_slots=slots, peer_timeout=12) as eng, af.open_engine(provider) as live:
        try:
            await bounded(eng.send(peer, b"hello"))
            # Killed first, then sent to: no SIGSTOP, which can freeze the peer
            # while it holds its shm queue lock and wedge our fi_send for ever.
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.join, 10)
            doomed = [eng.send(peer, b"v" * 5000) for _ in range(slots + 4)]
            results = await bounded(asyncio.gather(*doomed, return_exceptions=True), 15)
            assert all(r is None or isinstance(r, af.BrokenResourceError) for r in results), results
            # (tcp may fail them itself, before the failure detector runs)
            assert any(r is not None for r in results) <= isinstance(eng.peer_failed(peer), af.BrokenResourceError)
            # Every slot is usable again: twice as many messages as slots reach a live peer.
            msgs = [bytes([k]) * live_size for k in range(2 * slots)]
            await bounded(asyncio.gather(*(eng.send(live.address, m) for m in msgs)), 15)
            got = sorted([(await bounded(live.recv())).data for _ in range(2 * slots)])
            assert got == msgs
            st = eng.statistics()
            print(f"\n{provider}: {st.sends_written_off} sends written off, {st.ops_in_flight} operations still out")
            assert st.sends_written_off <= slots
            if provider != "tcp;ofi_rxm":  # tcp fails them itself (connection refused)
                assert st.sends_written_off > 0
        finally:
            if proc.is_alive():
                proc.kill()
