"""ExpertParallel over the fabric (host memory): ranks as engines in one
process and as separate processes, on shm and tcp; results equal the NumPy
reference bit for bit; bad input is refused naming the argument; a killed
rank fails the others' waits with BrokenResourceError instead of a hang."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
from conftest import bounded

import _moe_peer
import aiofabric as af
from aiofabric.moe import ExpertParallel, MoEConfig
from aiofabric.moe.host import moe_imm

pytestmark = pytest.mark.asyncio
CTX = mp.get_context("spawn")


async def group(provider: str, cfg: MoEConfig, **kw):
    engines = [await af.open_engine(provider, **kw) for _ in range(cfg.ranks)]
    eps = [ExpertParallel(e, r, cfg) for r, e in enumerate(engines)]
    infos = [ep.info() for ep in eps]
    for ep in eps:
        ep.connect(infos)
    return engines, eps


async def close_all(engines, eps) -> None:
    for ep in eps:
        ep.close()
    for e in reversed(engines):
        await e.aclose()


@pytest.mark.parametrize("provider", ["shm", "tcp;ofi_rxm", "udp;ofi_rxd"])
@pytest.mark.parametrize("ranks, epr, k, mode, cdt", [
    (2, 3, 4, "fp8", "bf16"),
    (3, 2, 3, "bf16", "float32"),
    (4, 2, 8, "float32", "bf16"),
    (1, 4, 2, "fp8", "float32"),
])
async def test_engines_in_one_process(provider, ranks, epr, k, mode, cdt, loop_errors):
    cfg = MoEConfig(ranks * epr, ranks, 256, k, 9, mode=mode, combine_dtype=cdt)
    engines, eps = await group(provider, cfg)
    try:
        for seed in range(3):  # rounds reuse the buffers
            await _moe_peer.one_round(eps, seed)
        for e in engines:
            assert e.statistics().pending_futures == 0
    finally:
        await close_all(engines, eps)


async def test_list_expert_outputs_and_bf16_outputs(loop_errors):
    cfg = MoEConfig(8, 2, 128, 3, 5, mode="bf16")
    engines, eps = await group("shm", cfg)
    try:
        tokens, idx, w = _moe_peer.problem(cfg, 11)
        for r, ep in enumerate(eps):
            ep.dispatch_send(tokens[r], idx[r], w[r])
        ds = await bounded(asyncio.gather(*(ep.dispatch_recv() for ep in eps)))
        for r, (ep, d) in enumerate(zip(eps, ds)):
            y = _moe_peer.experts(cfg, r, d.x, d.scales, d.offsets)
            ep.combine_send([y[d.offsets[e]:d.offsets[e + 1]] for e in range(cfg.experts_per_rank)])
        outs = await bounded(asyncio.gather(*(ep.combine_recv() for ep in eps)))
        for r in range(2):
            assert _moe_peer.check(cfg, r, 11, ds[r], outs[r]) is None
    finally:
        await close_all(engines, eps)


async def test_bad_input_names_the_argument(loop_errors):
    cfg = MoEConfig(8, 2, 128, 2, 4)
    engines, eps = await group("shm", cfg)
    ep = eps[0]
    good_t = np.zeros((2, 128), np.float32)
    good_i = np.array([[0, 5], [1, -1]])
    good_w = np.ones((2, 2), np.float32)
    try:
        cases = [
            ((np.zeros((2, 128), np.float64), good_i, good_w), TypeError, "tokens"),
            (([[0.0] * 128] * 2, good_i, good_w), TypeError, "tokens"),
            ((np.zeros((2, 64), np.float32), good_i, good_w), ValueError, "tokens"),
            ((np.zeros((5, 128), np.float32), np.zeros((5, 2), int), np.ones((5, 2))), ValueError, "max_tokens"),
            ((good_t, np.array([[0, 8], [1, 2]]), good_w), ValueError, "topk_idx"),
            ((good_t, np.array([[0, -2], [1, 2]]), good_w), ValueError, "topk_idx"),
            ((good_t, np.array([[3, 3], [1, 2]]), good_w), ValueError, "topk_idx"),
            ((good_t, np.array([[0], [1]]), good_w), ValueError, "topk_idx"),
            ((good_t, good_i.astype(float), good_w), TypeError, "topk_idx"),
            ((good_t, good_i, np.ones((2, 3))), ValueError, "topk_weights"),
            ((good_t, good_i, np.ones((2, 2), int)), TypeError, "topk_weights"),
        ]
        for args, exc, name in cases:
            with pytest.raises(exc, match=name):
                ep.dispatch_send(*args)
        with pytest.raises(RuntimeError, match="out of turn"):
            await ep.dispatch_recv()
        with pytest.raises(ValueError, match="rank"):
            ExpertParallel(engines[0], 2, cfg)
        with pytest.raises(TypeError, match="config"):
            ExpertParallel(engines[0], 0, cfg.to_dict())
        with pytest.raises(ValueError, match="imm_tag"):
            ExpertParallel(engines[0], 0, cfg, imm_tag=256)
        other = ExpertParallel(engines[1], 1, MoEConfig(8, 2, 256, 2, 4))
        with pytest.raises(af.ProtocolError, match="config"):
            ep.connect([ep.info(), other.info()])
        with pytest.raises(af.ProtocolError, match="rank"):
            ep.connect([eps[1].info(), ep.info()])
        with pytest.raises(af.ProtocolError):
            ep.connect([b"junk", eps[1].info()])
        with pytest.raises(ValueError, match="infos"):
            ep.connect([ep.info()])
        other.close()
        # a full round still works after all the refusals
        for r, e in enumerate(eps):
            e.dispatch_send(good_t, good_i, good_w)
        ds = await bounded(asyncio.gather(*(e.dispatch_recv() for e in eps)))
        with pytest.raises(ValueError, match="expert_out"):
            eps[0].combine_send(np.zeros((ds[0].x.shape[0] + 1, 128), np.float32))
        with pytest.raises(TypeError, match="expert_out"):
            eps[0].combine_send(np.zeros((ds[0].x.shape[0], 128), np.float64))
        with pytest.raises(ValueError, match="expert_out"):
            eps[0].combine_send([np.zeros((1, 128), np.float32)])
        for e, d in zip(eps, ds):
            e.combine_send(np.ones((len(d.x), 128), np.float32))
        outs = await bounded(asyncio.gather(*(e.combine_recv() for e in eps)))
        # each token: ones from each of its experts, weight 1 -> number of unmasked slots
        from aiofabric.moe.numerics import bf16_to_f32
        assert bf16_to_f32(outs[0])[:, 0].tolist() == [2.0, 1.0]
    finally:
        await close_all(engines, eps)


async def test_round_mismatch_is_a_protocol_error(loop_errors):
    cfg = MoEConfig(4, 2, 128, 1, 2)
    engines, eps = await group("shm", cfg)
    try:
        t, i, w = np.zeros((1, 128), np.float32), np.array([[3]]), np.ones((1, 1), np.float32)
        eps[1]._seq = 41  # rank 1 thinks it is in another round
        eps[0].dispatch_send(t, i, w)
        eps[1].dispatch_send(t, i, w)
        res = await bounded(asyncio.gather(*(e.dispatch_recv() for e in eps), return_exceptions=True))
        assert all(isinstance(r, af.ProtocolError) for r in res), res
    finally:
        await close_all(engines, eps)


async def test_imm_layout():
    assert moe_imm(0x4D, 2, 3) == 0x4D020003
    assert moe_imm(0x4D, 3, 1023) >> 24 == 0x4D


# ------------------------------------------------------------------ across processes

def start_ranks(provider: str, cfg: MoEConfig, seeds: list, ranks: range):
    procs, conns = [], []
    for r in ranks:
        here, there = CTX.Pipe()
        p = CTX.Process(target=_moe_peer.rank_main, args=(provider, r, cfg.to_dict(), seeds, there), daemon=True)
        p.start()
        procs.append(p)
        conns.append(here)
    return procs, conns


def recv(conn, timeout: float = 60):
    if not conn.poll(timeout):
        raise AssertionError("a rank did not answer")
    return conn.recv()


@pytest.mark.parametrize("provider, ranks, mode", [
    ("shm", 2, "fp8"), ("shm", 4, "bf16"), ("tcp;ofi_rxm", 3, "fp8"),
])
async def test_ranks_as_processes(provider, ranks, mode):
    cfg = MoEConfig(4 * ranks, ranks, 256, 4, 16, mode=mode)
    seeds = [101, 102]
    procs, conns = await asyncio.to_thread(start_ranks, provider, cfg, seeds, range(ranks))
    try:
        addrs = [await asyncio.to_thread(recv, c) for c in conns]
        for c in conns:
            c.send(addrs)
        for c in conns:
            assert await asyncio.to_thread(recv, c) == "joined"
        for _ in seeds:
            results = [await asyncio.to_thread(recv, c) for c in conns]
            assert results == [None] * ranks, results
        for c in conns:
            c.send("bye")
        for p in procs:
            await asyncio.to_thread(p.join, 30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()


async def test_killed_rank_breaks_the_round_not_hangs(loop_errors):
    """Rank 0 here, ranks 1 and 2 in processes; rank 2 is SIGKILLed after the
    join.  Rank 0's and rank 1's waits fail with BrokenResourceError within
    the peer timeout."""
    provider = "shm"
    cfg = MoEConfig(6, 3, 128, 2, 4)
    procs, conns = await asyncio.to_thread(start_ranks, provider, cfg, [7], range(1, 3))
    try:
        async with af.open_engine(provider, peer_timeout=1.0) as eng:
            addrs = [eng.address.to_bytes()] + [await asyncio.to_thread(recv, c) for c in conns]
            for c in conns:
                c.send(addrs)
            ep = ExpertParallel(eng, 0, cfg)
            await bounded(ep.join([af.Address.from_bytes(a) for a in addrs]), 30)
            for c in conns:
                assert await asyncio.to_thread(recv, c) == "joined"
            os.kill(procs[1].pid, signal.SIGKILL)
            await asyncio.to_thread(procs[1].join, 10)
            tokens, idx, w = _moe_peer.problem(cfg, 7)
            t0 = time.monotonic()
            with pytest.raises(af.BrokenResourceError):
                ep.dispatch_send(tokens[0], idx[0], w[0])
                await bounded(ep.dispatch_recv(), 15)
            assert time.monotonic() - t0 < 8
            got = await asyncio.to_thread(recv, conns[0], 30)
            assert got.startswith("BrokenResourceError"), got
            with pytest.raises(RuntimeError, match="out of turn"):
                ep.dispatch_send(tokens[0], idx[0], w[0])
            ep.close()
        conns[0].send("bye")
        await asyncio.to_thread(procs[0].join, 30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
