"""Disaggregated serving: prefill and decode in two processes, KV streamed layer by layer.

A prefill server runs a small real transformer in NumPy (deterministic weights
from a seed, causal attention per layer) and writes each layer's K/V pages into
the blocks the decode server allocated as soon as that layer is computed
(aiofabric.disagg).  Decode answers the client with the first token, then
recomputes the prompt's KV itself and checks EVERY page it received, byte for
byte.  The client (this process) measures time-to-first-token with streaming
(layer L sent while layer L+1 computes) and without (all layers computed, then
all sent), on the same run, for a few prompt lengths; prints a per-layer
timeline and saves it as a PNG when matplotlib is importable.

    python examples/disagg_serving.py [--provider shm] [--lengths 128,256,512] [--repeats 2]

``--device cuda`` is not implemented (the model runs on the CPU only).
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time

for _k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
    os.environ.setdefault(_k, "lo")  # keep the example on loopback
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core per server, and bitwise reproducible
os.environ.setdefault("OMP_NUM_THREADS", "1")

import msgpack  # noqa: E402
import numpy as np  # noqa: E402

import aiofabric as af  # noqa: E402
from aiofabric.disagg import KVDecoder, KVPrefill, RequestAborted  # noqa: E402
from aiofabric.kv import KVLayout  # noqa: E402

LAYERS, HEADS, HEAD_DIM, BLOCK, VOCAB, FFN = 8, 8, 64, 16, 1024, 1024
DM = HEADS * HEAD_DIM
NUM_BLOCKS = 256  # per server: 64 MiB of fp16 KV cache
LAYOUT = KVLayout.vllm_flash_attn(LAYERS, NUM_BLOCKS, BLOCK, HEADS, HEAD_DIM, itemsize=2)
HIDDEN_BYTES = DM * 4


def pack(d):
    return msgpack.packb(d, use_bin_type=True)


def unpack(b):
    return msgpack.unpackb(b, raw=False)


class Model:
    """A pre-norm transformer with deterministic weights (seed 0)."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        s = 1 / np.sqrt(DM)
        self.emb = rng.standard_normal((VOCAB, DM), np.float32)
        self.w = [dict(qkv=(rng.standard_normal((DM, 3 * DM), np.float32) * s),
                       o=(rng.standard_normal((DM, DM), np.float32) * s),
                       up=(rng.standard_normal((DM, FFN), np.float32) * s),
                       down=(rng.standard_normal((FFN, DM), np.float32) / np.sqrt(FFN)))
                  for _ in range(LAYERS)]
        self.out = rng.standard_normal((DM, VOCAB), np.float32) * s

    @staticmethod
    def _norm(x):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)

    def embed(self, tokens):
        return self.emb[np.asarray(tokens) % VOCAB]

    def layer(self, i, x):
        """One layer over the whole prompt: returns (x', K fp16 [T,H,D], V fp16 [T,H,D])."""
        T = x.shape[0]
        w = self.w[i]
        q, k, v = np.split(self._norm(x) @ w["qkv"], 3, axis=1)
        q, k, v = (a.reshape(T, HEADS, HEAD_DIM).transpose(1, 0, 2) for a in (q, k, v))
        att = q @ k.transpose(0, 2, 1) / np.sqrt(HEAD_DIM)
        att += np.triu(np.full((T, T), -np.inf, np.float32), 1)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = (att @ v).transpose(1, 0, 2).reshape(T, DM)
        x = x + o @ w["o"]
        x = x + np.maximum(self._norm(x) @ w["up"], 0) @ w["down"]
        return x, k.transpose(1, 0, 2).astype(np.float16), v.transpose(1, 0, 2).astype(np.float16)

    def first_token(self, hidden):
        return int(np.argmax(self._norm(hidden) @ self.out))


def cache_view(buf):
    return buf.view(np.float16).reshape(LAYERS, 2, NUM_BLOCKS, BLOCK, HEADS, HEAD_DIM)


def store(cache, layer, blocks, k, v):
    T = k.shape[0]
    pad = len(blocks) * BLOCK - T
    for plane, a in ((0, k), (1, v)):
        a = np.concatenate([a, np.zeros((pad, HEADS, HEAD_DIM), np.float16)]) if pad else a
        cache[layer, plane, blocks] = a.reshape(len(blocks), BLOCK, HEADS, HEAD_DIM)


# -- prefill ------------------------------------------------------------------------------

