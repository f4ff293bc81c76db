"""MoE dispatch and combine between two ranks over the fabric (host memory,
shm), both in this process, checked against the NumPy reference.

    python examples/moe_dispatch.py
"""
from __future__ import annotations

import asyncio

import numpy as np

import aiofabric as af
from aiofabric.moe import ExpertParallel, MoEConfig, reference

RANKS, EXPERTS, HIDDEN, TOPK, TOKENS = 2, 8, 256, 2, 16


def route(rng: np.random.Generator, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """A router's output: top-k distinct experts per token and their weights."""
    logits = rng.standard_normal((tokens, EXPERTS)).astype(np.float32)
    idx = np.argsort(-logits, axis=1)[:, :TOPK]
    w = np.take_along_axis(logits, idx, axis=1)
    w = np.exp(w) / np.exp(w).sum(axis=1, keepdims=True)
    return idx.astype(np.int64), w.astype(np.float32)


async def main() -> None:
    cfg = MoEConfig(EXPERTS, RANKS, HIDDEN, TOPK, max_tokens=TOKENS, mode="fp8", combine_dtype="bf16")
    rng = np.random.default_rng(0)
    tokens = [rng.standard_normal((TOKENS, HIDDEN)).astype(np.float32) for _ in range(RANKS)]
    routes = [route(rng, TOKENS) for _ in range(RANKS)]

    engines = [await af.open_engine("shm") for _ in range(RANKS)]
    try:
        eps = [ExpertParallel(e, r, cfg) for r, e in enumerate(engines)]
        await asyncio.gather(*(ep.join([e.address for e in engines]) for ep in eps))

        # dispatch: post, then wait for the tokens of this rank's experts
        for r, ep in enumerate(eps):
            ep.dispatch_send(tokens[r], *routes[r])
        got = await asyncio.gather(*(ep.dispatch_recv() for ep in eps))

        # the "experts": expert g multiplies its tokens by (g + 1)
        outs = []
        for r, d in enumerate(got):
            x = reference.decode_tokens(d.x, d.scales, cfg.mode)
            gid = r * cfg.experts_per_rank + np.repeat(np.arange(cfg.experts_per_rank), d.counts)
            y = (x * (gid + 1)[:, None]).astype(np.float32)
            outs.append(y)
            eps[r].combine_send(y)
        combined = await asyncio.gather(*(ep.combine_recv() for ep in eps))

        # the same through the reference
        ref = reference.dispatch(tokens, [i for i, _ in routes], EXPERTS, RANKS, mode=cfg.mode)
        for r, d in enumerate(got):
            for e in range(cfg.experts_per_rank):
                x, sc, src_rank, src_token = d.expert(e)
                assert np.array_equal(x, ref[r].x[e]) and np.array_equal(sc, ref[r].scales[e])
                assert np.array_equal(src_rank, ref[r].src_rank[e]) and np.array_equal(src_token, ref[r].src_token[e])
        ys = [[outs[r][got[r].offsets[e]:got[r].offsets[e + 1]] for e in range(cfg.experts_per_rank)]
              for r in range(RANKS)]
        want = reference.combine(ys, [i for i, _ in routes], [w for _, w in routes], EXPERTS, RANKS,
                                 combine_dtype="bf16")
        for r in range(RANKS):
            assert np.array_equal(combined[r], want[r])
        exact = (routes[0][1] * (routes[0][0] + 1)).sum(1)[:, None] * tokens[0]
        err = np.abs(reference.bf16_to_f32(combined[0]) - exact).max() / np.abs(exact).max()
        print(f"rank 0 received {got[0].counts.tolist()} tokens per expert; rank 1 {got[1].counts.tolist()}")
        print(f"dispatch and combine equal the reference bit for bit; FP8/BF16 error vs exact math {err:.1%} of the largest value")
        for ep in eps:
            ep.close()
    finally:
        for e in reversed(engines):
            await e.aclose()


if __name__ == "__main__":
    asyncio.run(main())
