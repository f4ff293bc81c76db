#!/usr/bin/env python3
"""Mutation fuzzer for aiofabric.wire: no dependencies beyond aiofabric itself.

    python scripts/fuzz_wire.py --seconds 60 [--seed 1]

Starts from valid encodings built with the wire API (addresses with 1-4 NICs,
region descriptors, message frames), mutates them (bit flips, interesting
bytes, truncation, extension, splicing, huge msgpack length prefixes,
structural edits of the decoded msgpack tree) and feeds every input to
``wire.decode_address``, ``wire.decode_descriptor``, ``wire.decode_msg_header``,
``Address.from_bytes``, ``RegionDescriptor.from_bytes`` and the engine's
receive path (message header, then the sender's address).

A decoder may succeed or raise ``aiofabric.ProtocolError``; anything else is a
finding.  So is a success that does not round-trip (re-encoding must decode to
an equal value; a message frame must re-encode byte for byte), and a class
decoder disagreeing with its wire function.  Findings are printed (input hex,
a minimized input, traceback); the exit status is 1 if there was any.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import msgpack

from aiofabric import Address, ProtocolError, RegionDescriptor, wire

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
MAX_CORPUS = 4096
MAX_INPUT = 8192  # inputs past the decoders' limits still get tried, but not without bound

# ------------------------------------------------------------------ seeds

INTERESTING_INTS = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, U32, U32 + 1, 1 << 63, U64]


def _int(rng: random.Random, hi: int) -> int:
    if rng.random() < 0.3:
        return rng.choice([v for v in INTERESTING_INTS if v <= hi])
    return rng.randint(0, hi)


def random_address_body(rng: random.Random) -> wire.AddressBody:
    nics = tuple(
        wire.NicAddress(rng.randbytes(rng.choice([1, 2, 16, 23, 56, rng.randint(1, wire.MAX_NIC_NAME)])),
                        _int(rng, U64), _int(rng, U64))
        for _ in range(rng.randint(1, wire.MAX_NICS))
    )
    provider = rng.choice(["shm", "tcp;ofi_rxm", "udp;ofi_rxd", "efa", "verbs;ofi_rxm", "p" * wire.MAX_PROVIDER,
                           "ü" * 32, "x"])
    values: dict[str, Any] = {"provider": provider, "incarnation": _int(rng, U64), "nics": nics,
                              "max_frame": rng.choice([wire.MIN_FRAME, 65536, U32, rng.randint(wire.MIN_FRAME, U32)]),
                              "host": _int(rng, U64), "pid": _int(rng, U32), "pstart": _int(rng, U64)}
    return wire.AddressBody(**{k: v for k, v in values.items() if k in wire.AddressBody._fields})


def random_descriptor_body(rng: random.Random) -> wire.DescriptorBody:
    owner = random_address_body(rng)
    addr = _int(rng, U64)
    room = min(U64, U64 + 1 - addr)  # addr + nbytes may reach 2**64, nbytes itself fits 64 bits
    nbytes = rng.choice([0, 1, min(4096, room), room, rng.randint(0, room)])
    return wire.DescriptorBody(owner, addr, nbytes, tuple(_int(rng, U64) for _ in owner.nics))


#: corpus kinds: which decoder's acceptance admits a mutant into each
KINDS = {"address": "decode_address", "descriptor": "decode_descriptor", "frame": "frame->Address"}


def seeds(rng: random.Random, n: int) -> dict[str, list[bytes]]:
    """``n`` valid encodings of each kind."""
    frames = []
    for i in range(n):
        if i % 4 == 3:  # a frame whose "sender" is any bytes (decode_msg_header accepts it)
            sender = rng.randbytes(rng.randint(0, 64))
        else:  # a message frame as the engine sends it: header, sender address, payload
            sender = wire.encode_address(random_address_body(rng))
        frames.append(wire.encode_msg_header(sender) + rng.randbytes(rng.choice([0, 1, 8, 100])))
    return {
        "address": [wire.encode_address(random_address_body(rng)) for _ in range(n)],
        "descriptor": [wire.encode_descriptor(random_descriptor_body(rng)) for _ in range(n)],
        "frame": frames,
    }


# -------------------------------------------------------------- mutations

# 0x00/0xff/0x7f/0x80 and msgpack type bytes: nil, false/true, bin8/16/32,
# ext8/16/32, float32/64, uint8..64, int8..64, fixext1..16, str8/16/32,
# array16/32, map16/32, plus fixarray/fixmap/fixstr/negative-fixint edges.
INTERESTING_BYTES = bytes([0x00, 0x01, 0xFF, 0x7F, 0x80, 0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8,
                           0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6,
                           0xD7, 0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0x90, 0x9F, 0x8F, 0xA0, 0xBF,
                           0xE0, 0x02, 0x03])
HUGE_PREFIXES = [
    b"\xdd\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff", b"\xdc\xff\xff",  # array32 / array16
    b"\xdb\xff\xff\xff\xff", b"\xda\xff\xff", b"\xd9\xff",  # str32 / str16 / str8
    b"\xc6\xff\xff\xff\xff", b"\xc6\x7f\xff\xff\xff", b"\xc5\xff\xff", b"\xc4\xff",  # bin32 / bin16 / bin8
    b"\xdf\xff\xff\xff\xff", b"\xde\xff\xff",  # map32 / map16
    b"\xc9\xff\xff\xff\xff\x01", b"\xc8\xff\xff\x01", b"\xc7\xff\x01",  # ext32 / ext16 / ext8
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",  # u64 max / i64 min
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",  # float64 NaN
]
MSGPACK_VALUES: list[Any] = [
    None, True, False, 0, 1, -1, 2, 1023, 1024, U32, U32 + 1, U64, -(1 << 63), 1.0, float("nan"), float("inf"),
    "", "af.addr", "af.region", "shm", "x" * 65, b"", b"x", b"x" * 257, [], [0], [b"n", 0, 5], [[b"n", 0, 5]] * 5,
    [[]] * 16, {}, {"a": 1}, msgpack.ExtType(1, b"x"), msgpack.Timestamp(1, 0),
]


def _flip_bits(rng: random.Random, b: bytearray) -> None:
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b) * 8)
        b[i // 8] ^= 1 << (i % 8)


def _interesting_byte(rng: random.Random, b: bytearray) -> None:
    for _ in range(rng.randint(1, 3)):
        b[rng.randrange(len(b))] = rng.choice(INTERESTING_BYTES)


def _random_byte(rng: random.Random, b: bytearray) -> None:
    b[rng.randrange(len(b))] = rng.randrange(256)


def _truncate(rng: random.Random, b: bytearray) -> None:
    del b[rng.randrange(len(b)):]


def _delete(rng: random.Random, b: bytearray) -> None:
    i = rng.randrange(len(b))
    del b[i:i + rng.randint(1, 16)]


def _extend(rng: random.Random, b: bytearray) -> None:
    r = rng.random()
    if r < 0.4:
        b += rng.randbytes(rng.randint(1, 32))
    elif r < 0.7:
        i = rng.randrange(len(b))
        b += b[i:i + rng.randint(1, 64)]
    else:
        b += bytes([rng.choice(INTERESTING_BYTES)]) * rng.randint(1, 3000)


def _insert(rng: random.Random, b: bytearray) -> None:
    i = rng.randrange(len(b) + 1)
    if rng.random() < 0.5:
        b[i:i] = rng.randbytes(rng.randint(1, 8))
    else:
        b[i:i] = bytes([rng.choice(INTERESTING_BYTES)]) * rng.randint(1, 4)


def _huge_prefix(rng: random.Random, b: bytearray) -> None:
    i = rng.randrange(len(b) + 1)
    p = rng.choice(HUGE_PREFIXES)
    if rng.random() < 0.5:
        b[i:i] = p
    else:
        b[i:i + len(p)] = p


def _msg_length(rng: random.Random, b: bytearray) -> None:
    """Rewrite a message frame's sender-length field (bytes 4-5, little-endian)."""
    if len(b) >= 6:
        n = rng.choice([0, 1, 0xFFFF, 0x7FFF, 0x8000, 2048, 2049, len(b) - 6, len(b) - 5, rng.randrange(65536)])
        b[4:6] = min(n, 0xFFFF).to_bytes(2, "little")


