"""Fuzzing aiofabric.wire: a short run of scripts/fuzz_wire.py with a fixed
seed, checks that the fuzzer does find bugs planted in the codec, and
hypothesis properties that tests/test_wire.py does not cover (the v2 address
fields; mutated valid encodings; arbitrary msgpack trees behind a valid tag)."""
from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiofabric import Address, ProtocolError, RegionDescriptor, wire

U32, U64 = 2**32 - 1, 2**64 - 1
SEED = 20240611


def _load_fuzzer() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_wire.py"
    spec = importlib.util.spec_from_file_location("fuzz_wire", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_wire"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzz_wire = _load_fuzzer()


# ------------------------------------------------------------- the fuzzer

def test_fuzz_wire_for_3_seconds() -> None:
    out = io.StringIO()
    stats = fuzz_wire.fuzz(3.0, SEED, out=out)
    fuzz_wire.summary(stats, out)
    print(out.getvalue())
    assert not stats.findings, out.getvalue()
    # Every decoder saw inputs it accepted (the seeds at least) and many it rejected.
    assert set(stats.accepted_by) == set(fuzz_wire.TARGETS), stats.accepted_by
    assert stats.rejected > stats.inputs


def test_fuzz_wire_main_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert fuzz_wire.main(["--seconds", "0.3", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    for line in ("executions:", "accepted:", "rejected:", "findings: 0", "distinct rejection messages:"):
        assert line in text


def _unchecked_list(v: Any, n: int | None, what: str) -> list[Any]:
    if type(v) is not list:
        raise ProtocolError(f"{what}: expected a list")
    return v  # no length check: a NIC entry of 2 or 4 fields escapes as ValueError


def _raw_unpack(blob: Any, limit: int, what: str) -> Any:
    if len(blob) > limit:
        raise ProtocolError(f"{what}: too large")
    return msgpack.unpackb(blob, raw=False, max_array_len=16, max_map_len=0)  # msgpack's errors escape


_real_decode_descriptor = wire.decode_descriptor


def _growing_descriptor(blob: Any) -> wire.DescriptorBody:
    d = _real_decode_descriptor(blob)
    return d._replace(nbytes=d.nbytes + 1)  # decode(encode(d)) != d: no round trip


@pytest.mark.parametrize("attr,planted", [
    ("_list", _unchecked_list), ("_unpack", _raw_unpack), ("decode_descriptor", _growing_descriptor),
])
def test_fuzzer_finds_planted_bugs(monkeypatch: pytest.MonkeyPatch, attr: str, planted: Any) -> None:
    """The fuzzer is only worth its run time if it finds bugs: plant some."""
    monkeypatch.setattr(wire, attr, planted)
    out = io.StringIO()
    stats = fuzz_wire.fuzz(20.0, SEED, out=out, max_inputs=6000, max_findings=3)
    assert stats.findings, f"planted bug in wire.{attr} not found in {stats.inputs} inputs"
    if attr == "decode_descriptor":
        assert any(f.kind.startswith("Mismatch") for f in stats.findings)
    assert "=== FINDING" in out.getvalue() and stats.findings[0].blob.hex() in out.getvalue()


# ----------------------------------------------- regressions (found here)

# Found here: decode_msg_header checked the length before the type.
@pytest.mark.parametrize("value", ["", "AFm", [], [1, 2], (0,) * 5])
def test_msg_header_short_non_bytes_is_type_error(value: Any) -> None:
    with pytest.raises(TypeError):
        wire.decode_msg_header(value)


# -------------------------------------------------- hypothesis: the gaps
#
# tests/test_wire.py draws addresses without the v2 fields (host, pid,
# pstart), only mutates inputs by truncation, and feeds random bytes that
# almost never get past msgpack; these go further.

untimed = settings(deadline=None, max_examples=150)
u64 = st.integers(0, U64)

nic_addresses = st.builds(wire.NicAddress, st.binary(min_size=1, max_size=wire.MAX_NIC_NAME), u64, u64)
address_bodies = st.builds(
    wire.AddressBody,
    st.text(min_size=1, max_size=16).map(lambda s: s.encode()[: wire.MAX_PROVIDER].decode(errors="ignore") or "p"),
    u64,
    st.lists(nic_addresses, min_size=1, max_size=wire.MAX_NICS).map(tuple),
    st.integers(wire.MIN_FRAME, U32),
    u64,
    st.integers(0, U32),
    u64,
)


@st.composite
def descriptor_bodies(draw: st.DrawFn) -> wire.DescriptorBody:
    owner = draw(address_bodies)
    addr = draw(u64)
    nbytes = draw(st.integers(0, min(U64, U64 + 1 - addr)))
    return wire.DescriptorBody(owner, addr, nbytes, tuple(draw(u64) for _ in owner.nics))


@untimed
@given(address_bodies)
def test_v2_address_fields_round_trip(body: wire.AddressBody) -> None:
    assert wire.decode_address(wire.encode_address(body)) == body
    a = Address.from_bytes(Address(body).to_bytes())
    assert a._body == body


def _raw_address_fields(**override: Any) -> list[Any]:
    body = wire.AddressBody("shm", 1, (wire.NicAddress(b"nic", 0, 5),), 65536, 7, 8, 9)
    fields = msgpack.unpackb(wire.encode_address(body), raw=False)
    names = ["tag", "version", "provider", "incarnation", "nics", "max_frame", "host", "pid", "pstart"]
    for name, value in override.items():
        fields[names.index(name)] = value
    return fields


@pytest.mark.parametrize("override", [
    {"host": -1}, {"host": -(2**63)}, {"host": True}, {"host": 1.0}, {"host": None}, {"host": b"h"},
    {"pid": -1}, {"pid": 2**32}, {"pid": U64}, {"pid": True}, {"pid": "1"},
    {"pstart": -1}, {"pstart": 0.5}, {"pstart": []}, {"pstart": [1]},
])
def test_wrong_v2_address_field_rejected(override: dict[str, Any]) -> None:
    fields = _raw_address_fields(**override)
    with pytest.raises(ProtocolError):
        wire.decode_address(msgpack.packb(fields, use_bin_type=True))
    desc = ["af.region", wire.WIRE_VERSION, fields[2:], 4096, 100, [9]]
    with pytest.raises(ProtocolError):
        wire.decode_descriptor(msgpack.packb(desc, use_bin_type=True))


def test_v2_field_limits_accepted() -> None:
    fields = _raw_address_fields(host=U64, pid=U32, pstart=U64)
    body = wire.decode_address(msgpack.packb(fields, use_bin_type=True))
    assert (body.host, body.pid, body.pstart) == (U64, U32, U64)


def _decodes_or_protocol_error(decode: Any, blob: bytes) -> None:
    try:
        value = decode(blob)
    except ProtocolError:
        return
    encode = wire.encode_address if decode is wire.decode_address else wire.encode_descriptor
    assert decode(encode(value)) == value  # accepted: must round-trip


@untimed
@given(st.one_of(address_bodies.map(wire.encode_address), descriptor_bodies().map(wire.encode_descriptor)),
       st.lists(st.tuples(st.integers(0), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_valid_encoding(blob: bytes, edits: list[tuple[int, int]]) -> None:
    b = bytearray(blob)
    for pos, value in edits:
        b[pos % len(b)] = value
    for decode in (wire.decode_address, wire.decode_descriptor):
        _decodes_or_protocol_error(decode, bytes(b))


# Scalars chosen near the codec's limits (64-char strings, 256-byte names,
# 64-bit integers, 16-element lists) rather than uniformly: cheaper to draw.
msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), U64) | st.sampled_from([0, 1, 1024, U32, U64, -1])
    | st.floats() | st.text(max_size=8) | st.sampled_from(["", "shm", "af.addr", "p" * 64, "p" * 65])
    | st.binary(max_size=8) | st.sampled_from([b"", b"n" * 256, b"n" * 257]),
    lambda children: st.lists(children, max_size=17),
    max_leaves=20,
)


@untimed
@given(st.lists(msgpack_values, max_size=10), st.booleans())
def test_arbitrary_msgpack_behind_a_valid_tag(rest: list[Any], descriptor: bool) -> None:
    """Valid tag and version, then anything: the field checks must catch it."""
    tag = "af.region" if descriptor else "af.addr"
    blob = msgpack.packb([tag, wire.WIRE_VERSION, *rest], use_bin_type=True)
    _decodes_or_protocol_error(wire.decode_descriptor if descriptor else wire.decode_address, blob)


@untimed
@given(st.lists(msgpack_values, min_size=4, max_size=10))
def test_arbitrary_msgpack_as_descriptor_owner(owner: list[Any]) -> None:
    blob = msgpack.packb(["af.region", wire.WIRE_VERSION, owner, 0, 1, [1]], use_bin_type=True)
    _decodes_or_protocol_error(wire.decode_descriptor, blob)
    try:
        RegionDescriptor.from_bytes(blob)
    except ProtocolError:
        pass