def prefill_main(provider: str, decoder: bytes, conn) -> None:
    async def main() -> None:
        model = Model()
        buf = np.zeros(LAYOUT.nbytes, np.uint8)
        cache = cache_view(buf)
        async with af.open_engine(provider) as eng:
            region = eng.register(buf, remote_write=False)
            async with KVPrefill(eng, LAYOUT, region, hidden_bytes=HIDDEN_BYTES) as pre:
                await pre.join(af.Address.from_bytes(decoder))   # registration by message
                conn.send(eng.address.to_bytes())
                stop = asyncio.ensure_future(asyncio.to_thread(conn.recv))
                while True:
                    nxt = asyncio.ensure_future(pre.next_request())
                    await asyncio.wait([nxt, stop], return_when=asyncio.FIRST_COMPLETED)
                    if stop.done():
                        nxt.cancel()
                        break
                    await serve(pre, eng, model, cache, nxt.result())

    async def serve(pre, eng, model, cache, req) -> None:
        stream = bool(req.meta["stream"])
        src = pre.pool.alloc(len(req.dst_blocks))
        t0 = time.monotonic()
        compute, writes = [], []
        try:
            x = model.embed(req.tokens)
            for layer in range(LAYERS):
                c0 = time.monotonic()
                x, k, v = await asyncio.to_thread(model.layer, layer, x)  # the loop stays free to progress writes
                store(cache, layer, src, k, v)
                compute.append((c0, time.monotonic()))
                if stream:
                    writes.append(req.send_layer(layer, src))
            if not stream:
                writes = [req.send_layer(layer, src) for layer in range(LAYERS)]
            await req.finish(np.ascontiguousarray(x[-1], np.float32))
            done = time.monotonic()
            tl = {"rid": req.meta["rid"], "t0": t0, "compute": compute, "done": done,
                  "writes": [req.timeline[layer] for layer in range(LAYERS)]}
            await eng.send(af.Address.from_bytes(req.meta["client"]), pack({"t": "timeline", **tl}))
        except (RequestAborted, af.BrokenResourceError) as exc:
            print(f"prefill: request {req.id} dropped: {exc}", file=sys.stderr)
        finally:
            pre.pool.free(src)

    asyncio.run(main())


# -- decode -------------------------------------------------------------------------------

def decode_main(provider: str, conn) -> None:
    async def main() -> None:
        model = Model()
        buf = np.zeros(LAYOUT.nbytes, np.uint8)
        cache = cache_view(buf)
        async with af.open_engine(provider) as eng:
            async with KVDecoder(eng, LAYOUT, eng.register(buf), hidden_bytes=HIDDEN_BYTES) as dec:
                conn.send(eng.address.to_bytes())
                stop = asyncio.ensure_future(asyncio.to_thread(conn.recv))
                while True:
                    nxt = asyncio.ensure_future(dec.messages.get())
                    await asyncio.wait([nxt, stop], return_when=asyncio.FIRST_COMPLETED)
                    if stop.done():
                        nxt.cancel()
                        break
                    msg = nxt.result()
                    d = unpack(msg.data)
                    if d.get("t") == "prompt":
                        while not dec.prefills:
                            await asyncio.sleep(0.01)
                        await handle(eng, dec, model, cache, msg.sender, d)

    async def handle(eng, dec, model, cache, client, d) -> None:
        meta = {"stream": d["stream"], "rid": d["rid"], "client": client.to_bytes()}
        req = await dec.submit(d["tokens"], meta=meta)
        landed = []
        for layer in range(LAYERS):
            await req.layer(layer)
            landed.append(time.monotonic())
        hidden = np.frombuffer(await req.result(), np.float32)
        token = model.first_token(hidden)
        await eng.send(client, pack({"t": "token", "rid": d["rid"], "token": token, "landed": landed,
                                     "final": time.monotonic()}))
        ok, pages = await asyncio.to_thread(verify, model, cache, req.blocks, d["tokens"], hidden)
        req.release()
        await eng.send(client, pack({"t": "verified", "rid": d["rid"], "ok": ok, "pages": pages}))

    asyncio.run(main())


def verify(model, cache, blocks, tokens, hidden):
    """Recompute the prompt's KV and compare every received page byte for byte."""
    x = model.embed(tokens)
    want = np.zeros((LAYERS, 2, len(blocks), BLOCK, HEADS, HEAD_DIM), np.float16)
    for layer in range(LAYERS):
        x, k, v = model.layer(layer, x)
        pad = len(blocks) * BLOCK - len(tokens)
        for plane, a in ((0, k), (1, v)):
            a = np.concatenate([a, np.zeros((pad, HEADS, HEAD_DIM), np.float16)]) if pad else a
            want[layer, plane] = a.reshape(len(blocks), BLOCK, HEADS, HEAD_DIM)
    pages = 0
    ok = True
    for layer in range(LAYERS):
        for plane in (0, 1):
            for j, b in enumerate(blocks):
                pages += 1
                ok &= cache[layer, plane, b].tobytes() == want[layer, plane, j].tobytes()
    ok &= np.ascontiguousarray(x[-1], np.float32).tobytes() == hidden.tobytes()
    return bool(ok), pages


# -- client -------------------------------------------------------------------------------

