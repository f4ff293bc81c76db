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

``--device cuda`` runs the model with CuPy: prefill on GPU 0, decode on GPU 1
(both on GPU 0 with one GPU), the KV caches are CuPy arrays registered with the
engine, so each layer's pages go GPU to GPU (NVLink) while the next layer
computes; the model's size is set by --layers/--heads/--head-dim/--ffn/--vocab
(larger defaults on the GPU).  See docs/kv-streaming.md, "GPU".

    python examples/disagg_serving.py --device cuda [--lengths 1024,4096] [--repeats 2]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, NamedTuple

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
# On the CPU the model competes with the engines' worker threads for the cores: workers that keep
# polling 20 ms after every layer's write (the default, for latency) slowed prefill's compute by
# 6-12% on a 2-core machine; 200 µs costs nothing measurable here (docs/kv-streaming.md).
CPU_ENGINE = {"spin_us": 200, "wait_spin_us": 200}


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


async def until_stopped(get, conn):
    """Items from ``await get()`` until the client says stop on ``conn``."""
    stop = asyncio.ensure_future(asyncio.to_thread(conn.recv))
    while True:
        nxt = asyncio.ensure_future(get())
        await asyncio.wait([nxt, stop], return_when=asyncio.FIRST_COMPLETED)
        if stop.done():
            nxt.cancel()
            return
        yield nxt.result()


# -- prefill ------------------------------------------------------------------------------

def prefill_main(provider: str, decoder: bytes, conn) -> None:
    async def main() -> None:
        model = Model()
        buf = np.zeros(LAYOUT.nbytes, np.uint8)
        cache = cache_view(buf)
        async with af.open_engine(provider, **CPU_ENGINE) as eng:
            region = eng.register(buf, remote_write=False)
            async with KVPrefill(eng, LAYOUT, region, hidden_bytes=HIDDEN_BYTES) as pre:
                await pre.join(af.Address.from_bytes(decoder))   # registration by message
                conn.send(eng.address.to_bytes())
                async for req in until_stopped(pre.next_request, conn):
                    await serve(pre, eng, model, cache, req)

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
        async with af.open_engine(provider, **CPU_ENGINE) as eng:
            async with KVDecoder(eng, LAYOUT, eng.register(buf), hidden_bytes=HIDDEN_BYTES) as dec:
                conn.send(eng.address.to_bytes())
                async for msg in until_stopped(dec.messages.get, conn):
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


# -- GPU (--device cuda) ------------------------------------------------------------------
#
# The same transformer written against an array module ``xp`` (CuPy on the GPU; NumPy gives
# exactly the CPU Model above, which tests/test_disagg_gpu.py checks).  On the GPU the weights
# come from CuPy's generator (seed 0) and are float32; prefill and decode build identical models.


class Cfg(NamedTuple):
    layers: int = LAYERS
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    ffn: int = FFN
    vocab: int = VOCAB
    num_blocks: int = NUM_BLOCKS

    @property
    def dm(self) -> int:
        return self.heads * self.head_dim

    @property
    def layout(self) -> KVLayout:
        return KVLayout.vllm_flash_attn(self.layers, self.num_blocks, BLOCK, self.heads, self.head_dim, itemsize=2)

    @property
    def hidden_bytes(self) -> int:
        return self.dm * 4


CPU_CFG = Cfg()
GPU_DEFAULTS = {"layers": 48, "heads": 16, "head_dim": 128, "ffn": 8192, "vocab": 4096}


