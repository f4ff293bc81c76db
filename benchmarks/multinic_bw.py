"""Multi-NIC scaling on the two-host namespace rig (tests/netrig.py; needs root).

Hosts A and B are network namespaces joined by veth "rails", each rail
limited with ``tc tbf`` to ``--rate`` Mbit/s, so a rail behaves like a NIC of
that speed.  An initiator in A writes into a target in B with engines of one
NIC (rail 0) and of two NICs (rails 0 and 1), alternating rounds in the same
run, and prints the medians and the 2-NIC/1-NIC ratio (goal: >= 1.8).

    python -m benchmarks.multinic_bw [--provider tcp;ofi_rxm] [--rate 1000] [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from netrig import NetRig, readline, rig_unavailable  # noqa: E402

PEER = str(TESTS / "_rig_peer.py")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not (k.startswith("FI_") and k.endswith("_IFACE"))}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS)])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _tell(p: subprocess.Popen, line: str) -> None:
    p.stdin.write(line.encode() + b"\n")
    p.stdin.flush()


def _expect(p: subprocess.Popen, word: str) -> str:
    got = readline(p, 120).split(maxsplit=1)
    if not got or got[0] != word:
        raise RuntimeError(f"expected {word}, got {got}: {p.stderr.read().decode(errors='replace')[-2000:]}")
    return got[1] if len(got) > 1 else ""


def run_round(rig: NetRig, provider: str, rails: int, ops: list[str], size: int) -> list[dict]:
    pipes = dict(env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    a = ",".join(r.if_a for r in rig.rails[:rails])
    b = ",".join(r.if_b for r in rig.rails[:rails])
    tgt = rig.popen("b", [sys.executable, PEER, "target", provider, b, str(size)], **pipes)
    ini = rig.popen("a", [sys.executable, PEER, "initiator", provider, a], **pipes)
    try:
        _tell(ini, _expect(tgt, "READY"))
        out = []
        for op in ops:
            _tell(ini, op)
            out.append(json.loads(_expect(ini, "DONE")))
        return out
    finally:
        for p in (ini, tgt):
            if p.poll() is None:
                _tell(p, "bye")
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--provider", default="tcp;ofi_rxm")
    ap.add_argument("--rate", type=float, default=1000.0, help="Mbit/s per rail (tbf)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    why = rig_unavailable()
    if why:
        print(f"multinic_bw: the namespace rig is unavailable here: {why}")
        return 2
    size = 64 << 20
    ops = {
        "write 4 MiB x4": f"bench {4 << 20} 4 {args.seconds}",
        "pages 64 KiB x256 x2": f"benchpages {64 << 10} 256 2 {args.seconds}",
    }
    results: dict[str, dict[int, list[float]]] = {name: {1: [], 2: []} for name in ops}
    spread: dict[str, list] = {}
    t0 = time.time()
    with NetRig(rails=2, rate_mbit=[args.rate, args.rate]) as rig:
        for rnd in range(args.rounds):
            for rails in ((1, 2) if rnd % 2 == 0 else (2, 1)):
                for name, res in zip(ops, run_round(rig, args.provider, rails, list(ops.values()), size)):
                    results[name][rails].append(res["gbit_s"])
                    spread[f"{name} {rails} NIC"] = res["bytes_per_nic"]
    print(f"multi-NIC scaling, {args.provider}, 2 rails of {args.rate:g} Mbit/s (tbf), "
          f"{args.rounds} alternating rounds of {args.seconds:g} s, medians ({time.time() - t0:.0f} s)")
    print(f"{'operation':24} {'1 NIC Gbit/s':>13} {'2 NICs Gbit/s':>14} {'ratio':>7}")
    summary = {}
    for name in ops:
        one, two = statistics.median(results[name][1]), statistics.median(results[name][2])
        summary[name] = {"one": one, "two": two, "ratio": two / one, "rounds": results[name]}
        print(f"{name:24} {one:13.3f} {two:14.3f} {two / one:7.2f}")
    for name in ops:
        verdict = "PASS" if summary[name]["ratio"] >= 1.8 else "FAIL"
        print(f"goal 2 NICs >= 1.8x one NIC, {name}: {verdict} ({summary[name]['ratio']:.2f})")
    print("bytes per NIC in the last round:", spread)
    if args.json:
        Path(args.json).write_text(json.dumps({"provider": args.provider, "rate_mbit": args.rate,
                                                "summary": summary, "spread": spread}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