async def client(provider: str, lengths: list[int], repeats: int, png: str) -> int:
    ctx = mp.get_context("spawn")
    d_here, d_there = ctx.Pipe()
    p_here, p_there = ctx.Pipe()
    dproc = ctx.Process(target=decode_main, args=(provider, d_there), daemon=True)
    dproc.start()
    decoder = await asyncio.to_thread(d_here.recv)
    pproc = ctx.Process(target=prefill_main, args=(provider, decoder, p_there), daemon=True)
    pproc.start()
    await asyncio.to_thread(p_here.recv)
    dec_addr = af.Address.from_bytes(decoder)
    rng = np.random.default_rng(1)
    results, timelines, tokens = {}, {}, {}
    bad = 0
    async with af.open_engine(provider) as eng:
        try:
            plan = [(64, True, "warmup")] + [(n, s, r) for r in range(repeats) for n in lengths for s in (True, False)]
            for rid, (n, stream, rep) in enumerate(plan):
                prompt = rng.integers(0, VOCAB, n).tolist()
                t0 = time.monotonic()
                await eng.send(dec_addr, pack({"t": "prompt", "rid": rid, "tokens": prompt, "stream": stream}))
                got = {}
                while "verified" not in got or "timeline" not in got:
                    m = unpack((await asyncio.wait_for(eng.recv(), 120)).data)
                    if m["t"] == "token":
                        m["ttft"] = time.monotonic() - t0
                    got[m["t"]] = m
                if not got["verified"]["ok"]:
                    bad += 1
                results[rid] = (n, stream, rep, got["token"]["ttft"], got["verified"]["pages"], got["verified"]["ok"])
                timelines[rid] = (got["timeline"], got["token"])
                tokens[rid] = got["token"]["token"]
        finally:
            p_here.send("stop")
            await asyncio.to_thread(pproc.join, 20)
            d_here.send("stop")
            await asyncio.to_thread(dproc.join, 20)

    runs = [r for r in results.items() if r[1][2] != "warmup"]
    pages = sum(r[4] for _, r in runs)
    print(f"{provider}: {len(runs)} requests, {pages} pages ({pages * LAYOUT.page_size / 2**20:.1f} MiB) "
          f"received, every page checked byte for byte: {'all equal' if not bad else f'{bad} requests DIFFER'}")
    # Per-layer timeline of the longest streamed request.
    big = max(lengths)
    rid = next(r for r, v in runs if v[0] == big and v[1])
    tl, tok = timelines[rid]
    t0 = tl["t0"]
    print(f"\ntimeline, {big}-token prompt, streaming (ms from the start of prefill):")
    print(" layer  compute          write posted->done   landed at decode")
    for layer in range(LAYERS):
        c0, c1 = tl["compute"][layer]
        w0, w1 = tl["writes"][layer]
        print(f"  {layer:>3}  {1e3 * (c0 - t0):6.1f}-{1e3 * (c1 - t0):6.1f}   "
              f"{1e3 * (w0 - t0):6.1f}->{1e3 * (w1 - t0):6.1f}      {1e3 * (tok['landed'][layer] - t0):6.1f}")
    kv_bytes = LAYERS * 2 * LAYOUT.blocks_for(big) * LAYOUT.page_size
    xfer = sum(w1 - w0 for w0, w1 in tl["writes"])
    comp = sum(c1 - c0 for c0, c1 in tl["compute"])
    print(f"  compute {1e3 * comp:.1f} ms in all ({big * 1e0 / comp:.0f} prompt tokens/s); KV {kv_bytes / 2**20:.1f} MiB, "
          f"writes busy {1e3 * xfer:.1f} ms ({kv_bytes / xfer / 1e9:.2f} GB/s per layer write)")
    print("\ntime to first token (client send -> first token back), median of repeats:")
    print(" tokens  KV MiB  streaming ms  not streaming ms  saved ms  streaming/not")
    for n in lengths:
        s = np.median([v[3] for _, v in runs if v[0] == n and v[1]])
        ns = np.median([v[3] for _, v in runs if v[0] == n and not v[1]])
        mib = LAYERS * 2 * LAYOUT.blocks_for(n) * LAYOUT.page_size / 2**20
        print(f" {n:>6}  {mib:6.1f}  {1e3 * s:12.1f}  {1e3 * ns:16.1f}  {1e3 * (ns - s):8.1f}  {s / ns:13.3f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib is not importable: timeline plot skipped)")
    else:
        fig, ax = plt.subplots(figsize=(8, 3))
        for layer in range(LAYERS):
            c0, c1 = tl["compute"][layer]
            w0, w1 = tl["writes"][layer]
            ax.barh(layer, 1e3 * (c1 - c0), left=1e3 * (c0 - t0), color="tab:blue")
            ax.barh(layer, max(1e3 * (w1 - w0), 0.2), left=1e3 * (w0 - t0), color="tab:orange")
        ax.set_xlabel("ms"), ax.set_ylabel("layer"), ax.set_title(f"{big} tokens: compute (blue), transfer (orange)")
        fig.tight_layout()
        fig.savefig(png)
        print(f"\ntimeline saved to {png}")
    return 1 if bad else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="shm")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--lengths", default="128,256,512")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--png", default="disagg_timeline.png")
    a = ap.parse_args()
    if a.device == "cuda":
        sys.exit("--device cuda is not implemented: the NumPy model runs on the CPU (see docs/kv-streaming.md)")
    lengths = [int(x) for x in a.lengths.split(",")]
    if max(lengths) > NUM_BLOCKS * BLOCK:
        sys.exit(f"prompts of at most {NUM_BLOCKS * BLOCK} tokens")
    sys.exit(asyncio.run(client(a.provider, lengths, a.repeats, a.png)))
