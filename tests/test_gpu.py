"""GPU memory and the NVLink path.  Tests marked ``gpu`` need CuPy and a CUDA
GPU (they skip with the reason otherwise); the rest run everywhere and check
the CPU-side rules: the descriptor's GPU fields, and clear UnavailableErrors."""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import os

import numpy as np
import pytest
from conftest import bounded, cuda_devices

import aiofabric as af
from aiofabric import wire

pytestmark = pytest.mark.asyncio


N_GPUS, WHY = cuda_devices()
gpu = pytest.mark.skipif(N_GPUS == 0, reason=WHY or "no GPU")
PROVIDER = "shm"  # immediates after NVLink copies travel over the host fabric


def _pair() -> tuple[int, int]:
    return (0, 1) if N_GPUS >= 2 else (0, 0)


class DlpackOnly:
    """Exposes a CUDA array only through DLPack (as some frameworks do)."""

    def __init__(self, arr) -> None:
        self._arr = arr

    def __dlpack__(self, *args, **kwargs):
        return self._arr.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


# ------------------------------------------------------------- everywhere

async def test_descriptor_carries_gpu_fields():
    owner = wire.AddressBody("shm", 7, (wire.NicAddress(b"n", 0, 1),), 65536, 5, 6, 7)
    g = wire.GpuBody(1, bytes(range(64)), 0x7F0000000000)
    d = af.RegionDescriptor(af.Address(owner), 0x7F0000001000, 4096, (9,), g)
    e = af.RegionDescriptor.from_bytes(d.to_bytes())
    assert e == d and e.gpu == g and e[0:16].gpu == g
    bad = wire.encode_descriptor(wire.DescriptorBody(owner, 0, 16, (9,), wire.GpuBody(1, b"short", 0)))
    with pytest.raises(af.ProtocolError, match="64 bytes"):
        af.RegionDescriptor.from_bytes(bad)


async def test_host_write_into_a_gpu_descriptor_elsewhere_is_unavailable():
    async with af.open_engine(PROVIDER) as eng:
        src = eng.register(bytearray(64))
        other_host = eng.address._body._replace(host=eng.address._body.host ^ 1)
        d = af.RegionDescriptor(af.Address(other_host), 0x1000, 64, (0,), wire.GpuBody(0, bytes(64), 0x1000))
        with pytest.raises(af.UnavailableError):
            eng.write(src, d)


@pytest.mark.skipif(N_GPUS > 0, reason="checks the message given where CuPy is missing")
async def test_cuda_buffer_without_cupy_says_how_to_get_it():
    class FakeCuda:
        def __dlpack_device__(self):
            return (2, 0)

    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    async with af.open_engine(PROVIDER) as eng:
        with pytest.raises(af.UnavailableError, match=r"aiofabric\[gpu\]"):
            eng.register(FakeCuda())


# ------------------------------------------------------------------- GPU

@pytest.mark.gpu
@gpu
async def test_register_cupy_torch_and_dlpack():
    import cupy as cp

    async with af.open_engine(PROVIDER) as eng:
        with cp.cuda.Device(N_GPUS - 1):
            arr = cp.arange(1 << 20, dtype=cp.uint8)
        region = eng.register(arr)
        assert region.device == N_GPUS - 1 and len(region) == 1 << 20
        d = region.descriptor()
        assert d.gpu is not None and len(d.gpu.ipc) == 64 and d.gpu.device == N_GPUS - 1
        assert af.RegionDescriptor.from_bytes(d.to_bytes()) == d
        del arr  # the region keeps its memory alive
        assert int(region.obj[1000]) == 1000 % 256
        view = DlpackOnly(cp.zeros(4096, dtype=cp.float32))
        assert eng.register(view).device == 0
        with pytest.raises(TypeError):
            eng.register(cp.zeros((64, 64), dtype=cp.float32)[:, ::2])  # not contiguous
        try:
            import torch
        except ImportError:
            return
        t = torch.ones(1024, device="cuda:0")
        rt = eng.register(t)
        assert rt.device == 0 and len(rt) == 4096


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mapped_args", [False, True], ids=["uploaded-args", "mapped-args"])
async def test_nvlink_write_and_pages_in_one_process(mapped_args, loop_errors):
    import cupy as cp

    s_dev, d_dev = _pair()
    async with af.open_engine(PROVIDER) as a, af.open_engine(PROVIDER) as b:
        a._gpu_path().mapped_args = mapped_args
        with cp.cuda.Device(s_dev):
            src = cp.random.default_rng(1).integers(0, 256, 64 << 20, dtype=cp.uint8)
        with cp.cuda.Device(d_dev):
            dst = cp.zeros(80 << 20, dtype=cp.uint8)
        rs, rd = a.register(src, remote_write=False), b.register(dst)
        desc = rd.descriptor()
        c = b.imm_counter(4)
        await bounded(a.write(rs[0 : 32 << 20], desc[4096 : 4096 + (32 << 20)], imm=4))
        await bounded(c.wait(1))
        with cp.cuda.Device(d_dev):
            assert bool(cp.array_equal(dst[4096 : 4096 + (32 << 20)], cp.asarray(src[0 : 32 << 20], ))), "bytes"
            assert int(dst[:4096].any()) == 0
        # Pages with strides: page k of 16 KiB from stride 20 KiB to stride 24 KiB, shuffled.
        page, n = 16384, 1024
        rng = np.random.default_rng(2)
        sidx = rng.permutation(n).astype(np.int64)
        didx = rng.permutation(n).astype(np.int64)
        dst.fill(0)
        c5 = b.imm_counter(5)
        await bounded(a.write_pages(rs, desc, page, sidx, didx, src_stride=20480, dst_stride=24576, imm=5))
        await bounded(c5.wait(n))  # one immediate per page, as on the fabric
        await asyncio.sleep(0.05)
        assert c5.available == 0
        with cp.cuda.Device(d_dev):
            got = cp.asnumpy(dst)
        want = cp.asnumpy(src)
        for k in range(n):
            s0, d0 = int(sidx[k]) * 20480, int(didx[k]) * 24576
            assert np.array_equal(got[d0 : d0 + page], want[s0 : s0 + page]), k
        written = np.zeros(len(got), bool)
        for k in range(n):
            written[int(didx[k]) * 24576 : int(didx[k]) * 24576 + page] = True
        assert not got[~written].any(), "bytes outside the pages were written"