class XModel:
    """Model's math over ``xp`` (numpy or cupy).  ``dtype`` None keeps the CPU Model's dtypes
    (its weights are float64 under NumPy 2's promotion rules); the GPU uses float32."""

    def __init__(self, xp: Any, cfg: Cfg, seed: int = 0, dtype: Any = None) -> None:
        self.xp, self.cfg = xp, cfg
        if xp is np:
            rng = np.random.default_rng(seed)

            def normal(shape):
                return rng.standard_normal(shape, np.float32)
        else:
            rs = xp.random.RandomState(seed)

            def normal(shape):
                return rs.standard_normal(shape, dtype=xp.float32)

        def cast(a):
            return a if dtype is None else a.astype(dtype)

        dm, ffn = cfg.dm, cfg.ffn
        s = 1 / np.sqrt(dm)
        self.emb = normal((cfg.vocab, dm))
        self.w = [dict(qkv=cast(normal((dm, 3 * dm)) * s), o=cast(normal((dm, dm)) * s),
                       up=cast(normal((dm, ffn)) * s), down=cast(normal((ffn, dm)) / np.sqrt(ffn)))
                  for _ in range(cfg.layers)]
        self.out = cast(normal((dm, cfg.vocab)) * s)

    def _norm(self, x):
        return x / self.xp.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)

    def embed(self, tokens):
        return self.emb[self.xp.asarray(np.asarray(tokens) % self.cfg.vocab)]

    def layer(self, i, x):
        """One layer over the whole prompt: returns (x', K fp16 [T,H,D], V fp16 [T,H,D])."""
        xp, H, D = self.xp, self.cfg.heads, self.cfg.head_dim
        T = x.shape[0]
        w = self.w[i]
        q, k, v = xp.split(self._norm(x) @ w["qkv"], 3, axis=1)
        q, k, v = (a.reshape(T, H, D).transpose(1, 0, 2) for a in (q, k, v))
        att = q @ k.transpose(0, 2, 1) / float(np.sqrt(D))
        att += xp.triu(xp.full((T, T), -np.inf, np.float32), 1)
        att = xp.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = (att @ v).transpose(1, 0, 2).reshape(T, H * D)
        x = x + o @ w["o"]
        x = x + xp.maximum(self._norm(x) @ w["up"], 0) @ w["down"]
        return x, k.transpose(1, 0, 2).astype(np.float16), v.transpose(1, 0, 2).astype(np.float16)

    def first_token(self, hidden):
        return int(self.xp.argmax(self._norm(self.xp.asarray(hidden)) @ self.out))


def xcache_view(buf, cfg: Cfg):
    return buf.view(np.float16).reshape(cfg.layers, 2, cfg.num_blocks, BLOCK, cfg.heads, cfg.head_dim)


def xstore(xp, cache, layer, blocks, k, v):
    """Write K and V of ``layer`` (T tokens, zero-padded to whole blocks) into ``blocks``
    (an index array of ``xp``)."""
    T, H, D = k.shape
    nb = int(blocks.shape[0])
    pad = nb * BLOCK - T
    for plane, a in ((0, k), (1, v)):
        a = xp.concatenate([a, xp.zeros((pad, H, D), np.float16)]) if pad else a
        cache[layer, plane, blocks] = a.reshape(nb, BLOCK, H, D)


def _gpu_setup(device: int) -> Any:
    import cupy as cp
    cp.cuda.Device(device).use()
    name = cp.cuda.runtime.getDeviceProperties(device)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"[{os.getpid()}] GPU {device}: {name}, CuPy {cp.__version__}", file=sys.stderr, flush=True)
    return cp


def _ref_path(refdir: str, rid: int) -> str:
    return os.path.join(refdir, f"req{rid}.npz")


def _save_ref(path: str, kv, hidden) -> None:
    with open(path + ".tmp", "wb") as f:
        np.savez(f, kv=kv, hidden=hidden)
    os.replace(path + ".tmp", path)  # decode sees the whole file or none


def gpu_prefill_main(provider: str, decoder: bytes, conn, cfg: Cfg, device: int, refdir: str) -> None:
    try:
        cp = _gpu_setup(device)
        asyncio.run(_gpu_prefill(cp, provider, decoder, conn, cfg, device, refdir))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise


async def _gpu_prefill(cp, provider, decoder, conn, cfg, device, refdir) -> None:
    model = XModel(cp, cfg, dtype=cp.float32)
    buf = cp.zeros(cfg.layout.nbytes, cp.uint8)
    cache = xcache_view(buf, cfg)
    cp.cuda.Device(device).synchronize()  # weights and zeros were made on the legacy default stream
    # The model runs on its own stream; the engine copies on its own non-blocking stream,
    # which does not wait for this one: a layer is posted only after its event completed.
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:  # warm up: kernels compiled and cuBLAS initialised before the first request
        model.layer(0, model.embed(list(range(2 * BLOCK))))
    stream.synchronize()
    async with af.open_engine(provider) as eng:
        region = eng.register(buf, remote_write=False)
        async with KVPrefill(eng, cfg.layout, region, hidden_bytes=cfg.hidden_bytes) as pre:
            await pre.join(af.Address.from_bytes(decoder))
            conn.send(eng.address.to_bytes())
            async for req in until_stopped(pre.next_request, conn):
                await _gpu_serve(cp, pre, eng, model, cache, stream, cfg, refdir, req)


