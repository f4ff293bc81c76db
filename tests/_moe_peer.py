"""MoE ranks for tests/test_moe_fabric.py: problems every rank derives from
one seed, the "experts", the check against the reference, and a rank process
(spawned) that joins the group and runs rounds."""
from __future__ import annotations

import asyncio
import os

for _k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
    os.environ[_k] = "lo"

import numpy as np  # noqa: E402

import aiofabric as af  # noqa: E402
from aiofabric.moe import ExpertParallel, MoEConfig, reference  # noqa: E402


def problem(cfg: MoEConfig, seed: int) -> tuple[list, list, list]:
    """Tokens, top-k ids and weights of every rank (some tokens fully masked,
    token counts differ between ranks, BF16 or float32 inputs)."""
    rng = np.random.default_rng(seed)
    tokens, idx, w = [], [], []
    for s in range(cfg.ranks):
        t = int(rng.integers(0, cfg.max_tokens + 1))
        x = rng.standard_normal((t, cfg.hidden)).astype(np.float32)
        tokens.append(reference.encode_tokens(x, "bf16")[0] if s % 2 else x)
        i = np.stack([rng.permutation(cfg.num_experts)[:cfg.topk] for _ in range(t)]) if t else \
            np.zeros((0, cfg.topk), np.int64)
        i = np.where(rng.random(i.shape) < 0.15, -1, i)
        if t:
            i[0] = -1  # one token goes nowhere
        idx.append(i)
        w.append(rng.random(i.shape).astype(np.float32))
    return tokens, idx, w


def experts(cfg: MoEConfig, rank: int, x: np.ndarray, scales, offsets) -> np.ndarray:
    """Expert ``e`` multiplies its tokens by (global id + 1) / 8 (float32 out)."""
    f = reference.decode_tokens(x, scales, cfg.mode)
    gid = rank * cfg.experts_per_rank + np.repeat(np.arange(cfg.experts_per_rank), np.diff(offsets))
    return (f * ((gid + 1) / 8).astype(np.float32)[:, None]).astype(np.float32)


def check(cfg: MoEConfig, rank: int, seed: int, d, out: np.ndarray, ybf16: bool = False) -> str | None:
    """None when this rank's dispatch result and combined tokens equal the
    reference's (``ybf16``: the experts' outputs went through BF16)."""
    tokens, idx, w = problem(cfg, seed)
    ref = reference.dispatch(tokens, idx, cfg.num_experts, cfg.ranks, mode=cfg.mode)
    mine = ref[rank]
    if not np.array_equal(d.counts, mine.counts):
        return f"rank {rank}: counts {d.counts} != {mine.counts}"
    for e in range(cfg.experts_per_rank):
        x, sc, sr, st = d.expert(e)
        if not (np.array_equal(x, mine.x[e]) and np.array_equal(sr, mine.src_rank[e])
                and np.array_equal(st, mine.src_token[e])):
            return f"rank {rank}: expert {e} received other tokens"
        if cfg.mode == "fp8" and not np.array_equal(sc, mine.scales[e]):
            return f"rank {rank}: expert {e} received other scales"
    ys = []
    for r, rd in enumerate(ref):
        offs = np.concatenate([[0], np.cumsum(rd.counts)])
        xs = np.concatenate(rd.x) if offs[-1] else np.zeros((0, cfg.hidden), rd.x[0].dtype)
        scs = np.concatenate(rd.scales) if rd.scales is not None and offs[-1] else None
        if cfg.mode == "fp8" and scs is None:
            scs = np.zeros((0, cfg.hidden // 128), np.float32)
        y = experts(cfg, r, xs, scs, offs)
        if ybf16:
            y = reference.f32_to_bf16(y)
        ys.append([y[offs[e]:offs[e + 1]] for e in range(cfg.experts_per_rank)])
    want = reference.combine(ys, idx, w, cfg.num_experts, cfg.ranks, combine_dtype=cfg.combine_dtype)[rank]
    if out.dtype != want.dtype or not np.array_equal(out, want):
        return f"rank {rank}: combined tokens differ from the reference"
    return None


async def run_round(ep: ExpertParallel, seed: int) -> tuple:
    cfg = ep.config
    tokens, idx, w = problem(cfg, seed)
    r = ep.rank
    ep.dispatch_send(tokens[r], idx[r], w[r])
    d = await ep.dispatch_recv()
    ep.combine_send(experts(cfg, r, d.x, d.scales, d.offsets))
    out = await ep.combine_recv()
    return d, out


async def one_round(eps, seed: int, seconds: float = 10.0) -> None:
    """One dispatch/combine round of ranks in this process (fabric
    backends), every rank's result checked against the reference; each wait
    bounded by ``seconds``."""
    cfg = eps[0].config
    tokens, idx, w = problem(cfg, seed)
    for r, ep in enumerate(eps):
        ep.dispatch_send(tokens[r], idx[r], w[r])
    async with asyncio.timeout(seconds):
        ds = await asyncio.gather(*(ep.dispatch_recv() for ep in eps))
    for r, (ep, d) in enumerate(zip(eps, ds)):
        ep.combine_send(experts(cfg, r, d.x, d.scales, d.offsets))
    async with asyncio.timeout(seconds):
        outs = await asyncio.gather(*(ep.combine_recv() for ep in eps))
    for r in range(cfg.ranks):
        assert check(cfg, r, seed, ds[r], outs[r]) is None


def rank_main(provider: str, rank: int, cfg_dict: dict, seeds: list, conn) -> None:
    """A rank process: sends its engine address, gets everyone's, joins,
    runs a round per seed, reports None or the first difference; then waits
    for "bye" (or is killed)."""

    async def main() -> None:
        cfg = MoEConfig.from_dict(cfg_dict)
        async with af.open_engine(provider, peer_timeout=1.0) as eng:
            conn.send(eng.address.to_bytes())
            peers = [af.Address.from_bytes(b) for b in await asyncio.to_thread(conn.recv)]
            ep = ExpertParallel(eng, rank, cfg)
            await asyncio.wait_for(ep.join(peers), 30)
            conn.send("joined")
            for seed in seeds:
                try:
                    d, out = await asyncio.wait_for(run_round(ep, seed), 30)
                    conn.send(check(cfg, rank, seed, d, out))
                except Exception as e:  # noqa: BLE001 - reported to the test
                    conn.send(f"{type(e).__name__}: {e}")
                    break
            await asyncio.to_thread(conn.recv)
            ep.close()

    asyncio.run(main())
