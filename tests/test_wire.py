"""The sans-IO codec (aiofabric.wire) and Address / RegionDescriptor."""
from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiofabric import Address, ProtocolError, RegionDescriptor, wire

U64 = 2**64 - 1
#: no per-example deadline: these tests must not depend on the machine's speed
untimed = settings(deadline=None)

# ----------------------------------------------------------------- strategies

# at most MAX_PROVIDER bytes of UTF-8 (cut at a character boundary; never empty)
providers = st.text(min_size=1, max_size=wire.MAX_PROVIDER).map(
    lambda s: s.encode()[: wire.MAX_PROVIDER].decode(errors="ignore")
)
u64 = st.integers(0, U64)
nic_addresses = st.builds(wire.NicAddress, st.binary(min_size=1, max_size=wire.MAX_NIC_NAME), u64, u64)
HAS_MAX_FRAME = "max_frame" in wire.AddressBody._fields
MIN_FRAME = getattr(wire, "MIN_FRAME", 1024)


@st.composite
def address_bodies(draw: st.DrawFn) -> wire.AddressBody:
    nics = tuple(draw(st.lists(nic_addresses, min_size=1, max_size=wire.MAX_NICS)))
    body = wire.AddressBody(draw(providers), draw(u64), nics)
    if HAS_MAX_FRAME:
        body = body._replace(max_frame=draw(st.integers(MIN_FRAME, 2**32 - 1)))
    return body


@st.composite
def descriptor_bodies(draw: st.DrawFn) -> wire.DescriptorBody:
    owner = draw(address_bodies())
    addr = draw(u64)
    nbytes = draw(st.integers(0, min(U64, 2**64 - addr)))
    keys = tuple(draw(st.lists(u64, min_size=len(owner.nics), max_size=len(owner.nics))))
    return wire.DescriptorBody(owner, addr, nbytes, keys)


# ------------------------------------------------------------------- helpers

NIC = wire.NicAddress(b"name", 0, 5)
BODY = wire.AddressBody("shm", 1, (NIC,))


def make_address(provider: str = "shm", incarnation: int = 1, nics: int = 1) -> Address:
    return Address(wire.AddressBody(provider, incarnation,
                                    tuple(wire.NicAddress(b"nic%d" % i, 0x1000 * i, i + 5) for i in range(nics))))


# Raw encodings are built from the encoder's own output, then one field is
# replaced (bypassing the encoder's types), so they follow the wire format.
ADDR_FIELDS = {"tag": 0, "version": 1, "provider": 2, "incarnation": 3, "nics": 4, "max_frame": 5,
               "host": 6, "pid": 7, "pstart": 8}
DESC_FIELDS = {"tag": 0, "version": 1, "owner": 2, "addr": 3, "nbytes": 4, "keys": 5}


def _replace(fields: list[Any], names: dict[str, int], override: dict[str, Any]) -> list[Any]:
    for name, value in override.items():
        fields[names[name]] = value
    return fields


def raw_owner(**override: Any) -> list[Any]:
    """The address fields a descriptor embeds (an address minus tag and version)."""
    fields = msgpack.unpackb(wire.encode_address(BODY), raw=False)
    return _replace(fields, ADDR_FIELDS, override)[2:]


def raw_address(**override: Any) -> bytes:
    fields = msgpack.unpackb(wire.encode_address(BODY), raw=False)
    return msgpack.packb(_replace(fields, ADDR_FIELDS, override), use_bin_type=True)


def raw_descriptor(**override: Any) -> bytes:
    fields = msgpack.unpackb(wire.encode_descriptor(wire.DescriptorBody(BODY, 4096, 100, (9,))), raw=False)
    return msgpack.packb(_replace(fields, DESC_FIELDS, override), use_bin_type=True)


def test_raw_helpers_are_valid() -> None:
    """The rejection tests below change one field of these; unchanged, they decode."""
    assert wire.decode_address(raw_address()) == BODY
    assert wire.decode_descriptor(raw_descriptor()) == wire.DescriptorBody(BODY, 4096, 100, (9,))
    assert wire.decode_descriptor(raw_descriptor(owner=raw_owner())).owner == BODY
    assert wire.decode_address(raw_address(nics=[[b"a", 1, 2], [b"b", 3, 4]])).nics[1] == (b"b", 3, 4)