async def _gpu_serve(cp, pre, eng, model, cache, stream, cfg, refdir, req) -> None:
    streaming = bool(req.meta["stream"])
    L = cfg.layers
    src = pre.pool.alloc(len(req.dst_blocks))
    with stream:
        src_dev = cp.asarray(src)
    t0 = time.monotonic()
    compute, writes = [], []

    def enqueue(layer, x):
        """Queue one layer's compute and its KV store on the model's stream; returns the
        next hidden state and an event that completes when the layer's pages are in the cache."""
        with stream:
            x, k, v = model.layer(layer, x)
            xstore(cp, cache, layer, src_dev, k, v)
            ev = cp.cuda.Event(block=False, disable_timing=True)
            ev.record(stream)
        return x, ev

    try:
        with stream:
            x = model.embed(req.tokens)
        x, ev = enqueue(0, x)
        prev_end = t0
        for layer in range(L):
            # Queue layer+1 before waiting for layer, so the GPU never idles while this
            # process waits, posts writes and runs the event loop.
            if layer + 1 < L:
                x, nxt_ev = enqueue(layer + 1, x)
            # Wait for the layer by polling its event (cudaEventQuery, ~1 us) between the loop's
            # other callbacks: the loop keeps progressing the writes in flight meanwhile.
            while not ev.done:
                await asyncio.sleep(0)
            end = time.monotonic()
            compute.append((prev_end, end))
            prev_end = end
            if streaming:
                writes.append(req.send_layer(layer, src))  # layer's pages are complete on the device
            if layer + 1 < L:
                ev = nxt_ev
        if not streaming:
            writes = [req.send_layer(layer, src) for layer in range(L)]
        with stream:
            hidden = cp.asnumpy(x[-1].astype(cp.float32), stream=stream)
        stream.synchronize()
        await req.finish(np.ascontiguousarray(hidden, np.float32))
        done = time.monotonic()
        tl = {"rid": req.meta["rid"], "t0": t0, "compute": compute, "done": done,
              "writes": [req.timeline[layer] for layer in range(L)]}
        # The reference for decode's check: prefill's own pages, copied to host after the request.
        with stream:
            kv = cp.asnumpy(cache[:, :, src_dev], stream=stream)
        stream.synchronize()
        await asyncio.to_thread(_save_ref, _ref_path(refdir, req.meta["rid"]), kv, hidden)
        await eng.send(af.Address.from_bytes(req.meta["client"]), pack({"t": "timeline", **tl}))
    except (RequestAborted, af.BrokenResourceError) as exc:
        print(f"prefill: request {req.id} dropped: {exc}", file=sys.stderr)
    finally:
        pre.pool.free(src)


def gpu_decode_main(provider: str, conn, cfg: Cfg, device: int, refdir: str) -> None:
    try:
        cp = _gpu_setup(device)
        asyncio.run(_gpu_decode(cp, provider, conn, cfg, device, refdir))
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise


