"""Sans-IO wire codec: engine addresses, region descriptors and the message
header.  No libfabric here, so it is tested (and fuzzed) on its own.

Every encoding is msgpack, tagged and versioned::

    address    ["af.addr", 2, provider, incarnation, [[nic_name, doorbell_addr, doorbell_key], ...], max_frame,
                host, pid, pstart]
    descriptor ["af.region", 2, <address body>, addr, nbytes, [key, ...], gpu]
    gpu        nil, or [device, cuda_ipc_handle (64 bytes), allocation_base] for GPU memory

``host`` identifies the kernel and PID namespace the engine runs in (0:
unknown), ``pid``/``pstart`` its process and that process's start time, so
a peer on the same host can tell at once that the process has exited.

Decoding never trusts its input: sizes are capped before and during
unpacking, every field is type- and range-checked, and any failure is a
:class:`~aiofabric.errors.ProtocolError`.
"""
from __future__ import annotations

import struct
from typing import Any, NamedTuple

import msgpack

from .errors import ProtocolError

__all__ = [
    "WIRE_VERSION",
    "MAX_NICS",
    "MAX_NIC_NAME",
    "MAX_ADDRESS_BYTES",
    "MAX_DESCRIPTOR_BYTES",
    "NicAddress",
    "AddressBody",
    "DescriptorBody",
    "GpuBody",
    "encode_address",
    "decode_address",
    "encode_descriptor",
    "decode_descriptor",
    "encode_msg_header",
    "decode_msg_header",
]

WIRE_VERSION = 2
MAX_NICS = 4
MAX_NIC_NAME = 256
MAX_PROVIDER = 64
MIN_FRAME = 1024
MAX_ADDRESS_BYTES = 2048
MAX_DESCRIPTOR_BYTES = 4096
GPU_IPC_BYTES = 64
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
_ADDR_TAG = "af.addr"
_DESC_TAG = "af.region"
_MSG_MAGIC = b"AFm"
_CREDIT_MAGIC = b"AFc"  # a message that delivers immediates: payload <imm u32, count u32>
_CREDIT = struct.Struct("<II")
_MSG_HEAD = struct.Struct("<3sBH")  # magic, version, sender address length


class NicAddress(NamedTuple):
    """One NIC of an engine: its endpoint name and its doorbell (a tiny
    region that zero-byte notifies target)."""

    name: bytes
    doorbell_addr: int
    doorbell_key: int


class AddressBody(NamedTuple):
    provider: str
    incarnation: int
    nics: tuple[NicAddress, ...]
    max_frame: int = 65536  #: largest message frame this engine receives
    host: int = 0    #: kernel + PID namespace identity (0: unknown)
    pid: int = 0     #: process id in that namespace (0: unknown)
    pstart: int = 0  #: the process's start time in clock ticks since boot


class GpuBody(NamedTuple):
    device: int
    ipc: bytes
    base: int


class DescriptorBody(NamedTuple):
    owner: AddressBody
    addr: int
    nbytes: int
    keys: tuple[int, ...]
    gpu: GpuBody | None = None