# -------------------------------------------------------------- round trips

@untimed
@given(address_bodies())
def test_address_round_trip(body: wire.AddressBody) -> None:
    blob = wire.encode_address(body)
    assert len(blob) <= wire.MAX_ADDRESS_BYTES
    assert wire.decode_address(blob) == body
    a = Address(body)
    b = Address.from_bytes(a.to_bytes())
    assert b == a and hash(b) == hash(a)
    assert (b.provider, b.incarnation, b.nics) == (body.provider, body.incarnation, body.nics)


@untimed
@given(descriptor_bodies())
def test_descriptor_round_trip(body: wire.DescriptorBody) -> None:
    blob = wire.encode_descriptor(body)
    assert len(blob) <= wire.MAX_DESCRIPTOR_BYTES
    assert wire.decode_descriptor(blob) == body
    d = RegionDescriptor(Address(body.owner), body.addr, body.nbytes, body.keys)
    e = RegionDescriptor.from_bytes(d.to_bytes())
    assert e == d and hash(e) == hash(d)
    assert (e.addr, e.nbytes, e.keys, e.owner) == (body.addr, body.nbytes, body.keys, Address(body.owner))


def test_largest_encodings_fit() -> None:
    nics = tuple(wire.NicAddress(bytes([i]) * wire.MAX_NIC_NAME, U64, U64) for i in range(wire.MAX_NICS))
    body = wire.AddressBody("p" * wire.MAX_PROVIDER, U64, nics)
    if HAS_MAX_FRAME:
        body = body._replace(max_frame=2**32 - 1)
    assert wire.decode_address(wire.encode_address(body)) == body
    desc = wire.DescriptorBody(body, 0, U64, (U64,) * wire.MAX_NICS)
    assert wire.decode_descriptor(wire.encode_descriptor(desc)) == desc


def test_bytes_like_inputs_accepted() -> None:
    blob = wire.encode_address(BODY)
    assert wire.decode_address(bytearray(blob)) == BODY
    assert wire.decode_address(memoryview(blob)) == BODY


def test_address_identity() -> None:
    a, b = make_address(incarnation=1), make_address(incarnation=2)
    assert a != b and a == make_address(incarnation=1)
    assert len({a, b, make_address(incarnation=1)}) == 2
    assert a != a.to_bytes()
    assert "shm" in repr(a)


# ---------------------------------------------------------------- rejections

def _every_prefix_rejected(decode: Any, blob: bytes) -> None:
    for i in range(len(blob)):
        with pytest.raises(ProtocolError):
            decode(blob[:i])


def test_truncated_address_rejected() -> None:
    _every_prefix_rejected(wire.decode_address, wire.encode_address(make_address(nics=4)._body))


def test_truncated_descriptor_rejected() -> None:
    _every_prefix_rejected(wire.decode_descriptor, RegionDescriptor(make_address(nics=2), 4096, 1 << 40, (1, 2)).to_bytes())


@untimed
@given(descriptor_bodies())
def test_truncated_random_descriptor_rejected(body: wire.DescriptorBody) -> None:
    _every_prefix_rejected(wire.decode_descriptor, wire.encode_descriptor(body))
    _every_prefix_rejected(wire.decode_address, wire.encode_address(body.owner))


def test_trailing_bytes_rejected() -> None:
    with pytest.raises(ProtocolError):
        wire.decode_address(wire.encode_address(BODY) + b"\x00")
    with pytest.raises(ProtocolError):
        wire.decode_descriptor(raw_descriptor() + b"\xc0")


