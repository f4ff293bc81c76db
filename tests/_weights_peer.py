"""Shared pieces of the weight-transfer tests: a small model, its layouts and
synthetic weights, and a source process (spawned) that runs its part of an
update, optionally stalling mid-way so the test can kill it."""
from __future__ import annotations

import asyncio
import os
import time

for _k in ("FI_TCP_IFACE", "FI_UDP_IFACE", "FI_SOCKETS_IFACE"):
    os.environ[_k] = "lo"

import numpy as np

import aiofabric as af
from aiofabric.weights import Layout, ParamSpec, Plan, plan
from aiofabric.weights.cast import f32_to_bf16
from aiofabric.weights.execute import run_source
from aiofabric.weights.views import fill_src

#: a miniature MoE layer: column/row-parallel projections, stacked experts, a norm, a router (fp32 bias)
PARAMS = [
    ParamSpec("q_proj", (96, 64), "bf16"),
    ParamSpec("o_proj", (64, 96), "bf16"),
    ParamSpec("experts.up", (4, 48, 64), "bf16"),
    ParamSpec("experts.down", (4, 64, 48), "bf16"),
    ParamSpec("norm", (64,), "bf16"),
    ParamSpec("router.bias", (4,), "fp32"),
]
QUANTIZED = {"q_proj", "o_proj", "experts.up", "experts.down"}
DIMS = {"q_proj": 0, "o_proj": 1, "experts.up": 0, "experts.down": 0, "norm": None, "router.bias": None}
BLOCK = 16


def layouts(n_src: int = 2, tp: int = 2, replicas: int = 1, fp8: bool = True) -> tuple[Layout, Layout]:
    src = Layout.fsdp(PARAMS, n_src)
    dparams = [p._replace(dtype="fp8_e4m3") if fp8 and p.name in QUANTIZED else p for p in PARAMS]
    return src, Layout.tensor_parallel(dparams, tp, replicas=replicas, dims=DIMS, block=BLOCK)


def make_plan(n_src: int = 2, tp: int = 2, replicas: int = 1, fp8: bool = True, **kw) -> Plan:
    kw.setdefault("fp8_block", BLOCK)
    kw.setdefault("max_write_bytes", 2048)
    return plan(*layouts(n_src, tp, replicas, fp8), **kw)


def tensors(seed: int, params=PARAMS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for p in params:
        x = (rng.standard_normal(p.shape) * rng.uniform(0.01, 10)).astype(np.float32)
        out[p.name] = f32_to_bf16(x) if p.dtype == "bf16" else x
    return out


def source(provider: str, plan_bytes: bytes, rank: int, device: int | None, seed: int, stall: bool, conn) -> None:
    """Run source ``rank`` of an update of ``tensors(seed)`` (from GPU
    ``device``'s memory when not None); report the address first, then wait
    for the go (the update's version and the destinations' descriptors)."""

    async def main() -> None:
        pl = Plan.from_bytes(plan_bytes)
        buf = np.zeros(pl.src_layout_bytes(rank), np.uint8)
        fill_src(pl, rank, buf, tensors(seed))
        if device is not None:
            import cupy

            with cupy.cuda.Device(device):
                buf = cupy.asarray(buf)
        async with af.open_engine(provider, peer_timeout=1.0) as eng:
            region = eng.register(buf, remote_write=False)
            conn.send(eng.address.to_bytes())
            version, blobs = await asyncio.to_thread(conn.recv)
            dsts = [None if b is None else af.RegionDescriptor.from_bytes(b) for b in blobs]

            def progress(done: int, total: int) -> None:
                if stall and done * 2 >= total:
                    conn.send("stalled")
                    time.sleep(3600)  # hold the loop: the test kills us here

            stats = await run_source(eng, pl, rank, region, dsts, version=version, scratch_bytes=4096,
                                     progress=progress)
            conn.send(("done", dict(stats)))
            await asyncio.to_thread(conn.recv)  # until told to exit

    asyncio.run(main())


def destination(provider: str, plan_bytes: bytes, rank: int, conn) -> None:
    """A destination rank that hands out its shadow buffer and then only
    idles (its engine answers), until the test kills it."""

    async def main() -> None:
        from aiofabric.weights.execute import DoubleBuffer

        pl = Plan.from_bytes(plan_bytes)
        n = pl.dst_layout_bytes(rank)
        async with af.open_engine(provider, peer_timeout=1.0) as eng:
            bufs = DoubleBuffer(eng, np.zeros(n, np.uint8), np.zeros(n, np.uint8))
            conn.send((eng.address.to_bytes(), bufs.shadow_descriptor().to_bytes()))
            await asyncio.sleep(3600)

    asyncio.run(main())