async def _gpu_decode(cp, provider, conn, cfg, device, refdir) -> None:
    model = XModel(cp, cfg, dtype=cp.float32)
    buf = cp.zeros(cfg.layout.nbytes, cp.uint8)
    cache = xcache_view(buf, cfg)
    cp.cuda.Device(device).synchronize()
    async with af.open_engine(provider) as eng:
        async with KVDecoder(eng, cfg.layout, eng.register(buf), hidden_bytes=cfg.hidden_bytes) as dec:
            conn.send(eng.address.to_bytes())
            async for msg in until_stopped(dec.messages.get, conn):
                d = unpack(msg.data)
                if d.get("t") != "prompt":
                    continue
                while not dec.prefills:
                    await asyncio.sleep(0.01)
                client = msg.sender
                meta = {"stream": d["stream"], "rid": d["rid"], "client": client.to_bytes()}
                req = await dec.submit(d["tokens"], meta=meta)
                landed = []
                for layer in range(cfg.layers):
                    await req.layer(layer)
                    landed.append(time.monotonic())
                hidden = np.frombuffer(await req.result(), np.float32).copy()
                token = model.first_token(hidden)
                await eng.send(client, pack({"t": "token", "rid": d["rid"], "token": token, "landed": landed,
                                             "final": time.monotonic()}))
                path = _ref_path(refdir, d["rid"])
                deadline = time.monotonic() + 120
                while not os.path.exists(path) and time.monotonic() < deadline:
                    await asyncio.sleep(0.005)
                try:
                    res = await asyncio.to_thread(gpu_verify, cp, device, model, cache, req.blocks, d["tokens"],
                                                  hidden, path)
                except Exception as exc:  # noqa: BLE001 - reported to the client, with the traceback here
                    traceback.print_exc()
                    res = {"ok": False, "pages": 0, "why": f"{type(exc).__name__}: {exc}"}
                req.release()
                if not res["ok"]:
                    print(f"decode: request {d['rid']} FAILED verification: {res}", file=sys.stderr, flush=True)
                await eng.send(client, pack({"t": "verified", "rid": d["rid"], **res}))


def gpu_verify(cp, device, model, cache, blocks, tokens, hidden, ref_path) -> dict:
    """Check what landed in decode's cache, every page byte for byte, against prefill's own
    pages (copied to host by prefill after the request: this checks the transfer exactly), and
    against decode's recomputation with the same CuPy code (this checks the model and the page
    placement; exact when both GPUs are of one kind, reported with the largest difference)."""
    cfg = model.cfg
    with cp.cuda.Device(device):
        idx = cp.asarray(np.asarray(blocks, np.int64))
        got_dev = cache[:, :, idx]                        # [L, 2, nb, BLOCK, H, D] fp16
        got = cp.asnumpy(got_dev)
        with np.load(ref_path) as ref:
            want, want_hidden = ref["kv"], ref["hidden"]
        os.unlink(ref_path)
        if want.shape != got.shape:
            return {"ok": False, "pages": 0, "why": f"reference shape {want.shape}, received {got.shape}"}
        same = (got.view(np.uint8).reshape(cfg.layers, 2, len(blocks), -1)
                == want.view(np.uint8).reshape(cfg.layers, 2, len(blocks), -1)).all(-1)
        pages = int(same.size)
        bad_pages = int(pages - same.sum())
        hidden_ok = want_hidden.tobytes() == np.asarray(hidden, np.float32).tobytes()
        # Recompute with the model, layer by layer, and compare with what landed.
        T = len(tokens)
        x = model.embed(tokens)
        recompute_bad, maxdiff = 0, 0.0
        for layer in range(cfg.layers):
            x, k, v = model.layer(layer, x)
            for plane, a in ((0, k), (1, v)):
                g = got_dev[layer, plane].reshape(-1, cfg.heads, cfg.head_dim)
                if not bool(cp.array_equal(g[:T], a)) or bool(cp.any(g[T:] != 0)):
                    recompute_bad += 1
                    maxdiff = max(maxdiff, float(cp.abs(g[:T].astype(cp.float32) - a.astype(cp.float32)).max()))
        x_last = cp.asnumpy(x[-1].astype(cp.float32))
        cp.cuda.Device(device).synchronize()
    scale = max(1.0, float(np.abs(want.astype(np.float32)).max()))
    recompute_ok = recompute_bad == 0 or maxdiff <= 1e-2 * scale
    return {"ok": bool(bad_pages == 0 and hidden_ok and recompute_ok), "pages": pages, "bad_pages": bad_pages,
            "hidden_ok": bool(hidden_ok), "recompute_exact": recompute_bad == 0 and x_last.tobytes() == hidden.tobytes(),
            "recompute_maxdiff": maxdiff}


# -- client -------------------------------------------------------------------------------

