"""Short runs of the soak (scripts/soak.py): a coordinator and 3 peer
processes exchange writes, paged writes, scatters, notifies, barriers and
messages, verifying every byte; in the second test one peer is SIGKILLed and
replaced.  See docs/soak.md."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from conftest import PROVIDERS

pytestmark = pytest.mark.asyncio

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "scripts" / "soak.py"
KINDS = {"write", "write_pages", "scatter", "notify", "barrier", "send"}
LOOPBACK = {"FI_TCP_IFACE": "lo", "FI_UDP_IFACE": "lo", "FI_SOCKETS_IFACE": "lo"}

# udp;ofi_rxd on a loaded 2-core machine queues seconds of data per peer, and
# the failure detector's probe waits behind it: peer_timeout must exceed that
# (EngineConfig docs), so rxd runs with 10 s.
EXTRA = {"udp;ofi_rxd": ["--peer-timeout", "10"]}

# What the two known bugs look like in a soak (docs/soak.md, "Findings"):
# operations to live peers that never complete after a kill, and live peers
# declared failed because their probes wait behind a dead peer's submissions.
KNOWN_BUGS = {"shm", "tcp;ofi_rxm"}
KNOWN = re.compile(r"\] (hang: |declared node \d+ failed, but it is alive|\d+ operations still pending after"
                   r"|exited with code 1$)")


class SoakTimeout(AssertionError):
    """The soak did not finish: its whole process group was killed."""


async def soak(tmp_path: Path, *args: str, limit: float = 110) -> tuple[int, dict, str]:
    out = tmp_path / "soak.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SOAK), *args, "--json", str(out), cwd=ROOT, env={**os.environ, **LOOPBACK},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
    try:
        async with asyncio.timeout(limit):
            text = (await proc.communicate())[0].decode(errors="replace")
    except TimeoutError:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and every peer it started
        except ProcessLookupError:
            pass
        await proc.communicate()
        raise SoakTimeout(f"soak {' '.join(args)} did not finish within {limit:g} s") from None
    assert out.exists(), f"no summary (exit {proc.returncode}):\n{text[-4000:]}"
    return proc.returncode, json.loads(out.read_text()), text


def check_traffic(s: dict, text: str) -> None:
    done = s["transfers_completed"]
    assert set(done) == KINDS and all(v > 0 for v in done.values()), (done, text[-4000:])
    assert s["bytes_verified"] > 1 << 20
    assert s["messages_received"] > 0
    assert sum(s["transfers_verified"].values()) >= s["transfers_completed_total"] * 0.9


@pytest.mark.timeout(240)
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_soak_without_kills(provider, tmp_path):
    rc, s, text = await soak(tmp_path, "--provider", provider, "--minutes", "0.15", "--peers", "3",
                             "--kill-every", "0", *EXTRA.get(provider, []))
    assert rc == 0 and not s["findings"], text[-6000:]
    check_traffic(s, text)
    assert s["kills"] == 0 and s["restarts"] == 0 and s["errors_by_type"] == {}
    assert s["detection"]["count"] == 0


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_soak_kill_one_peer(provider, tmp_path):
    """One of 3 peers is SIGKILLed 7 s in and replaced; every survivor must
    see BrokenResourceError for it within the bound and go on with the
    replacement.  On shm and tcp;ofi_rxm two known bugs make survivors hang
    or blame live peers (docs/soak.md): those findings turn the test into an
    expected failure, anything else (wrong bytes, wrong error types, crashes)
    fails it."""
    try:
        rc, s, text = await soak(tmp_path, "--provider", provider, "--minutes", "0.25", "--peers", "3",
                                 "--kill-every", "7", "--op-timeout", "8", "--seed", "3", *EXTRA.get(provider, []))
    except SoakTimeout as exc:
        if provider == "shm":  # seen: a survivor spins for ever inside shm's fi_send (docs/soak.md)
            pytest.xfail(f"libfabric 1.17 shm deadlocked a survivor in fi_send to the killed peer: {exc}")
        raise
    assert s["kills"] == 1 and s["restarts"] >= 1 and s["unexpected_deaths"] == 0, text[-6000:]
    check_traffic(s, text)
    assert set(s["errors_by_type"]) <= {"BrokenResourceError", "Hang"}, s["errors_by_type"]
    assert s["errors_by_type"].get("BrokenResourceError", 0) >= 1
    assert s["detection"]["count"] >= 1
    assert s["detection"]["max_s"] <= s["detection"]["bound_s"]
    unknown = [f for f in s["findings"] if not KNOWN.search(f.split("\n")[0])]
    assert not unknown, "\n".join(unknown) + "\n" + text[-6000:]
    if s["findings"] and provider in KNOWN_BUGS:
        pytest.xfail(f"known bugs ({len(s['findings'])} findings): {s['finding_kinds'][0]['first'][:300]}")
    assert rc == 0 and not s["findings"], text[-6000:]
    # Every survivor (3 of them) saw the kill; a replacement joined.
    assert s["detection"]["count"] >= 3
