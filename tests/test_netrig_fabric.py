"""Multi-NIC engines across the two-host namespace rig: two hosts with two
rate-limited rails each.  (a) Striped data is right byte for byte, (b) with
one rail much slower, shards land out of order and counters stay exact.
Throughput scaling is measured by benchmarks/multinic_bw.py, not here."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from netrig import NetRig, readline, rig_unavailable

_WHY = rig_unavailable()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")

HERE = Path(__file__).resolve().parent
PEER = str(HERE / "_rig_peer.py")
PROVIDERS = ["tcp;ofi_rxm", "udp;ofi_rxd"]


def child_env() -> dict[str, str]:
    """No FI_*_IFACE pin to ``lo`` (conftest sets one); this checkout first."""
    import aiofabric

    env = {k: v for k, v in os.environ.items() if not (k.startswith("FI_") and k.endswith("_IFACE"))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(aiofabric.__file__).resolve().parent.parent), str(HERE)])
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Pair:
    """A target in host B and an initiator in host A, driven line by line."""

    def __init__(self, rig: NetRig, provider: str, nics_a: list[int], nics_b: list[int], size: int) -> None:
        env = child_env()
        names_a = ",".join(rig.rails[i].if_a for i in nics_a)
        names_b = ",".join(rig.rails[i].if_b for i in nics_b)
        pipes = dict(env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.tgt = rig.popen("b", [sys.executable, PEER, "target", provider, names_b, str(size)], **pipes)
        self.ini = rig.popen("a", [sys.executable, PEER, "initiator", provider, names_a], **pipes)
        ready = self.expect(self.tgt, "READY")
        self.tell(self.ini, ready[0])

    @staticmethod
    def tell(proc: subprocess.Popen, line: str) -> None:
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()

    def expect(self, proc: subprocess.Popen, word: str, timeout: float = 90) -> list[str]:
        try:
            got = readline(proc, timeout).split(maxsplit=1)
        except (TimeoutError, EOFError) as e:
            raise AssertionError(f"no {word}: {e!r}; {self.close()}") from e
        assert got and got[0] == word, f"{got}; {self.close()}"
        return got[1:]

    def run(self, op: str, imm: int, count: int, parts: int) -> tuple[dict, dict]:
        self.tell(self.tgt, f"watch {imm} {count} {parts}")
        self.tell(self.ini, op)
        done = json.loads(self.expect(self.ini, "DONE")[0])
        watched = json.loads(self.expect(self.tgt, "WATCHED")[0])
        return done, watched

    def close(self) -> str:
        outs = []
        for p in (self.tgt, self.ini):
            if p.poll() is None:
                try:
                    self.tell(p, "bye")
                except OSError:
                    pass
            try:
                out, err = p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            outs.append(f"rc={p.returncode} {err.decode(errors='replace')[-2000:]}")
        return " | ".join(outs)


def expected_sha(size: int, total: int) -> str:
    """The target's buffer holds ``total`` bytes; the first ``size`` carry the pattern."""
    sys.path.insert(0, str(HERE))
    from _rig_peer import pattern

    buf = bytearray(total)
    buf[:size] = pattern(size).tobytes()
    return hashlib.sha256(buf).hexdigest()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_striped_write_over_two_rails_is_exact(provider):
    size = 8 << 20
    with NetRig(rails=2, rate_mbit=[800, 800]) as rig:
        pair = Pair(rig, provider, [0, 1], [0, 1], size)
        try:
            done, watched = pair.run(f"write {size} 5", imm=5, count=1, parts=2)
            assert done["paths"] == 2 and not done["fence_unconfirmed"]
            assert done["bytes_per_nic"] == [size // 2, size // 2]
            assert watched["complete_when_fired"], watched
            assert watched["sha256"] == expected_sha(size, size)
            assert watched["extra_imms"] == 0  # exactly one immediate for the striped write
        finally:
            assert "rc=0" in pair.close().split(" | ")[0]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_slow_rail_shards_land_out_of_order_and_counters_stay_exact(provider):
    """Rail 1 is 40x slower: the shard on rail 0 lands long before rail 1's
    (out of order); the single immediate still arrives only after both."""
    size = 4 << 20
    with NetRig(rails=2, rate_mbit=[2000, 50]) as rig:
        pair = Pair(rig, provider, [0, 1], [0, 1], size)
        try:
            done, w = pair.run(f"write {size} 6", imm=6, count=1, parts=2)
            assert done["bytes_per_nic"] == [size // 2, size // 2]
            assert w["complete_when_fired"] and w["sha256"] == expected_sha(size, size), w
            assert w["extra_imms"] == 0
            first, second = w["landed_s"]
            assert first is not None and second is not None, w
            # Shard 0 (fast rail) completed before shard 1 (slow rail) began to land
            # or at least well before it finished: arrival order differs from NIC order.
            assert first < second and (w["started_s"][1] is None or first <= w["started_s"][1] or
                                       second - first > 0.1), w
            assert w["fired_s"] >= second - 0.002  # the immediate never precedes the data

            # Pages: one range per rail; one immediate per page, exact.
            page, n = 16384, size // 16384
            done, w = pair.run(f"pages {page} {n} 8", imm=8, count=n, parts=2)
            assert done["bytes_per_nic"] == [page * n // 2, page * n // 2]
            assert w["complete_when_fired"] and w["extra_imms"] == 0, w
            assert w["sha256"] == expected_sha(page * n, size)
        finally:
            assert "rc=0" in pair.close().split(" | ")[0]


def test_one_nic_writes_to_two():
    """Different NIC counts interoperate across hosts: 1 rail -> 2 rails."""
    size = 2 << 20
    with NetRig(rails=2, rate_mbit=[800, 800]) as rig:
        # Host A keeps only rail 0; B's rail-1 address must be reachable through it
        # (on a real fabric every NIC reaches every other).
        rig.run("a", ["ip", "route", "add", f"{rig.rails[1].addr_b}/32", "dev", rig.rails[0].if_a])
        pair = Pair(rig, "tcp;ofi_rxm", [0], [0, 1], size)
        try:
            done, w = pair.run(f"write {size} 3", imm=3, count=1, parts=2)
            assert done["paths"] == 2 and done["bytes_per_nic"] == [size]
            assert w["complete_when_fired"] and w["extra_imms"] == 0
            assert w["sha256"] == expected_sha(size, size)
        finally:
            assert "rc=0" in pair.close().split(" | ")[0]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_peer_whose_nic_goes_away_is_detected(provider):
    """The target's process lives on but its only NIC goes down: probes go
    unanswered and the initiator's wait and writes fail within peer_timeout
    (3 s) plus a few checks (peer_timeout / 6 each)."""
    with NetRig(rails=1) as rig:
        pair = Pair(rig, provider, [0], [0], 1 << 20)
        try:
            pair.tell(pair.ini, "waitpeer 9")
            pair.expect(pair.ini, "WAITING")
            import time

            time.sleep(0.3)
            rig.run("b", ["ip", "link", "set", rig.rails[0].if_b, "down"])
            t0 = time.monotonic()
            done = json.loads(pair.expect(pair.ini, "DONE", timeout=30)[0])
            took = time.monotonic() - t0
            print(f"\n{provider}: NIC down detected after {took:.2f} s: {done['messages'][0]}")
            assert done["errors"] == ["BrokenResourceError", "BrokenResourceError"], done
            assert took < 3.0 + 2.0, took
        finally:
            pair.close()