def _unpack(blob: Any, limit: int, what: str) -> Any:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} must be bytes, not {type(blob).__name__}")
    if len(blob) > limit:
        raise ProtocolError(f"{what}: {len(blob)} bytes exceeds the limit of {limit}")
    try:
        return msgpack.unpackb(
            blob,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_PROVIDER,
            max_bin_len=MAX_NIC_NAME,
            max_array_len=16,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises many kinds on garbage
        raise ProtocolError(f"{what}: not a valid encoding ({exc.__class__.__name__}: {exc})") from None


def _int(v: Any, hi: int, what: str) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise ProtocolError(f"{what}: expected an integer in [0, {hi}], got {v!r:.40}")
    return v


def _list(v: Any, n: int | None, what: str) -> list:
    if type(v) is not list or (n is not None and len(v) != n):
        raise ProtocolError(f"{what}: expected a list{'' if n is None else f' of {n}'}")
    return v


def _header(obj: Any, tag: str, n: int, what: str) -> list:
    if type(obj) is not list or len(obj) < 2 or obj[0] != tag:
        raise ProtocolError(f"{what}: not an aiofabric {what}")
    if type(obj[1]) is not int or obj[1] != WIRE_VERSION:  # True and 1.0 equal 1 but are not versions
        raise ProtocolError(f"{what}: unsupported version {obj[1]!r:.20} (this side speaks {WIRE_VERSION})")
    return _list(obj, n, what)


def _address_fields(a: AddressBody) -> list:
    return [a.provider, a.incarnation, [[n.name, n.doorbell_addr, n.doorbell_key] for n in a.nics], a.max_frame,
            a.host, a.pid, a.pstart]


_ADDRESS_FIELDS = 7


def _parse_address_fields(provider: Any, incarnation: Any, nics: Any, max_frame: Any, host: Any, pid: Any,
                          pstart: Any, what: str) -> AddressBody:
    if type(provider) is not str or not provider:
        raise ProtocolError(f"{what}: provider must be a non-empty string")
    inc = _int(incarnation, U64, f"{what}: incarnation")
    nic_list = _list(nics, None, f"{what}: nics")
    if not 1 <= len(nic_list) <= MAX_NICS:
        raise ProtocolError(f"{what}: {len(nic_list)} NICs (1 to {MAX_NICS} allowed)")
    out = []
    for i, nic in enumerate(nic_list):
        name, db_addr, db_key = _list(nic, 3, f"{what}: nic {i}")
        if type(name) is not bytes or not name:
            raise ProtocolError(f"{what}: nic {i} name must be non-empty bytes")
        out.append(NicAddress(name, _int(db_addr, U64, f"{what}: doorbell"), _int(db_key, U64, f"{what}: key")))
    frame = _int(max_frame, U32, f"{what}: max_frame")
    if frame < MIN_FRAME:
        raise ProtocolError(f"{what}: max_frame {frame} is below {MIN_FRAME}")
    return AddressBody(provider, inc, tuple(out), frame, _int(host, U64, f"{what}: host"),
                       _int(pid, U32, f"{what}: pid"), _int(pstart, U64, f"{what}: pstart"))


def encode_address(a: AddressBody) -> bytes:
    return msgpack.packb([_ADDR_TAG, WIRE_VERSION, *_address_fields(a)], use_bin_type=True)


def decode_address(blob: Any) -> AddressBody:
    obj = _header(_unpack(blob, MAX_ADDRESS_BYTES, "address"), _ADDR_TAG, 2 + _ADDRESS_FIELDS, "address")
    return _parse_address_fields(*obj[2:], "address")


def encode_descriptor(d: DescriptorBody) -> bytes:
    return msgpack.packb(
        [_DESC_TAG, WIRE_VERSION, _address_fields(d.owner), d.addr, d.nbytes, list(d.keys),
         None if d.gpu is None else [d.gpu.device, d.gpu.ipc, d.gpu.base]],
        use_bin_type=True,
    )


def decode_descriptor(blob: Any) -> DescriptorBody:
    obj = _header(_unpack(blob, MAX_DESCRIPTOR_BYTES, "descriptor"), _DESC_TAG, 7, "descriptor")
    owner = _parse_address_fields(*_list(obj[2], _ADDRESS_FIELDS, "descriptor: owner"), "descriptor: owner")
    addr = _int(obj[3], U64, "descriptor: addr")
    nbytes = _int(obj[4], U64, "descriptor: nbytes")
    if addr + nbytes > U64 + 1:
        raise ProtocolError("descriptor: region wraps the address space")
    keys = tuple(_int(k, U64, "descriptor: key") for k in _list(obj[5], None, "descriptor: keys"))
    if len(keys) != len(owner.nics):
        raise ProtocolError(f"descriptor: {len(keys)} keys for {len(owner.nics)} NICs")
    gpu = None
    if obj[6] is not None:
        device, ipc, base = _list(obj[6], 3, "descriptor: gpu")
        if type(ipc) is not bytes or len(ipc) != GPU_IPC_BYTES:
            raise ProtocolError(f"descriptor: the CUDA IPC handle must be {GPU_IPC_BYTES} bytes")
        gpu = GpuBody(_int(device, U32, "descriptor: gpu device"), ipc, _int(base, U64, "descriptor: gpu base"))
    return DescriptorBody(owner, addr, nbytes, keys, gpu)


def encode_msg_header(sender: bytes) -> bytes:
    return _MSG_HEAD.pack(_MSG_MAGIC, WIRE_VERSION, len(sender)) + sender


def encode_credit_header(sender: bytes) -> bytes:
    """Header of a credit message: delivers immediates without a write (the
    NVLink path posts one after its copy has completed)."""
    return _MSG_HEAD.pack(_CREDIT_MAGIC, WIRE_VERSION, len(sender)) + sender


def encode_credit(imm: int, count: int) -> bytes:
    return _CREDIT.pack(imm, count)


def decode_credit(frame: bytes) -> tuple[bytes, int, int] | None:
    """(sender, imm, count) of a credit message; None for any other frame;
    ProtocolError for a malformed one."""
    if frame[:3] != _CREDIT_MAGIC:
        return None
    sender, off = decode_msg_header(b"AFm" + frame[3:])
    if len(frame) - off != _CREDIT.size:
        raise ProtocolError("credit message: wrong payload size")
    imm, count = _CREDIT.unpack_from(frame, off)
    return sender, imm, count


def decode_msg_header(frame: bytes) -> tuple[bytes, int]:
    """Return the sender's encoded address and the offset of the payload."""
    if not isinstance(frame, (bytes, bytearray, memoryview)) or (
            isinstance(frame, memoryview) and frame.itemsize != 1):
        raise TypeError(f"message frame must be bytes, not {type(frame).__name__}")
    if len(frame) < _MSG_HEAD.size:
        raise ProtocolError(f"message: {len(frame)} bytes is shorter than the header")
    magic, version, alen = _MSG_HEAD.unpack_from(frame)
    if magic != _MSG_MAGIC:
        raise ProtocolError("message: bad magic")
    if version != WIRE_VERSION:
        raise ProtocolError(f"message: unsupported version {version}")
    end = _MSG_HEAD.size + alen
    if alen > MAX_ADDRESS_BYTES or end > len(frame):
        raise ProtocolError("message: truncated sender address")
    return frame[_MSG_HEAD.size : end], end