async def _recv_or_die(conn, proc, what: str):
    """The address a server process sends once it is up; fail clearly if it died instead."""
    fut = asyncio.ensure_future(asyncio.to_thread(conn.recv))
    while not fut.done():
        await asyncio.wait([fut], timeout=0.5)
        if not fut.done() and not proc.is_alive():
            raise RuntimeError(f"the {what} process exited with code {proc.exitcode} before it was ready "
                               "(its traceback is above)")
    return fut.result()


async def client(provider: str, lengths: list[int], repeats: int, png: str, device: str = "cpu",
                 cfg: Cfg = CPU_CFG, gpus: tuple[int, int] = (0, 0)) -> int:
    LAYERS, VOCAB, LAYOUT = cfg.layers, cfg.vocab, cfg.layout  # the run's model
    ctx = mp.get_context("spawn")
    d_here, d_there = ctx.Pipe()
    p_here, p_there = ctx.Pipe()
    refdir = ""
    if device == "cuda":  # prefill's reference pages for decode's check: in memory when /dev/shm has room
        shm_ok = os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 3 * LAYOUT.nbytes
        refdir = tempfile.mkdtemp(prefix="disagg-ref-", dir="/dev/shm" if shm_ok else None)
    if device == "cuda":
        dproc = ctx.Process(target=gpu_decode_main, args=(provider, d_there, cfg, gpus[1], refdir), daemon=True)
    else:
        dproc = ctx.Process(target=decode_main, args=(provider, d_there), daemon=True)
    dproc.start()
    decoder = await _recv_or_die(d_here, dproc, "decode")
    if device == "cuda":
        pproc = ctx.Process(target=gpu_prefill_main, args=(provider, decoder, p_there, cfg, gpus[0], refdir),
                            daemon=True)
    else:
        pproc = ctx.Process(target=prefill_main, args=(provider, decoder, p_there), daemon=True)
    pproc.start()
    await _recv_or_die(p_here, pproc, "prefill")
    dec_addr = af.Address.from_bytes(decoder)
    rng = np.random.default_rng(1)
    results, timelines, tokens, recompute = {}, {}, {}, []
    bad = 0
    async with af.open_engine(provider, **(CPU_ENGINE if device == "cpu" else {})) as eng:
        try:
            # streaming and not take turns going first (the first request at a new length runs colder)
            plan = [(64, True, "warmup")] + [(n, s, r) for r in range(repeats) for n in lengths
                                             for s in ((True, False) if r % 2 == 0 else (False, True))]
            for rid, (n, stream, rep) in enumerate(plan):
                prompt = rng.integers(0, VOCAB, n).tolist()
                t0 = time.monotonic()
                await eng.send(dec_addr, pack({"t": "prompt", "rid": rid, "tokens": prompt, "stream": stream}))
                got = {}
                deadline = time.monotonic() + 120
                while "verified" not in got or "timeline" not in got:
                    try:
                        m = unpack((await asyncio.wait_for(eng.recv(), 2)).data)
                    except asyncio.TimeoutError:
                        if time.monotonic() < deadline and pproc.is_alive() and dproc.is_alive():
                            continue
                        raise RuntimeError(f"request {rid} ({n} tokens, stream={stream}): no answer, got "
                                           f"{sorted(got)}; prefill exit code {pproc.exitcode}, decode exit code "
                                           f"{dproc.exitcode} (None: still running; tracebacks above)") from None
                    if m["t"] == "token":
                        m["ttft"] = time.monotonic() - t0
                    got[m["t"]] = m
                if not got["verified"]["ok"]:
                    bad += 1
                    print(f"request {rid}: verification FAILED: {got['verified']}", file=sys.stderr)
                if "recompute_exact" in got["verified"] and rep != "warmup":
                    recompute.append((got["verified"]["recompute_exact"], got["verified"]["recompute_maxdiff"]))
                results[rid] = (n, stream, rep, got["token"]["ttft"], got["verified"]["pages"], got["verified"]["ok"])
                timelines[rid] = (got["timeline"], got["token"])
                tokens[rid] = got["token"]["token"]
        finally:
            p_here.send("stop")
            await asyncio.to_thread(pproc.join, 20)
            d_here.send("stop")
            await asyncio.to_thread(dproc.join, 20)
            if refdir:
                shutil.rmtree(refdir, ignore_errors=True)

    runs = [r for r in results.items() if r[1][2] != "warmup"]
    pages = sum(r[4] for _, r in runs)
    print(f"{provider}: {len(runs)} requests, {pages} pages ({pages * LAYOUT.page_size / 2**20:.1f} MiB) "
          f"received, every page checked byte for byte: {'all equal' if not bad else f'{bad} requests DIFFER'}")
    if device == "cuda":
        print(f"  (GPU {gpus[0]} -> GPU {gpus[1]}; checked against prefill's own pages copied to host; "
              f"decode's CuPy recomputation equal bit for bit in {sum(e for e, _ in recompute)}/{len(recompute)} "
              f"requests, largest difference {max([m for _, m in recompute] + [0.0]):.3g})")
        print(f"  model: {LAYERS} layers, {cfg.heads} heads x {cfg.head_dim}, FFN {cfg.ffn}, vocab {VOCAB}, "
              f"float32 compute, fp16 KV, {cfg.num_blocks} blocks of {BLOCK} tokens per server")
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
    # The measure: the part of the transfer time that compute hid.  Exposed = from the
    # end of the last layer's compute (prefill) to the last layer's pages landing (decode's counter).
    exposed = tok["landed"][LAYERS - 1] - tl["compute"][LAYERS - 1][1]
    hidden_frac = 1 - exposed / xfer if xfer > 0 else float("nan")
    print(f"  compute {1e3 * comp:.1f} ms in all ({big * 1e0 / comp:.0f} prompt tokens/s); KV {kv_bytes / 2**20:.1f} MiB, "
          f"writes busy {1e3 * xfer:.1f} ms ({kv_bytes / xfer / 1e9:.2f} GB/s per layer write)")
    print(f"  transfer hidden behind compute: {100 * hidden_frac:.1f}% = 1 - {1e3 * exposed:.2f} ms exposed "
          f"(last compute end -> last layer landed) / {1e3 * xfer:.2f} ms of per-layer transfers")
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
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--png", default="disagg_timeline.png")
    g = ap.add_argument_group("model size (--device cuda; the CPU model is fixed)")
    for k, v in GPU_DEFAULTS.items():
        g.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    g.add_argument("--gpus", default="", help="prefill,decode GPU numbers (default 0,1, or 0,0 with one GPU)")
    a = ap.parse_args()
    lengths = [int(x) for x in (a.lengths if a.device == "cpu" or a.lengths != "128,256,512" else "1024,4096")
               .split(",")]
    if a.device == "cpu":
        if max(lengths) > NUM_BLOCKS * BLOCK:
            sys.exit(f"prompts of at most {NUM_BLOCKS * BLOCK} tokens")
        sys.exit(asyncio.run(client(a.provider, lengths, a.repeats, a.png)))
    try:
        import cupy
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - no CuPy, no driver, no device: say which
        sys.exit(f"--device cuda needs CuPy and a CUDA GPU: {type(e).__name__}: {e}")
    if a.gpus:
        gpus = tuple(int(x) for x in a.gpus.split(","))
    else:
        gpus = (0, 1) if n_gpus >= 2 else (0, 0)
    if len(gpus) != 2 or max(gpus) >= n_gpus:
        sys.exit(f"--gpus {a.gpus!r}: two GPU numbers below {n_gpus}")
    if max(lengths) > 8192:
        sys.exit("prompts of at most 8192 tokens (the prompt travels in one 64 KiB message)")
    blocks = -(-max(max(lengths), 64) // BLOCK)
    cfg = Cfg(a.layers, a.heads, a.head_dim, a.ffn, a.vocab, num_blocks=blocks + 1)
    if cfg.layers > 254:
        sys.exit("at most 254 layers")
    print(f"GPU mode: prefill on GPU {gpus[0]}, decode on GPU {gpus[1]} ({n_gpus} visible); {cfg}", flush=True)
    sys.exit(asyncio.run(client(a.provider, lengths, a.repeats, a.png, "cuda", cfg, gpus)))
