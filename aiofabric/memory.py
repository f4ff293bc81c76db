"""Addresses, registered memory and the descriptors peers write through.

Slices are byte ranges: ``region[0:4096]`` and ``desc[8192:12288]``.  Unlike
Python sequences they never clamp: a range outside the region is an error.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import wire
from .errors import ClosedResourceError

if TYPE_CHECKING:
    from .engine import TransferEngine

__all__ = ["Address", "RegionDescriptor", "MemoryRegion", "RegionView"]


def byte_range(key: Any, nbytes: int) -> tuple[int, int]:
    """(start, length) of a slice over ``nbytes`` bytes; never clamps."""
    if not isinstance(key, slice):
        raise TypeError(f"index with a slice of bytes, e.g. [0:4096], not {type(key).__name__}")
    if key.step not in (None, 1):
        raise ValueError("byte ranges have no step")
    start = 0 if key.start is None else key.start
    stop = nbytes if key.stop is None else key.stop
    if type(start) is not int or type(stop) is not int:
        raise TypeError("slice bounds must be integers")
    if start < 0:
        start += nbytes
    if stop < 0:
        stop += nbytes
    if not 0 <= start <= stop <= nbytes:
        raise ValueError(f"byte range [{key.start}:{key.stop}] is outside 0..{nbytes}")
    return start, stop - start


class Address:
    """Where an engine can be reached: its provider, one endpoint name per NIC,
    and an incarnation number that changes every time an engine is opened.
    Hashable; ``to_bytes()``/``from_bytes()`` carry it between processes."""

    __slots__ = ("_body", "_bytes", "_hash")

    def __init__(self, body: wire.AddressBody) -> None:
        self._body = body
        self._bytes = wire.encode_address(body)
        self._hash = hash(self._bytes)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Address:
        """Decode; raises :class:`~aiofabric.ProtocolError` on anything malformed."""
        return cls(wire.decode_address(blob))

    def to_bytes(self) -> bytes:
        return self._bytes

    @property
    def provider(self) -> str:
        return self._body.provider

    @property
    def incarnation(self) -> int:
        return self._body.incarnation

    @property
    def nics(self) -> tuple[wire.NicAddress, ...]:
        return self._body.nics

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Address) and other._bytes == self._bytes

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"<Address {self.provider} nics={len(self.nics)} incarnation={self.incarnation:016x}>"


class RegionDescriptor:
    """What a peer needs to write into a registered region: the owner's
    address, the remote address and length of the bytes it covers, and one
    key per NIC of the owner.  Slicing narrows the range."""

    __slots__ = ("owner", "addr", "nbytes", "keys", "gpu")

    def __init__(self, owner: Address, addr: int, nbytes: int, keys: tuple[int, ...],
                 gpu: wire.GpuBody | None = None) -> None:
        if len(keys) != len(owner._body.nics):
            raise ValueError(f"{len(keys)} keys for an owner with {len(owner._body.nics)} NICs")
        self.owner = owner
        self.addr = addr
        self.nbytes = nbytes
        self.keys = keys
        #: for GPU memory: the owner's device, the CUDA IPC handle and the allocation base
        self.gpu = gpu

    def __getitem__(self, key: slice) -> RegionDescriptor:
        start, length = byte_range(key, self.nbytes)
        return RegionDescriptor(self.owner, self.addr + start, length, self.keys, self.gpu)

    def __len__(self) -> int:
        return self.nbytes

    def to_bytes(self) -> bytes:
        return wire.encode_descriptor(
            wire.DescriptorBody(self.owner._body, self.addr, self.nbytes, self.keys, self.gpu)
        )

    @classmethod
    def from_bytes(cls, blob: bytes) -> RegionDescriptor:
        """Decode; raises :class:`~aiofabric.ProtocolError` on anything malformed."""
        d = wire.decode_descriptor(blob)
        return cls(Address(d.owner), d.addr, d.nbytes, d.keys, d.gpu)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RegionDescriptor)
            and (self.owner, self.addr, self.nbytes, self.keys, self.gpu)
            == (other.owner, other.addr, other.nbytes, other.keys, other.gpu)
        )

    def __hash__(self) -> int:
        return hash((self.owner, self.addr, self.nbytes, self.keys, self.gpu))

    def __repr__(self) -> str:
        return f"<RegionDescriptor {self.nbytes} bytes at {self.addr:#x} of {self.owner!r}>"


class MemoryRegion:
    """Memory registered with an engine's NICs.  Made by
    :meth:`TransferEngine.register`; close it (or the engine) to deregister.
    Closing while writes from it are in flight defers the deregistration
    until they complete."""

    __slots__ = (
        "engine", "obj", "nbytes", "remote_write", "remote_read", "readonly", "device", "_gpu",
        "_cdata", "_ptr", "_mr", "_keys", "_remote_base", "_inflight", "_closed", "_descriptor",
        "__weakref__",
    )

    def __init__(self, engine: TransferEngine, obj: Any, cdata: Any, ptr: int, nbytes: int,
                 readonly: bool, remote_write: bool, remote_read: bool) -> None:
        self.engine = engine
        self.obj = obj
        self.nbytes = nbytes
        self.readonly = readonly
        self.remote_write = remote_write
        self.remote_read = remote_read
        #: the CUDA device of GPU memory, None for host memory
        self.device: int | None = None
        self._gpu: wire.GpuBody | None = None
        self._cdata = cdata  # keeps the exported buffer alive
        self._ptr = ptr
        self._mr: Any = None
        self._keys: tuple[int, ...] = ()
        self._remote_base = 0
        self._inflight = 0
        self._closed = False
        self._descriptor: RegionDescriptor | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def address(self) -> int:
        """Local virtual address of the first byte."""
        return self._ptr

    def __len__(self) -> int:
        return self.nbytes

    def __getitem__(self, key: slice) -> RegionView:
        start, length = byte_range(key, self.nbytes)
        return RegionView(self, start, length)

    def descriptor(self) -> RegionDescriptor:
        """The descriptor peers write (or read) through.  Raises ``ValueError``
        for a region registered for local use only, ClosedResourceError when closed."""
        if self._closed:
            raise ClosedResourceError("memory region is closed")
        if not (self.remote_write or self.remote_read):
            raise ValueError("region was registered without remote access; it has no descriptor")
        if self._descriptor is None:
            self._descriptor = RegionDescriptor(
                self.engine.address, self._remote_base, self.nbytes, self._keys, self._gpu
            )
        return self._descriptor

    def close(self) -> None:
        """Deregister.  Idempotent; later writes from or into it fail."""
        if not self._closed:
            self._closed = True
            self.engine._release_region(self, strict=True)

    def __enter__(self) -> MemoryRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "keys=" + ",".join(f"{k:#x}" for k in self._keys)
        return f"<MemoryRegion {self.nbytes} bytes at {self._ptr:#x} {state}>"


class RegionView:
    """A byte range of a :class:`MemoryRegion` (what ``region[a:b]`` returns)."""

    __slots__ = ("region", "offset", "nbytes")

    def __init__(self, region: MemoryRegion, offset: int, nbytes: int) -> None:
        self.region = region
        self.offset = offset
        self.nbytes = nbytes

    def __getitem__(self, key: slice) -> RegionView:
        start, length = byte_range(key, self.nbytes)
        return RegionView(self.region, self.offset + start, length)

    def __len__(self) -> int:
        return self.nbytes

    def __repr__(self) -> str:
        return f"<RegionView [{self.offset}:{self.offset + self.nbytes}] of {self.region!r}>"