def test_oversized_input_rejected() -> None:
    blob = wire.encode_address(BODY)
    with pytest.raises(ProtocolError, match="limit"):
        wire.decode_address(blob + b"\x00" * (wire.MAX_ADDRESS_BYTES + 1 - len(blob)))
    with pytest.raises(ProtocolError, match="limit"):
        wire.decode_descriptor(b"\x00" * (wire.MAX_DESCRIPTOR_BYTES + 1))
    with pytest.raises(ProtocolError):  # a NIC name longer than any endpoint name
        wire.decode_address(raw_address(nics=[[b"x" * (wire.MAX_NIC_NAME + 1), 0, 5]]))
    with pytest.raises(ProtocolError):
        wire.decode_address(raw_address(provider="p" * (wire.MAX_PROVIDER + 1)))
    with pytest.raises(ProtocolError):
        wire.decode_address(raw_address(nics=[[b"n", 0, 5]] * 17))


@pytest.mark.parametrize("version", [0, 1, 3, 255, -1, True, 2.0, "2", None, [2]])
def test_wrong_version_rejected(version: Any) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_address(raw_address(version=version))
    with pytest.raises(ProtocolError):
        wire.decode_descriptor(raw_descriptor(version=version))


@pytest.mark.parametrize("tag", ["af.region", "AF.ADDR", "", b"af.addr", 1, None])
def test_wrong_tag_rejected(tag: Any) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_address(raw_address(tag=tag))
    with pytest.raises(ProtocolError):
        wire.decode_descriptor(raw_descriptor(tag="af.addr" if tag == "af.region" else tag))


def test_address_and_descriptor_are_not_interchangeable() -> None:
    with pytest.raises(ProtocolError):
        wire.decode_descriptor(raw_address())
    with pytest.raises(ProtocolError):
        wire.decode_address(raw_descriptor())


