"""Weight transfer on GPUs: the CUDA quantization kernel against NumPy (bit
for bit), and updates from GPU memory into GPU memory over the NVLink path,
in one process and from a source process.  Tests marked ``gpu`` need CuPy
and a CUDA GPU (they skip with the reason otherwise); the rest run anywhere."""
from __future__ import annotations

import asyncio
import multiprocessing as mp

import numpy as np
import pytest
from _weights_peer import make_plan, source, tensors
from conftest import bounded, cuda_devices

import aiofabric as af
from aiofabric.weights import cast_gpu
from aiofabric.weights.cast import f32_to_bf16, quantize_runs
from aiofabric.weights.execute import DoubleBuffer, run_destination, run_source
from aiofabric.weights.views import dst_views, fill_src, matches, reference_dst

pytestmark = pytest.mark.asyncio
CTX = mp.get_context("spawn")


N_GPUS, WHY = cuda_devices()
gpu = pytest.mark.skipif(N_GPUS == 0, reason=WHY or "no GPU")


def _devices() -> tuple[int, int]:
    """(source GPU, destination GPU): two when there are two."""
    return (0, 1) if N_GPUS >= 2 else (0, 0)


# ------------------------------------------------------------- everywhere

async def test_gpu_module_imports_without_cupy():
    assert "quant_fp8" in cast_gpu.QUANT_SRC
    with pytest.raises(ValueError, match="block"):
        cast_gpu.quantize_runs_gpu(0, np.zeros((1, 1), np.int64), 1, 16, 0, 0, block=1025)
    if N_GPUS == 0 and WHY == "CuPy is not installed":
        with pytest.raises(af.UnavailableError, match="CuPy"):
            cast_gpu.quantize_runs_gpu(0, np.zeros((1, 1), np.int64), 1, 16, 0, 0)


# ------------------------------------------------------------- on a GPU

def _sample() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 300)) * rng.uniform(1e-3, 300, (8, 1))).astype(np.float32)
    x[1] = 0                                  # all-zero blocks: scale 1
    x[2, :128] = rng.standard_normal(128) * 1e-3
    x[2, 7] = 1000.0                          # tiny values next to a large one: subnormal codes
    x[3, 250] = -3e38                         # near the bf16 maximum
    return f32_to_bf16(x)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("rows, width, order, block", [(2, 300, "forward", 128), (1, 128, "gather", 128),
                                                       (4, 300, "gather", 128), (1, 44, "forward", 128),
                                                       (2, 300, "gather", 16), (1, 300, "forward", 100)])
async def test_quantize_kernel_matches_numpy(rows, width, order, block):
    import cupy as cp

    x = _sample().reshape(-1)
    per_row = 300
    n_rows = x.size // per_row
    starts = np.arange(n_rows, dtype=np.int64) * per_row
    if order == "gather":
        starts = starts[::-1].copy() + (per_row - width)  # rows out of order, not from a row's start
    n = n_rows // rows
    starts = starts[: n * rows].reshape(n, rows)
    nb = -(-width // block)
    want_c = np.zeros(n * rows * width, np.uint8)
    want_s = np.zeros(n * rows * nb, np.float32)
    quantize_runs(x, starts, rows, width, want_c, want_s, block=block)
    with cp.cuda.Device(0):
        src = cp.asarray(x)
        codes = cp.zeros(want_c.size, cp.uint8)
        scales = cp.zeros(want_s.size, cp.float32)
        cast_gpu.quantize_runs_gpu(src.data.ptr, starts, rows, width, codes.data.ptr, scales.data.ptr, device=0,
                                    block=block)
        cp.cuda.Device(0).synchronize()
        assert np.array_equal(codes.get(), want_c)
        assert np.array_equal(scales.get().view(np.uint32), want_s.view(np.uint32))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [True, False])
async def test_update_gpu_to_gpu_in_one_process(fp8, loop_errors):
    import cupy as cp

    s_dev, d_dev = _devices()
    pl = make_plan(2, 2, 1, fp8)
    full = tensors(31)
    engines = [await af.open_engine("shm") for _ in range(4)]
    try:
        srcs, dsts = engines[:2], engines[2:]
        regions = []
        for r, e in enumerate(srcs):
            host = np.zeros(pl.src_layout_bytes(r), np.uint8)
            fill_src(pl, r, host, full)
            with cp.cuda.Device(s_dev):
                regions.append(e.register(cp.asarray(host), remote_write=False))
        dbs = []
        for d, e in enumerate(dsts):
            with cp.cuda.Device(d_dev):
                n = pl.dst_layout_bytes(d)
                dbs.append(DoubleBuffer(e, cp.zeros(n, cp.uint8), cp.zeros(n, cp.uint8)))
        descs = [db.shadow_descriptor() for db in dbs]
        assert all(dd.gpu is not None for dd in descs)
        await bounded(asyncio.gather(
            *(run_source(e, pl, r, regions[r], descs, scratch_bytes=8192) for r, e in enumerate(srcs)),
            *(run_destination(e, pl, d, [s.address for s in srcs], buffers=dbs[d]) for d, e in enumerate(dsts))), 60)
        for d, db in enumerate(dbs):
            with cp.cuda.Device(d_dev):
                live = db.live.get()
                assert not db.shadow.get().any()
            assert db.flips == 1
            assert not matches(dst_views(pl, d, live), reference_dst(pl, d, full))
    finally:
        for e in reversed(engines):
            await e.aclose()


@gpu
@pytest.mark.gpu
async def test_update_from_a_source_process_over_cuda_ipc(loop_errors):
    """Two source processes write GPU memory of this process (CUDA IPC handles in the descriptors)."""
    import cupy as cp

    s_dev, d_dev = _devices()
    pl = make_plan(2, 2, 1, True, max_write_bytes=1024)
    blob = pl.to_bytes()
    procs = []
    try:
        for r in range(2):
            here, there = CTX.Pipe()
            proc = CTX.Process(target=source, args=("shm", blob, r, s_dev, 41, False, there), daemon=True)
            proc.start()
            procs.append((proc, here))
        addrs = []
        for proc, here in procs:
            assert await asyncio.to_thread(here.poll, 120), "source process did not start"
            addrs.append(af.Address.from_bytes(here.recv()))
        async with af.open_engine("shm") as d0, af.open_engine("shm") as d1:
            dbs = []
            for d, e in enumerate((d0, d1)):
                with cp.cuda.Device(d_dev):
                    n = pl.dst_layout_bytes(d)
                    dbs.append(DoubleBuffer(e, cp.zeros(n, cp.uint8), cp.zeros(n, cp.uint8)))
            waits = [asyncio.ensure_future(run_destination(e, pl, d, addrs, buffers=dbs[d]))
                     for d, e in enumerate((d0, d1))]
            for _, here in procs:
                here.send((0, [db.shadow_descriptor().to_bytes() for db in dbs]))
            await bounded(asyncio.gather(*waits), 120)
            for _, here in procs:
                msg = await asyncio.to_thread(here.recv)
                assert msg[0] == "done", msg
                here.send("exit")
            full = tensors(41)
            for d, db in enumerate(dbs):
                with cp.cuda.Device(d_dev):
                    live = db.live.get()
                assert not matches(dst_views(pl, d, live), reference_dst(pl, d, full))
    finally:
        for proc, _ in procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
