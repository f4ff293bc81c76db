"""An RL weight update on one machine: two trainer ranks (FSDP shards of BF16
weights) write straight into two inference ranks (one tensor-parallel group,
FP8 with block scales for the linear weights), all four engines in this
process on ``shm``.  The plan is made once; the update runs twice (the second
time with new weights), and each inference rank checks its bytes.

    python examples/weights_update.py
"""
from __future__ import annotations

import asyncio

import numpy as np

import aiofabric as af
from aiofabric.weights import (
    DoubleBuffer,
    Layout,
    ParamSpec,
    plan,
    run_destination,
    run_source,
)
from aiofabric.weights.cast import f32_to_bf16
from aiofabric.weights.views import dst_views, fill_src, matches, reference_dst

PARAMS = [
    ParamSpec("embed", (1000, 256), "bf16"),
    ParamSpec("layers.0.q_proj", (512, 256), "bf16"),
    ParamSpec("layers.0.o_proj", (256, 512), "bf16"),
    ParamSpec("layers.0.experts.up", (8, 384, 256), "bf16"),
    ParamSpec("layers.0.experts.down", (8, 256, 384), "bf16"),
    ParamSpec("layers.0.norm", (256,), "bf16"),
]
QUANTIZED = {"layers.0.q_proj", "layers.0.o_proj", "layers.0.experts.up", "layers.0.experts.down"}
TP_DIMS = {"embed": 0, "layers.0.q_proj": 0, "layers.0.o_proj": 1, "layers.0.experts.up": 0,
           "layers.0.experts.down": 0, "layers.0.norm": None}


def weights(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {p.name: f32_to_bf16(rng.standard_normal(p.shape).astype(np.float32)) for p in PARAMS}


async def main() -> None:
    trainer = Layout.fsdp(PARAMS, 2)
    serving = Layout.tensor_parallel([p._replace(dtype="fp8_e4m3") if p.name in QUANTIZED else p for p in PARAMS],
                                     2, dims=TP_DIMS)
    pl = plan(trainer, serving)
    pl.validate()
    print(f"plan: {len(pl)} routes, immediates per (source, destination):\n{pl.expected()}")
    engines = [await af.open_engine("shm") for _ in range(4)]
    src_eng, dst_eng = engines[:2], engines[2:]
    try:
        src_bufs = [np.zeros(pl.src_layout_bytes(r), np.uint8) for r in range(2)]
        src_regions = [e.register(b, remote_write=False) for e, b in zip(src_eng, src_bufs)]
        buffers = [DoubleBuffer(e, np.zeros(pl.dst_layout_bytes(d), np.uint8),
                                np.zeros(pl.dst_layout_bytes(d), np.uint8)) for d, e in enumerate(dst_eng)]
        sources = [e.address for e in src_eng]
        for step in (1, 2):
            full = weights(step)
            for r in range(2):
                fill_src(pl, r, src_bufs[r], full)  # the trainer's new shards
            descs = [b.shadow_descriptor() for b in buffers]  # where this update goes
            stats = await asyncio.gather(
                *(run_source(e, pl, r, src_regions[r], descs, version=step) for r, e in enumerate(src_eng)),
                *(run_destination(e, pl, d, sources, version=step, buffers=buffers[d])
                  for d, e in enumerate(dst_eng)))
            for d, b in enumerate(buffers):
                bad = matches(dst_views(pl, d, b.live), reference_dst(pl, d, full))
                assert not bad, f"destination {d}: {bad}"
            sent = sum(s["bytes"] for s in stats[:2])
            print(f"update {step}: {sent} bytes, {sum(s['writes'] for s in stats[2:])} writes, verified; "
                  f"took {max(s['seconds'] for s in stats) * 1e3:.1f} ms")
    finally:
        for e in reversed(engines):
            await e.aclose()


if __name__ == "__main__":
    asyncio.run(main())