@pytest.mark.parametrize("override", [
    {"provider": b"shm"}, {"provider": ""}, {"provider": 3}, {"provider": None},
    {"incarnation": -1}, {"incarnation": 1.0}, {"incarnation": True}, {"incarnation": "1"},
    {"nics": {}}, {"nics": b"x"}, {"nics": [b"name", 0, 5]}, {"nics": [[b"name", 0]]}, {"nics": [[b"name", 0, 5, 6]]},
    {"nics": [["name", 0, 5]]}, {"nics": [[b"", 0, 5]]}, {"nics": [[b"name", -1, 5]]}, {"nics": [[b"name", 0, 5.0]]},
    {"nics": [[b"name", False, 5]]}, {"nics": [[b"name", 0, None]]},
])
def test_wrong_address_field_rejected(override: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_address(raw_address(**override))
    with pytest.raises(ProtocolError):
        wire.decode_descriptor(raw_descriptor(owner=raw_owner(**override)))


@pytest.mark.skipif(not HAS_MAX_FRAME, reason="this wire format has no max_frame")
@pytest.mark.parametrize("value", [0, MIN_FRAME - 1, -1, 2**32, 65536.0, True, None, "65536"])
def test_wrong_max_frame_rejected(value: Any) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_address(raw_address(max_frame=value))
    with pytest.raises(ProtocolError):
        wire.decode_descriptor(raw_descriptor(owner=raw_owner(max_frame=value)))
    for ok in (MIN_FRAME, 2**32 - 1):
        assert wire.decode_address(raw_address(max_frame=ok)).max_frame == ok


@pytest.mark.parametrize("override", [
    {"owner": raw_owner()[:-1]}, {"owner": raw_owner() + [0]}, {"owner": b"shm"}, {"owner": None}, {"addr": -1}, {"addr": 1.5}, {"addr": True},
    {"nbytes": -1}, {"nbytes": "100"}, {"keys": 9}, {"keys": [-1]}, {"keys": [9.0]}, {"keys": [True]},
    {"keys": None},
])
def test_wrong_descriptor_field_rejected(override: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_descriptor(raw_descriptor(**override))


@pytest.mark.parametrize("blob", [
    msgpack.packb({"af.addr": 1}), msgpack.packb(["af.addr", 1, "shm", 1, {"n": 1}]),
    msgpack.packb(msgpack.ExtType(1, b"x")), msgpack.packb("af.addr"), msgpack.packb(None), b"",
    msgpack.packb(msgpack.unpackb(raw_address())[:-1]), msgpack.packb(msgpack.unpackb(raw_address()) + [0]),
])
def test_malformed_structure_rejected(blob: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_address(blob)


@pytest.mark.parametrize("nkeys,nnics", [(0, 1), (2, 1), (3, 4), (1, 2)])
def test_wrong_key_count_rejected(nkeys: int, nnics: int) -> None:
    owner = raw_owner(nics=[[b"nic%d" % i, 0, 5] for i in range(nnics)])
    assert wire.decode_descriptor(raw_descriptor(owner=owner, keys=list(range(nnics)))).keys == tuple(range(nnics))
    with pytest.raises(ProtocolError, match="keys"):
        wire.decode_descriptor(raw_descriptor(owner=owner, keys=list(range(nkeys))))


@pytest.mark.parametrize("count", [0, wire.MAX_NICS + 1])
def test_nic_count_out_of_range_rejected(count: int) -> None:
    nics = [[b"nic%d" % i, 0, 5] for i in range(count)]
    with pytest.raises(ProtocolError, match="NICs"):
        wire.decode_address(raw_address(nics=nics))
    with pytest.raises(ProtocolError):
        wire.decode_descriptor(raw_descriptor(owner=raw_owner(nics=nics), keys=list(range(count))))


@pytest.mark.parametrize("addr,nbytes,ok", [
    (U64, 1, True), (0, U64, True), (2**63, 2**63, True), (U64 - 9, 10, True),
    (U64, 2, False), (2**63, 2**63 + 1, False), (U64, U64, False), (U64 - 9, 11, False),
])
def test_region_wrapping_the_address_space(addr: int, nbytes: int, ok: bool) -> None:
    blob = raw_descriptor(addr=addr, nbytes=nbytes)
    if ok:
        assert wire.decode_descriptor(blob).addr == addr
    else:
        with pytest.raises(ProtocolError, match="wraps"):
            wire.decode_descriptor(blob)


@untimed
@given(st.binary(max_size=600))
def test_random_bytes_never_escape_as_other_errors(blob: bytes) -> None:
    for decode, kind in ((wire.decode_address, wire.AddressBody), (wire.decode_descriptor, wire.DescriptorBody)):
        try:
            out = decode(blob)
        except ProtocolError:
            continue
        assert isinstance(out, kind)  # astronomically unlikely, but a valid decode is allowed


@untimed
@given(st.binary(max_size=600))
def test_random_bytes_rejected_by_classes(blob: bytes) -> None:
    with pytest.raises(ProtocolError):
        Address.from_bytes(b"\x95\xa7af.adds" + blob)  # wrong tag: never valid
    with pytest.raises(ProtocolError):
        RegionDescriptor.from_bytes(b"\x96\xa9af.region\x02" + blob)  # version 2: never valid


@pytest.mark.parametrize("value", ["af.addr", None, 5, [1, 2], ("af.addr",)])
def test_non_bytes_input_is_type_error(value: Any) -> None:
    for decode in (wire.decode_address, wire.decode_descriptor, Address.from_bytes, RegionDescriptor.from_bytes):
        with pytest.raises(TypeError):
            decode(value)


# ------------------------------------------------------------ message header

@untimed
@given(st.binary(max_size=wire.MAX_ADDRESS_BYTES), st.binary(max_size=64))
def test_msg_header_round_trip(sender: bytes, payload: bytes) -> None:
    frame = wire.encode_msg_header(sender) + payload
    got, offset = wire.decode_msg_header(frame)
    assert got == sender
    assert frame[offset:] == payload


def test_msg_header_truncated_rejected() -> None:
    frame = wire.encode_msg_header(wire.encode_address(BODY))
    assert wire.decode_msg_header(frame)[1] == len(frame)
    _every_prefix_rejected(wire.decode_msg_header, frame)


def test_msg_header_bad_magic_and_version_rejected() -> None:
    frame = bytearray(wire.encode_msg_header(b"sender") + b"payload")
    for i in range(3):
        bad = bytearray(frame)
        bad[i] ^= 0x20
        with pytest.raises(ProtocolError, match="magic"):
            wire.decode_msg_header(bytes(bad))
    for version in (0, 1, 3, 255):
        bad = bytearray(frame)
        bad[3] = version
        with pytest.raises(ProtocolError, match="version"):
            wire.decode_msg_header(bytes(bad))


def test_msg_header_oversized_sender_rejected() -> None:
    sender = b"s" * (wire.MAX_ADDRESS_BYTES + 1)
    with pytest.raises(ProtocolError):
        wire.decode_msg_header(wire.encode_msg_header(sender) + b"payload")


@untimed
@given(st.binary(max_size=64))
def test_msg_header_random_bytes(frame: bytes) -> None:
    try:
        sender, offset = wire.decode_msg_header(frame)
    except ProtocolError:
        return
    assert frame[:3] == b"AFm" and frame[3] == wire.WIRE_VERSION
    assert offset == 6 + len(sender) <= len(frame)


@pytest.mark.parametrize("value", ["AFm\x01\x00\x00", None, 7])
def test_msg_header_non_bytes_is_type_error(value: Any) -> None:
    with pytest.raises(TypeError):
        wire.decode_msg_header(value)


# ------------------------------------------------------- descriptor slicing

@pytest.fixture
def desc() -> RegionDescriptor:
    return RegionDescriptor(make_address(nics=2), 0x1000, 100, (11, 22))


@pytest.mark.parametrize("key,start,length", [
    (slice(10, 20), 10, 10), (slice(None), 0, 100), (slice(None, None, 1), 0, 100), (slice(0, 100), 0, 100),
    (slice(-10, None), 90, 10), (slice(None, -10), 0, 90), (slice(-100, -50), 0, 50), (slice(5, 5), 5, 0),
    (slice(100, None), 100, 0), (slice(-30, 90), 70, 20),
])
def test_descriptor_slice_narrows(desc: RegionDescriptor, key: slice, start: int, length: int) -> None:
    sub = desc[key]
    assert (sub.addr, sub.nbytes, len(sub)) == (0x1000 + start, length, length)
    assert sub.owner is desc.owner and sub.keys == desc.keys
    assert RegionDescriptor.from_bytes(sub.to_bytes()) == sub


def test_descriptor_slice_of_slice(desc: RegionDescriptor) -> None:
    sub = desc[10:60][5:-5]
    assert (sub.addr, sub.nbytes) == (0x1000 + 15, 40)
    with pytest.raises(ValueError):
        desc[10:60][0:51]


@pytest.mark.parametrize("key", [
    slice(0, 101), slice(-101, None), slice(None, -101), slice(101, None), slice(50, 40), slice(-10, -20),
    slice(0, 2**64),
])
def test_descriptor_slice_never_clamps(desc: RegionDescriptor, key: slice) -> None:
    with pytest.raises(ValueError):
        desc[key]


@pytest.mark.parametrize("key", [slice(0, 10, 2), slice(None, None, -1), slice(0, 10, 0)])
def test_descriptor_slice_step_rejected(desc: RegionDescriptor, key: slice) -> None:
    with pytest.raises(ValueError, match="step"):
        desc[key]


@pytest.mark.parametrize("key", [0, -1, "a", (0, 1), None, slice(0.0, 1), slice("a", "b"), slice(0, True)])
def test_descriptor_non_slice_or_non_int_bounds_is_type_error(desc: RegionDescriptor, key: Any) -> None:
    with pytest.raises(TypeError):
        desc[key]


@untimed
@given(st.integers(0, 64), st.integers(-80, 80) | st.none(), st.integers(-80, 80) | st.none())
def test_descriptor_slice_matches_python_or_refuses(nbytes: int, a: int | None, b: int | None) -> None:
    d = RegionDescriptor(make_address(), 1 << 20, nbytes, (1,))
    start = 0 if a is None else a + nbytes if a < 0 else a
    stop = nbytes if b is None else b + nbytes if b < 0 else b
    if 0 <= start <= stop <= nbytes:
        r = range(d.addr, d.addr + nbytes)[a:b]
        assert (d[a:b].addr, d[a:b].nbytes) == (d.addr + start, len(r))
        assert len(r) == 0 or r.start == d.addr + start
    else:
        with pytest.raises(ValueError):
            d[a:b]