Mutator = Callable[[random.Random, bytearray], None]
BYTE_MUTATORS: list[Mutator] = [_flip_bits, _interesting_byte, _random_byte, _truncate, _delete, _extend,
                                _insert, _huge_prefix, _msg_length]


def _structural(rng: random.Random, blob: bytes) -> bytes | None:
    """Decode the msgpack tree (trusting it, unlike the decoders), change one
    node, re-encode.  Reaches the field checks that byte flips rarely do."""
    start, end = 0, len(blob)
    if blob[:3] == b"AFm" and len(blob) >= 6:  # a frame: mutate its sender address
        start, end = 6, 6 + int.from_bytes(blob[4:6], "little")
    try:
        tree = msgpack.unpackb(blob[start:end], raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - not a tree: leave it to the byte mutators
        return None
    if not isinstance(tree, list):
        return None
    lists: list[list[Any]] = []
    stack: list[Any] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            lists.append(node)
            stack.extend(node)
    target = rng.choice(lists)
    r = rng.random()
    if not target or r < 0.15:
        target.append(rng.choice(MSGPACK_VALUES))
    elif r < 0.3:
        del target[rng.randrange(len(target))]
    elif r < 0.4:
        target.insert(rng.randrange(len(target) + 1), target[rng.randrange(len(target))])
    elif r < 0.5:
        i = rng.randrange(len(target))
        target[i] = [target[i]]
    else:
        target[rng.randrange(len(target))] = rng.choice(MSGPACK_VALUES)
    try:
        body = msgpack.packb(tree, use_bin_type=rng.random() < 0.9)
    except Exception:  # noqa: BLE001 - e.g. an int past 64 bits
        return None
    return wire.encode_msg_header(body) + blob[end:] if start else body


def mutate(rng: random.Random, corpus: dict[str, list[bytes]]) -> tuple[str, bytes]:
    kind = rng.choice(list(corpus))
    blob = rng.choice(corpus[kind])
    if rng.random() < 0.2:
        out = _structural(rng, blob)
        if out is not None:
            return kind, out
    if rng.random() < 0.1:  # splice two inputs, of any kinds
        other = rng.choice(corpus[rng.choice(list(corpus))])
        blob = blob[:rng.randrange(len(blob) + 1)] + other[rng.randrange(len(other) + 1):]
    b = bytearray(blob)
    for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
        if not b:
            b += rng.randbytes(rng.randint(1, 16))
        rng.choice(BYTE_MUTATORS)(rng, b)
    return kind, bytes(b[:MAX_INPUT])


# ---------------------------------------------------------------- targets

class Mismatch(AssertionError):
    """A decode succeeded but did not round-trip, or two decoders disagree."""


def _round_trip(what: str, value: Any, again: Callable[[], Any]) -> None:
    """``again()`` re-encodes ``value`` and decodes that: it must succeed and be equal."""
    try:
        other = again()
    except ProtocolError as exc:
        raise Mismatch(f"{what} re-encoding is rejected ({exc}): {value!r:.200}") from None
    if other != value or (isinstance(value, (Address, RegionDescriptor)) and hash(other) != hash(value)):
        raise Mismatch(f"{what} does not round-trip: {value!r:.200} != {other!r:.200}")


def _check_address(blob: Any) -> Any:
    body = wire.decode_address(blob)
    _round_trip("address", body, lambda: wire.decode_address(wire.encode_address(body)))
    return body


def _check_descriptor(blob: Any) -> Any:
    body = wire.decode_descriptor(blob)
    _round_trip("descriptor", body, lambda: wire.decode_descriptor(wire.encode_descriptor(body)))
    return body


def _check_address_class(blob: Any) -> Any:
    a = Address.from_bytes(blob)
    _round_trip("Address", a, lambda: Address.from_bytes(a.to_bytes()))
    return a


def _check_descriptor_class(blob: Any) -> Any:
    d = RegionDescriptor.from_bytes(blob)
    _round_trip("RegionDescriptor", d, lambda: RegionDescriptor.from_bytes(d.to_bytes()))
    return d


def _sender_and_offset(frame: bytes) -> tuple[bytes, int]:
    sender, off = wire.decode_msg_header(frame)
    return bytes(sender), off


def _check_msg_header(frame: Any) -> Any:
    sender, off = wire.decode_msg_header(frame)
    again = wire.encode_msg_header(bytes(sender)) + bytes(frame[off:])
    if again != bytes(frame):
        raise Mismatch(f"message frame re-encodes differently: {again[:16].hex()}... != {bytes(frame[:16]).hex()}...")
    _round_trip("message header", (bytes(sender), off), lambda: _sender_and_offset(again))
    return sender, off


def _check_frame(frame: Any) -> Any:
    """What the engine does with a received frame (TransferEngine._on_message)."""
    sender, off = wire.decode_msg_header(frame)
    return Address.from_bytes(sender), frame[off:]


TARGETS: dict[str, Callable[[Any], Any]] = {
    "decode_address": _check_address,
    "decode_descriptor": _check_descriptor,
    "Address.from_bytes": _check_address_class,
    "RegionDescriptor.from_bytes": _check_descriptor_class,
    "decode_msg_header": _check_msg_header,
    "frame->Address": _check_frame,
}
#: the wire functions whose rejection messages are counted (the others wrap them)
COUNTED = ("decode_address", "decode_descriptor", "decode_msg_header")
#: class decoders must agree with their wire functions: (class target, wire target)
PAIRS = [("Address.from_bytes", "decode_address"), ("RegionDescriptor.from_bytes", "decode_descriptor")]


def normalize(message: str) -> str:
    """A rejection message without its numbers and quoted values, to count kinds."""
    message = re.sub(r"b?'[^']*'|b?\"[^\"]*\"", "'…'", message)
    return re.sub(r"-?\d+", "N", message)[:110]


@dataclass
class Finding:
    target: str
    blob: bytes
    kind: str
    trace: str
    minimized: bytes = b""


@dataclass
class Stats:
    seed: int = 0
    seconds: float = 0.0
    inputs: int = 0
    executions: int = 0
    accepted: int = 0
    rejected: int = 0
    slowest: float = 0.0
    slowest_target: str = ""
    slowest_input: bytes = b""
    findings: list[Finding] = field(default_factory=list)
    messages: Counter[str] = field(default_factory=Counter)
    accepted_by: Counter[str] = field(default_factory=Counter)
    corpus: int = 0


def run_one(target: str, blob: Any) -> tuple[str, str]:
    """("ok", "") / ("rejected", message) / (finding kind, traceback)."""
    try:
        TARGETS[target](blob)
    except ProtocolError as exc:
        return "rejected", str(exc)
    except Mismatch as exc:
        return f"Mismatch: {exc}", traceback.format_exc()
    except Exception as exc:  # noqa: BLE001 - any other exception is what we are looking for
        return f"{type(exc).__name__}", traceback.format_exc()
    return "ok", ""


def _signature(target: str, kind: str, trace: str) -> tuple[str, str, str]:
    last = [ln for ln in trace.strip().splitlines() if ln.startswith("  File ")]
    return target, kind.split(":")[0], last[-1] if last else ""


def minimize(target: str, blob: bytes, kind: str, trace: str, budget: int = 20000) -> bytes:
    """Shrink ``blob`` while it keeps failing the same way (chunk deletion)."""
    want = _signature(target, kind, trace)
    best = blob
    chunk = max(1, len(best) // 2)
    while chunk >= 1 and budget > 0:
        i, shrunk = 0, False
        while i < len(best) and budget > 0:
            cand = best[:i] + best[i + chunk:]
            budget -= 1
            k, t = run_one(target, cand)
            if k not in ("ok", "rejected") and _signature(target, k, t) == want:
                best, shrunk = cand, True
            else:
                i += chunk
        if not shrunk:
            chunk //= 2
    return best


def fuzz(seconds: float, seed: int, out: TextIO | None = None, max_inputs: int | None = None,
         max_findings: int = 20) -> Stats:
    """Fuzz for ``seconds`` (or ``max_inputs`` inputs); findings are printed to ``out`` as they come."""
    out = out or sys.stdout
    rng = random.Random(seed)
    corpus = seeds(rng, 128)
    plain = {"address": wire.decode_address, "descriptor": wire.decode_descriptor, "frame": wire.decode_msg_header}
    for kind, blobs in corpus.items():  # a seed that does not decode is a bug of this script
        for blob in blobs:
            plain[kind](blob)
    initial = [blob for blobs in corpus.values() for blob in blobs]
    n_seeds = {kind: len(blobs) for kind, blobs in corpus.items()}
    seen = set(initial)
    stats = Stats(seed=seed)
    signatures: set[tuple[str, str, str]] = set()
    wrappers: list[Callable[[bytes], Any]] = [bytes, bytes, bytes, bytearray, memoryview]
    start = time.perf_counter()
    deadline = start + seconds
    while len(stats.findings) < max_findings:
        if stats.inputs % 64 == 0 and time.perf_counter() >= deadline:
            break
        if max_inputs is not None and stats.inputs >= max_inputs:
            break
        if stats.inputs < len(initial):  # the seeds themselves first: they must all decode
            blob = initial[stats.inputs]
        else:
            blob = mutate(rng, corpus)[1]
        stats.inputs += 1
        wrap = rng.choice(wrappers)
        results: dict[str, str] = {}
        for target in TARGETS:
            t0 = time.perf_counter()
            kind, detail = run_one(target, wrap(blob))
            dt = time.perf_counter() - t0
            stats.executions += 1
            if dt > stats.slowest:
                stats.slowest, stats.slowest_target, stats.slowest_input = dt, target, blob
            results[target] = kind
            if kind == "ok":
                stats.accepted += 1
                stats.accepted_by[target] += 1
            elif kind == "rejected":
                stats.rejected += 1
                if target in COUNTED:
                    stats.messages[normalize(detail)] += 1
            else:
                sig = _signature(target, kind, detail)
                if sig not in signatures:
                    signatures.add(sig)
                    f = Finding(target, blob, kind, detail)
                    f.minimized = minimize(target, blob, kind, detail)
                    stats.findings.append(f)
                    report_finding(f, out)
        if blob not in seen:  # a new valid input joins its kind's corpus (the seeds stay)
            for ckind, target in KINDS.items():
                if results[target] == "ok":
                    seen.add(blob)
                    blobs = corpus[ckind]
                    if len(blobs) < MAX_CORPUS:
                        blobs.append(blob)
                    else:
                        blobs[rng.randrange(n_seeds[ckind], len(blobs))] = blob
        for cls, fn in PAIRS:
            if (results[cls] == "ok") != (results[fn] == "ok"):
                kind = f"Mismatch: {cls} {results[cls]!r:.40} but {fn} {results[fn]!r:.40}"
                sig = (cls, "disagree", fn)
                if sig not in signatures:
                    signatures.add(sig)
                    f = Finding(cls, blob, kind, "", blob)
                    stats.findings.append(f)
                    report_finding(f, out)
    stats.seconds = time.perf_counter() - start
    stats.corpus = sum(len(blobs) for blobs in corpus.values())
    return stats


def report_finding(f: Finding, out: TextIO) -> None:
    print(f"\n=== FINDING in {f.target}: {f.kind}", file=out)
    print(f"input ({len(f.blob)} bytes): {f.blob.hex()}", file=out)
    if f.minimized and f.minimized != f.blob:
        print(f"minimized ({len(f.minimized)} bytes): {f.minimized.hex()}", file=out)
    if f.trace:
        print(f.trace.rstrip(), file=out)
    out.flush()


def summary(stats: Stats, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    rate = stats.executions / stats.seconds if stats.seconds else 0.0
    print(f"fuzz_wire: seed {stats.seed}, {stats.seconds:.1f} s, {stats.inputs} inputs x {len(TARGETS)} decoders",
          file=out)
    print(f"executions: {stats.executions} ({rate:.0f}/s)", file=out)
    print(f"accepted: {stats.accepted} ({', '.join(f'{k} {v}' for k, v in sorted(stats.accepted_by.items()))})",
          file=out)
    print(f"rejected: {stats.rejected}", file=out)
    print(f"findings: {len(stats.findings)}", file=out)
    print(f"corpus: {stats.corpus} inputs; slowest decode {stats.slowest * 1e3:.2f} ms "
          f"({stats.slowest_target}, {len(stats.slowest_input)}-byte input)",
          file=out)
    print(f"distinct rejection messages: {len(stats.messages)}; top 10:", file=out)
    for msg, n in stats.messages.most_common(10):
        print(f"  {n:9d}  {msg}", file=out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=10.0, help="how long to fuzz (default 10)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    ap.add_argument("--max-inputs", type=int, default=None, help="stop after this many inputs")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    stats = fuzz(args.seconds, seed, max_inputs=args.max_inputs)
    summary(stats)
    return 1 if stats.findings else 0


if __name__ == "__main__":
    sys.exit(main())