def _target(conn, device: int, size: int) -> None:
    import cupy as cp

    async def main() -> None:
        async with af.open_engine(PROVIDER) as eng:
            with cp.cuda.Device(device):
                buf = cp.zeros(size, dtype=cp.uint8)
            region = eng.register(buf)
            conn.send((eng.address.to_bytes(), region.descriptor().to_bytes()))
            await asyncio.wait_for(eng.imm_counter(1).wait(1), 60)
            with cp.cuda.Device(device):
                want = (cp.arange(size, dtype=cp.int64) % 251).astype(cp.uint8)
                ok = bool(cp.array_equal(buf, want))
            conn.send(ok)
            conn.recv()

    asyncio.run(main())


@pytest.mark.gpu
@gpu
async def test_nvlink_write_across_processes(loop_errors):
    import cupy as cp

    s_dev, d_dev = _pair()
    size = 256 << 20
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=_target, args=(there, d_dev, size), daemon=True)
    proc.start()
    try:
        assert await asyncio.to_thread(here.poll, 120)
        _, d = here.recv()
        desc = af.RegionDescriptor.from_bytes(d)
        assert desc.owner._body.pid != os.getpid()
        async with af.open_engine(PROVIDER) as eng:
            with cp.cuda.Device(s_dev):
                src = (cp.arange(size, dtype=cp.int64) % 251).astype(cp.uint8)
            rs = eng.register(src, remote_write=False)
            await bounded(eng.write(rs, desc, imm=1), 60)
            assert await asyncio.to_thread(here.poll, 60)
            assert here.recv() is True, "the target saw different bytes"
            here.send("bye")
    finally:
        await asyncio.to_thread(proc.join, 30)
        if proc.is_alive():
            proc.kill()


@pytest.mark.gpu
@gpu
async def test_watcher_armed_pages_fire_on_kernel_bumps(loop_errors):
    """A CUDA stream computes "layers" and bumps a watcher slot after each;
    page writes pre-armed per layer fire from the native watcher thread."""
    import cupy as cp

    from aiofabric import gpu as afgpu

    layers, page, n = 4, 4096, 64
    async with af.open_engine(PROVIDER) as a, af.open_engine(PROVIDER) as b:
        src = np.random.default_rng(3).integers(0, 256, layers * n * page, dtype=np.uint8)
        dst = np.zeros_like(src)
        rs, desc = a.register(src, remote_write=False), b.register(dst).descriptor()
        w = a.watcher(slots=2)
        afgpu.attach_watcher(w, 0)
        idx = np.arange(n, dtype=np.int64)
        futs = [w.arm_pages(0, layer + 1, rs[layer * n * page:(layer + 1) * n * page],
                            desc[layer * n * page:(layer + 1) * n * page], page, idx, idx, imm=layer)
                for layer in range(layers)]
        with cp.cuda.Device(0):
            stream = cp.cuda.Stream(non_blocking=True)
            x = cp.ones((2048, 2048), dtype=cp.float32)
            with stream:
                for layer in range(layers):
                    x = x @ x / 2048.0  # the "layer"
                    afgpu.bump(w, 0, layer + 1, stream)
        await bounded(asyncio.gather(*futs))
        for layer in range(layers):
            await bounded(b.imm_counter(layer).wait(n))
        assert np.array_equal(dst, src)
        assert w.value(0) == layers
        w.close()
