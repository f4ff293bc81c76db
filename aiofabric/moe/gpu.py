"""MoE dispatch/combine on GPUs.

``GpuExpertParallel`` is the intra-host path: one rank per GPU (one process
each, or several GPUs in one process), every rank's inbox is one device
allocation whose CUDA IPC handle the others map; kernels (moe/kernels.py)
write tokens straight into the peers' inboxes over NVLink and signal with
flags that the receiving kernel spins on.  No host round trip on the
critical path: the API is stream-ordered (calls enqueue work and return;
``synchronize()`` reports a peer that did not signal within ``timeout``).

``FabricGpuExpertParallel`` is the GPU-over-fabric path ("separate hosts"
that talk only through the engine): tokens are packed (FP8-quantised) on the
GPU, copied to host memory, and travel with :class:`~aiofabric.moe.ExpertParallel`'s
protocol; results are copied back to the GPU.

Both produce exactly what reference.py defines.  CuPy is needed only when a
GPU object is made: this module imports without it.
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

import msgpack
import numpy as np

from ..errors import BrokenResourceError, ClosedResourceError, ProtocolError, UnavailableError
from . import layout
from .cuda import SIGNATURES, THREADS, CudaBackend, kernel_args
from .host import Dispatched, ExpertParallel, wait_all
from .kernels import MODE
from .layout import MoEConfig

__all__ = ["CudaBackend", "FabricGpuExpertParallel", "GpuDispatched", "GpuExpertParallel", "SIGNATURES",
           "kernel_args"]

_VERSION = 1


class GpuDispatched(NamedTuple):
    """What a rank received (device arrays, reused by the next round):
    expert ``e``'s tokens are ``x[e, :counts[e]]`` in source rank, then token
    order; rows past the count hold stale data."""

    x: Any          #: [E/ranks, capacity, H] uint16 (BF16) / uint8 (FP8) / float32
    scales: Any     #: [E/ranks, capacity, H/128] float32 (FP8) or None
    src: Any        #: [E/ranks, capacity, 2] int32: (source rank, token index)
    counts: Any     #: [E/ranks] int32


class GpuExpertParallel:
    """One rank of an intra-host expert-parallel group, on GPU ``device``
    (default: ``rank``).

    ``timeout``: seconds a receiving kernel spins for a peer's flag before it
    gives up (then :meth:`synchronize` raises BrokenResourceError).
    ``validate``: check ``topk_idx`` on the host (a device-to-host copy and a
    sync per dispatch; pass False on the hot path: out-of-range ids are then
    treated as masked, and an expert named twice in a row gets the token once
    with both weights).  ``engine`` is used
    only by :meth:`join` (it may be None with :meth:`connect`).
    """

    def __init__(self, engine: Any, rank: int, config: MoEConfig, device: int | None = None, *,
                 timeout: float = 10.0, validate: bool = True, threads: int = THREADS,
                 backend: Any = None) -> None:
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config must be a MoEConfig, not {type(config).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < config.ranks:
            raise ValueError(f"rank must be an int in [0, {config.ranks}), got {rank!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if config.topk > 64:
            raise ValueError("topk must be <= 64 on the GPU path")
        if config.max_tokens >= 1 << 28:
            raise ValueError("max_tokens must be < 2**28 on the GPU path (the meta flag's row count)")
        self.engine = engine
        self.rank = rank
        self.config = c = config
        self.timeout = float(timeout)
        self.validate = bool(validate)
        if isinstance(threads, bool) or not isinstance(threads, int) or not (32 <= threads <= 1024 and threads % 32 == 0):
            raise ValueError(f"threads must be a multiple of 32 in [32, 1024], got {threads!r}")
        if 4 * (config.num_experts + 1) + 16 * config.ranks > 48 * 1024:
            raise ValueError("4 * num_experts + 16 * ranks must be <= 48 KiB on the GPU path (shared-memory tables)")
        self._threads = threads
        b = self._b = backend if backend is not None else CudaBackend(rank if device is None else device)
        u8, i32 = np.uint8, np.int32
        mt, ranks, epr = c.max_tokens, c.ranks, c.experts_per_rank
        self.inbox = b.zeros(c.inbox_bytes, u8)
        self._rowidx = b.zeros(max(1, mt * ranks), i32)  # [T, ranks]: the token's row at each rank, -1 none
        self._tickets = b.zeros(2, np.uint32)            # role tickets of moe_dispatch, moe_combine
        self._taken = [0, 0]                             # tickets taken so far (mod 2**32)
        self._err = b.zeros(1, i32)
        # launch shapes (docs/moe.md): every block of a phase resident at once where it fits;
        # receivers after the senders, as many as the work can use
        self._shared_d = 4 * (c.num_experts + 1) + 16 * ranks  # moe_dispatch's roles' tables
        room_d = b.resident("moe_dispatch", threads, self._shared_d)
        room_c = b.resident("moe_combine", threads, 0)
        warps, parts = threads // 32, -(-(c.hidden // 8) // threads)
        quarter = max(1, room_d // 4)
        self._recv_d = max(quarter, min(room_d - mt - 1, -(-ranks * mt * c.topk // warps)))
        # combine: senders fill the device; the receivers (a unit each) start as senders retire
        self._send_c = max(1, min(room_c, ranks * mt))
        self._recv_c = max(1, min(mt * parts, 4096))
        # dispatch: a token's payload is split over up to this many blocks while
        # the senders leave the receivers room (one block per token at 128 tokens
        # on an H200; eight for a single token)
        self._room_d = room_d
        self._max_parts = layout.MAX_PARTS
        self._offs = b.zeros(ranks * epr, i32)  # [source, expert]: where its tokens start (this round)
        self._nrecv = b.zeros(ranks, i32)       # rows received from each source (this round)
        self._peers = b.zeros(ranks, np.uint64)
        xdt = {"bf16": np.uint16, "fp8": np.uint8, "float32": np.float32}[c.mode]
        cdt = np.uint16 if c.combine_dtype == "bf16" else np.float32
        self.x = b.zeros((epr, c.capacity, c.hidden), xdt)
        g = c.hidden // 128
        self.scales = b.zeros((epr, c.capacity, g), np.float32) if c.mode == "fp8" else None
        self._sdummy = b.zeros(1, np.float32)
        self.src = b.zeros((epr, c.capacity, 2), i32)
        self.counts = b.zeros(epr, i32)
        self.out = b.zeros((mt, c.hidden), cdt)
        b.settle()  # the inbox is zeroed before any peer can learn where it is
        self._connected = False
        self._seq = 0
        self._state = "idle"
        self._t = 0
        self._closed = False

    @property
    def stream(self) -> Any:
        """The stream the kernels run on (CuPy ``Stream``).  A caller that makes
        it current (``with ep.stream:``) for its own work around the calls
        saves the event record and cross-stream wait each call otherwise
        enqueues on both streams."""
        return getattr(self._b, "stream", None)

    # -- connecting -----------------------------------------------------------------

    def info(self) -> bytes:
        from ..liveness import host_identity

        h = self._b.handle(self.inbox)
        return msgpack.packb({"t": "moe-gpu", "v": _VERSION, "rank": self.rank, "config": self.config.to_dict(),
                              "host": host_identity(), "pid": os.getpid(), **h}, use_bin_type=True)

    def connect(self, infos: Sequence[bytes]) -> None:
        """Map every rank's inbox (index = rank).  Raises ProtocolError for a
        blob of another group, UnavailableError for a rank on another host or
        a GPU pair without peer access."""
        from ..liveness import host_identity

        infos = list(infos)
        if len(infos) != self.config.ranks:
            raise ValueError(f"infos needs one blob per rank ({self.config.ranks}), got {len(infos)}")
        ptrs = []
        for r, blob in enumerate(infos):
            try:
                d = msgpack.unpackb(bytes(blob), raw=False)
            except Exception as e:  # noqa: BLE001 - any decoding failure is a protocol error
                raise ProtocolError(f"infos[{r}] is not a GPU MoE info blob: {e}") from None
            if not isinstance(d, dict) or d.get("t") != "moe-gpu" or d.get("v") != _VERSION:
                raise ProtocolError(f"infos[{r}] is not a GPU MoE info blob (version {_VERSION})")
            if d.get("rank") != r or d.get("config") != self.config.to_dict():
                raise ProtocolError(f"infos[{r}] describes rank {d.get('rank')} of another group")
            if d.get("host") != host_identity():
                raise UnavailableError(f"rank {r} runs on another host: use FabricGpuExpertParallel")
            ptrs.append(self._b.ptr(self.inbox) if r == self.rank else self._b.map_peer(d))
        self._b.put(self._peers, np.array(ptrs, np.uint64))
        self._connected = True

    async def join(self, peers: Sequence[Any]) -> None:
        """Exchange :meth:`info` over the engine's messages and connect
        (``peers[r]``: rank r's engine address)."""
        peers = list(peers)
        if self.engine is None:
            raise ValueError("join() needs an engine (or use connect())")
        if len(peers) != self.config.ranks:
            raise ValueError(f"peers needs one address per rank ({self.config.ranks}), got {len(peers)}")
        blob = self.info()
        sends = [self.engine.send(p, blob) for r, p in enumerate(peers) if r != self.rank]

        async def get(p: Any) -> bytes:
            return (await self.engine.recv(peer=p)).data

        got = list(await wait_all([get(p) for r, p in enumerate(peers) if r != self.rank]))
        await wait_all(sends)
        got.insert(self.rank, blob)
        self.connect(got)

    # -- rounds -------------------------------------------------------------------------

    def _turn(self, want: str, what: str) -> None:
        if self._closed:
            raise ClosedResourceError("GpuExpertParallel is closed")
        if not self._connected:
            raise RuntimeError("connect() or join() first")
        if self._state != want:
            raise RuntimeError(f"{what} out of turn: a round is dispatch_send, dispatch_recv, combine_send, "
                               f"combine_recv (state: {self._state})")

    def _array(self, name: str, a: Any, dtypes: tuple[Any, ...], shape: tuple[int, ...] | None = None) -> None:
        if not self._b.is_array(a):
            raise TypeError(f"{name} must be a {self._b.xp.__name__} array, not {type(a).__name__}")
        if a.dtype not in dtypes:
            raise TypeError(f"{name} must have dtype {' or '.join(str(np.dtype(d)) for d in dtypes)}, not {a.dtype}")
        if shape is not None and tuple(a.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(a.shape)}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        if not self._b.on_device(a):
            raise ValueError(f"{name} is on another device than GPU {self._b.device}")

    def dispatch_send(self, x: Any, topk_idx: Any, topk_weights: Any) -> None:
        """Enqueue routing, packing, the writes into every peer's inbox and
        the reception of the peers' tokens (one kernel, docs/moe.md).
        ``x`` ``[T, H]`` uint16 (BF16 bits) or float32, ``topk_idx`` ``[T, k]``
        int32/int64 (-1 masked), ``topk_weights`` ``[T, k]`` float32, all on
        this rank's GPU.  Raises TypeError/ValueError naming the argument."""
        self._turn("idle", "dispatch_send")
        c = self.config
        self._array("x", x, (np.uint16, np.float32))
        if x.ndim != 2 or x.shape[1] != c.hidden or x.shape[0] > c.max_tokens:
            raise ValueError(f"x must be [T <= {c.max_tokens}, {c.hidden}], got {tuple(x.shape)}")
        t = int(x.shape[0])
        self._array("topk_idx", topk_idx, (np.int32, np.int64), (t, c.topk))
        self._array("topk_weights", topk_weights, (np.float32,), (t, c.topk))
        if self.validate:
            layout.check_routing("topk_idx", self._b.to_host(topk_idx), c.num_experts, t, c.topk)
        b = self._b
        if b.ptr(x) % 16:
            raise ValueError("x must be 16-byte aligned (the kernels load 16 bytes at a time)")
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF or 1
        self._t = t
        b.begin()
        p = b.ptr
        # one kernel: routing, packing, stores into the peers' inboxes, metas, tags, and the receivers
        parts = max(1, min(self._max_parts, (self._room_d - self._recv_d - 1) // max(t, 1)))
        senders = t * parts + 1
        grid = senders + self._recv_d
        b.launch("moe_dispatch", (grid,), self._threads,
                 (p(x), x.dtype == np.uint16, p(topk_idx), topk_idx.dtype == np.int64, p(topk_weights), t, c.hidden,
                  MODE[c.mode], p(self._peers), self.rank, c.ranks, c.topk, c.experts_per_rank, seq,
                  c.dflag_offset, c.meta_offset, c.meta_bytes, c.drows_offset, c.row_bytes, c.header_bytes,
                  c.dtag_offset, c.max_tokens, p(self._rowidx), c.payload_bytes, c.scale_bytes, p(self.x),
                  p(self.scales if self.scales is not None else self._sdummy), p(self.src), p(self.counts),
                  p(self._offs), p(self._nrecv), c.capacity, int(self.timeout * 1e9), p(self._err),
                  p(self._tickets), self._taken[0], parts),
                 shared=self._shared_d, wait_from=senders)
        self._taken[0] = (self._taken[0] + grid) & 0xFFFFFFFF
        self._keep = (x, topk_idx, topk_weights)  # alive until the kernel has read them
        self._state = "dispatching"

    def dispatch_recv(self) -> GpuDispatched:
        """Make the caller's current stream wait for the tokens: the kernel
        that dispatch_send enqueued receives them too (its receiving blocks
        spin until every rank's rows are in).  The returned arrays are this
        object's and are rewritten next round."""
        self._turn("dispatching", "dispatch_recv")
        self._b.end()
        self._state = "dispatched"
        return GpuDispatched(self.x, self.scales, self.src, self.counts)

    def combine_send(self, y: Any) -> None:
        """Enqueue the weighted reduction over this rank's experts, the writes
        of the partial sums back to each source, and the final sums of this
        rank's own tokens (one kernel).  ``y`` is
        ``[E/ranks, capacity, H]`` (uint16 BF16 bits or float32), row ``i``
        of expert ``e`` the output for ``x[e, i]``."""
        self._turn("dispatched", "combine_send")
        c, b, p = self.config, self._b, self._b.ptr
        self._array("y", y, (np.uint16, np.float32), (c.experts_per_rank, c.capacity, c.hidden))
        if b.ptr(y) % 16:
            raise ValueError("y must be 16-byte aligned")
        b.begin()
        grid = self._send_c + self._recv_c
        b.launch("moe_combine", (grid,), self._threads,
                 (p(y), y.dtype == np.uint16, c.capacity, c.hidden, p(self._peers), self.rank, c.ranks, c.topk,
                  c.experts_per_rank, self._seq, p(self._offs), p(self._nrecv), c.drows_offset, c.row_bytes,
                  c.crows_offset, c.ctag_offset, c.max_tokens, c.combine_dtype == "bf16", p(self._rowidx), self._t,
                  p(self.out), int(self.timeout * 1e9), p(self._err), p(self._tickets[1:]), self._taken[1],
                  self._send_c),
                 wait_from=self._send_c)
        self._taken[1] = (self._taken[1] + grid) & 0xFFFFFFFF
        self._keep = (y,)
        self._state = "combining"

    def combine_recv(self) -> Any:
        """Make the caller's current stream wait for the combined tokens: the
        kernel that combine_send enqueued sums them (its receiving blocks wait
        for every rank's partial sums).  Returns ``[T, H]``, a view of a
        reused buffer."""
        self._turn("combining", "combine_recv")
        self._b.end()
        self._state = "idle"
        return self.out[:self._t]

    def synchronize(self) -> None:
        """Wait for this rank's queued work; raise BrokenResourceError if a
        receiving kernel gave up waiting for a rank (the group is then
        unusable), ProtocolError if a peer sent inconsistent rows."""
        self._b.synchronize()
        err = int(self._b.to_host(self._err)[0])
        if err:
            self._state = "broken"
            if err < 0:
                raise ProtocolError("a rank sent rows whose positions exceed the receive capacity")
            raise BrokenResourceError(f"rank {err - 1} did not signal within timeout={self.timeout:g} s")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._b.close()

    def __repr__(self) -> str:
        c = self.config
        return f"<GpuExpertParallel rank {self.rank}/{c.ranks} experts {c.num_experts} {c.mode} {self._state}>"


class FabricGpuExpertParallel:
    """GPU ranks that talk only through the engine (the inter-host path on
    GPUs): pack (and FP8-quantise) on the GPU, copy the packed tokens to host
    memory, send with :class:`ExpertParallel`'s protocol, copy results back.
    The simplest correct version: each send half synchronises the GPU."""

    def __init__(self, engine: Any, rank: int, config: MoEConfig, device: int | None = None, *,
                 backend: Any = None) -> None:
        self.host = ExpertParallel(engine, rank, config)
        self.config = config
        self.rank = rank
        b = self._b = backend if backend is not None else CudaBackend(rank if device is None else device)
        self._body_pad = config.row_bytes - config.header_bytes
        self._packed = b.zeros((config.max_tokens, self._body_pad), np.uint8)

    def info(self) -> bytes:
        return self.host.info()

    def connect(self, infos: Sequence[bytes]) -> None:
        self.host.connect(infos)

    async def join(self, peers: Sequence[Any]) -> None:
        await self.host.join(peers)

    def dispatch_send(self, x: Any, topk_idx: Any, topk_weights: Any) -> Any:
        c, b = self.config, self._b
        if not b.is_array(x) or x.dtype not in (np.uint16, np.float32) or x.ndim != 2 or x.shape[1] != c.hidden:
            raise TypeError(f"x must be a [T, {c.hidden}] uint16/float32 {b.xp.__name__} array")
        if x.shape[0] > c.max_tokens:
            raise ValueError(f"x has {x.shape[0]} tokens, more than max_tokens={c.max_tokens}")
        if not x.flags.c_contiguous:
            raise ValueError("x must be C-contiguous")
        t = int(x.shape[0])
        self.host._check_state("idle", "dispatch_send")
        idx = layout.check_routing("topk_idx", b.to_host(topk_idx), c.num_experts, t, c.topk)
        w = layout.check_weights("topk_weights", b.to_host(topk_weights), idx.shape)
        if t and b.ptr(x) % 16:
            raise ValueError("x must be 16-byte aligned (the kernels load 16 bytes at a time)")
        if t:
            b.begin()
            b.launch("moe_pack", (t, max(1, -(-(c.hidden // 8) // THREADS))), THREADS,
                     (b.ptr(x), x.dtype == np.uint16, t, c.hidden, MODE[c.mode], b.ptr(self._packed), self._body_pad))
        body = b.to_host(self._packed[:t])[:, :c.payload_bytes + c.scale_bytes]
        b.synchronize()
        return self.host._dispatch_body(np.ascontiguousarray(body), idx, w)

    async def dispatch_recv(self) -> Dispatched:
        """Like ExpertParallel.dispatch_recv, with x/scales/src as device arrays."""
        d = await self.host.dispatch_recv()
        b = self._b
        out = Dispatched(b.to_device(d.x), None if d.scales is None else b.to_device(d.scales),
                         b.to_device(d.src_rank), b.to_device(d.src_token), d.counts, d.offsets)
        b.synchronize()
        return out

    def combine_send(self, expert_out: Any) -> Any:
        """``expert_out`` ``[N, H]`` device array in Dispatched order."""
        y = self._b.to_host(expert_out)
        self._b.synchronize()
        return self.host.combine_send(y)

    async def combine_recv(self) -> Any:
        out = await self.host.combine_recv()
        d = self._b.to_device(out)
        self._b.synchronize()
        return d

    def close(self) -> None:
        self.host.close()
        self._b.close()
