"""The bounded cast pipeline of a source rank: quantize pieces into one half
of a registered scratch buffer while the other half's writes are on the wire.

Host sources are cast with NumPy in the loop's thread; GPU sources (a region
with a ``device``) with the CUDA kernel of :mod:`.cast_gpu` on a stream of
their own, awaited through a CUDA event before the writes are posted."""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from .cast import quantize_runs
from .plan import Piece
from .spec import SCALE_BYTES

__all__ = ["Stager"]

_ALIGN = 256


def _up(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


class Stager:
    """Scratch memory (``scratch_bytes``, two halves) registered with ``engine``
    on the side of ``src`` (host or its GPU)."""

    def __init__(self, engine: Any, src: Any, scratch_bytes: int, block: int) -> None:
        if type(scratch_bytes) is not int or scratch_bytes < 2 * _ALIGN:
            raise ValueError(f"scratch_bytes must be an int >= {2 * _ALIGN}, got {scratch_bytes!r}")
        self.engine = engine
        self.block = block
        self.half = scratch_bytes // 2 // _ALIGN * _ALIGN
        self.device = src.device
        if self.device is None:
            self.buf: Any = np.empty(2 * self.half, np.uint8)
            self.src_u16 = np.frombuffer(src.obj, np.uint8)
            self.src_ptr = 0
        else:
            from ..gpu import _cupy

            cp = _cupy()
            with cp.cuda.Device(self.device):
                self.buf = cp.empty(2 * self.half, dtype=cp.uint8)
                self.stream = cp.cuda.Stream(non_blocking=True)
            self.src_ptr = src.address
        self.region = engine.register(self.buf, remote_write=False)
        self.slot_futs: list[list[asyncio.Future[Any]]] = [[], []]
        self.next = 0

    def _need(self, piece: Piece, m: int) -> int:
        nsc = piece.rows * -(-piece.width // self.block)
        return _up(m * piece.length) + m * nsc * SCALE_BYTES

    def batches(self, piece: Piece) -> list[slice]:
        """Slices of the piece's entries that fit one half of the scratch."""
        n = len(piece.src)
        if self._need(piece, 1) > self.half:
            raise ValueError(f"scratch_bytes too small: one piece of {piece.length} elements needs "
                             f"{self._need(piece, 1)} bytes in each half; pass scratch_bytes >= "
                             f"{2 * self._need(piece, 1)} (or plan with a smaller max_write_bytes)")
        per = max(1, (self.half - _ALIGN) // (self._need(piece, 1) + 1))
        while per > 1 and self._need(piece, per) > self.half:
            per -= 1
        return [slice(a, min(n, a + per)) for a in range(0, n, per)]

    async def send(self, piece: Piece, sel: slice, soff: int, desc: Any, doff: int, sc_off: int, cols: int,
                   imm: int) -> list[tuple[asyncio.Future[Any], int]]:
        """Cast entries ``sel`` of ``piece`` (source shard at byte ``soff``)
        and write codes and scales into ``desc`` (data at ``doff``, scales at
        ``sc_off``, the destination shard ``cols`` wide): two writes per
        entry.  Returns the futures with their byte counts."""
        slot = self.next
        self.next ^= 1
        for f in self.slot_futs[slot]:
            await f  # the previous writes out of this half have left it
        base = slot * self.half
        starts = piece.src[sel]
        dsts = piece.dst[sel]
        m = len(starts)
        nsc = piece.rows * -(-piece.width // self.block)
        codes_off = base
        scales_off = base + _up(m * piece.length)
        if self.device is None:
            src = self.src_u16[soff:soff + (len(self.src_u16) - soff) // 2 * 2].view(np.uint16)
            quantize_runs(src, starts, piece.rows, piece.width, self.buf[codes_off:codes_off + m * piece.length],
                          self.buf[scales_off:scales_off + m * nsc * SCALE_BYTES].view(np.float32), self.block)
        else:
            await self._gpu_cast(starts, piece, soff, codes_off, scales_off)
        nb = -(-cols // self.block)
        srow, scol = dsts // cols, dsts % cols
        sidx = srow * nb + scol // self.block
        out = []
        code_n, sc_n = piece.length, nsc * SCALE_BYTES
        reg = self.region
        for page, s_first, d_idx in ((code_n, codes_off, doff + dsts), (sc_n, scales_off, sc_off + sidx * SCALE_BYTES)):
            if m == 1:
                fut = self.engine.write(reg[s_first:s_first + page], desc[int(d_idx[0]):int(d_idx[0]) + page], imm=imm)
            else:
                fut = self.engine.write_pages(reg, desc, page, s_first + np.arange(m, dtype=np.int64) * page,
                                              d_idx, src_stride=1, dst_stride=1, imm=imm)
            out.append((fut, page * m))
        self.slot_futs[slot] = [f for f, _ in out]
        return out

    async def _gpu_cast(self, starts: np.ndarray, piece: Piece, soff: int, codes_off: int, scales_off: int) -> None:
        from ..gpu import _cupy
        from .cast_gpu import quantize_runs_gpu

        cp = _cupy()
        ptr = self.buf.data.ptr
        quantize_runs_gpu(self.src_ptr + soff, starts, piece.rows, piece.width, ptr + codes_off, ptr + scales_off,
                          block=self.block, device=self.device, stream=self.stream)
        with cp.cuda.Device(self.device):
            ev = cp.cuda.Event(block=False, disable_timing=True)
            ev.record(self.stream)
        while not ev.done:
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        """Let the writes out of the scratch finish (their errors are the
        caller's business), then deregister it."""
        for futs in self.slot_futs:
            for f in futs:
                try:
                    await f
                except Exception:  # noqa: BLE001 - reported through the futures the caller holds
                    pass
        self.region.close()
