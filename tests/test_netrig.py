"""The two-host network rig (tests/netrig.py): namespaces A and B joined by
veth "rails", shaped with tbf; and aiofabric engines talking across a rail.

Run as a script, this file is the aiofabric side of the smoke test (one role
per process, started inside a namespace by the test).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from netrig import NetRig, cleanup_stale, readline, rig_unavailable

_WHY = rig_unavailable() if __name__ != "__main__" else None
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")

HERE = Path(__file__).resolve().parent


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _mine() -> set[str]:
    """Rig namespaces of this process (other test runs may have theirs)."""
    return {n for n in _netns() if n.startswith(f"afnr{os.getpid()}x")}


def _child_env() -> dict[str, str]:
    """The environment of processes in the namespaces: no FI_*_IFACE pin to
    ``lo`` (conftest sets one), and this checkout's aiofabric first."""
    import aiofabric
    env = {k: v for k, v in os.environ.items() if not (k.startswith("FI_") and k.endswith("_IFACE"))}
    root = str(Path(aiofabric.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, str(HERE)])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _finish(proc: subprocess.Popen, timeout: float = 30.0) -> tuple[str, str]:
    """Wait for ``proc``, close its pipes; its (stdout rest, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    dec = (lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or ""))
    return dec(out), dec(err)


# -- the rig itself -------------------------------------------------------------

def test_up_and_down():
    with NetRig(rails=2) as rig:
        assert {rig.ns_a, rig.ns_b} <= _netns()
        assert [(r.if_a, r.addr_a, r.if_b, r.addr_b, r.subnet) for r in rig.rails] == [
            ("r0", "198.18.0.1", "r0", "198.18.0.2", "198.18.0.0/30"),
            ("r1", "198.18.0.5", "r1", "198.18.0.6", "198.18.0.4/30"),
        ]
        for host in ("a", "b"):
            links = rig.run(host, ["ip", "-o", "link", "show"]).stdout
            names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
            assert names == {"lo", "r0", "r1"}, links
            assert rig.run(host, ["ip", "route", "show", "default"]).stdout.strip() == ""
            assert rig.run(host, ["ip", "-6", "route", "show", "default"]).stdout.strip() == ""
            routes = rig.run(host, ["ip", "-4", "route", "show"]).stdout
            assert sorted(line.split()[0] for line in routes.splitlines()) == ["198.18.0.0/30", "198.18.0.4/30"]
            # Nothing beyond the rails is reachable (a route lookup, no packet sent).
            far = rig.run(host, ["ip", "route", "get", "198.19.255.1"], check=False)
            assert far.returncode != 0 and "unreachable" in far.stderr.lower()
            for r in rig.rails:
                peer = r.addr("b" if host == "a" else "a")
                got = rig.run(host, ["ip", "-o", "route", "get", peer]).stdout
                assert f"dev {r.iface(host)} " in got and f"src {r.addr(host)} " in got, got
    assert _mine() == set()
    assert rig.setup_s < 10 and rig.teardown_s < 10


def test_torn_down_when_body_raises():
    with pytest.raises(KeyError, match="boom"):
        with NetRig(rails=1, rate_mbit=[100]) as rig:
            sleeper = rig.popen("a", ["sleep", "60"])
            raise KeyError("boom")
    assert _mine() == set()
    assert sleeper.returncode is not None, "processes of the rig are killed by close()"
    with pytest.raises(Exception, match="closed"):
        rig.popen("a", ["true"])
    rig.close()  # idempotent


def test_torn_down_when_setup_fails(monkeypatch):
    import netrig
    monkeypatch.setattr(netrig, "tbf_params", lambda mbit: ("bogus", "1", "1ms"))
    with pytest.raises(netrig.RigError, match="tc .*tbf"):
        NetRig(rails=2, rate_mbit=[None, 100])
    assert _mine() == set()


def test_bad_arguments():
    with pytest.raises(ValueError):
        NetRig(rails=0)
    with pytest.raises(ValueError):
        NetRig(rails=2, rate_mbit=[100])
    with pytest.raises(ValueError):
        NetRig(rails=1, rate_mbit=[0])
    with NetRig(rails=1) as rig:
        with pytest.raises(ValueError):
            rig.popen("c", ["true"])


def test_stale_rigs_are_cleaned():
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"afnr{dead.pid}x7a"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        cleanup_stale()  # (a test run beside this one may have got to it first)
        assert name not in _netns()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


LEAVE_OPEN = r"""
import sys, time
import netrig
rig = netrig.NetRig(rails=2, rate_mbit=[100, None])
print(rig.ns_a, rig.ns_b, flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_rig_of_a_dead_process(how):
    """Left open at exit: atexit closes it.  Process SIGKILLed: the next
    cleanup_stale() (every new NetRig runs one) removes it."""
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    proc = subprocess.Popen([sys.executable, "-c", LEAVE_OPEN], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    names: set[str] = set()
    try:
        names = set(readline(proc, 30).split())
        assert len(names) == 2 and names <= _netns()
        if how == "kill":
            proc.kill()
        _, err = _finish(proc)  # closes its stdin: "exit" returns from readline
        assert proc.returncode == (-9 if how == "kill" else 0), err
        if how == "kill":
            assert names <= _netns()
            cleanup_stale()
        assert not names & _netns()
    finally:
        if proc.returncode is None:
            proc.kill()
            _finish(proc)
        for n in names:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


# -- traffic --------------------------------------------------------------------

ECHO_SERVER = r"""
import socket, sys
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
s.settimeout(30)
c, peer = s.accept()
c.settimeout(30)
data = c.recv(1024)
c.sendall(b"echo:" + data)
c.close()
print(peer[0], flush=True)
"""

ECHO_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30, source_address=(sys.argv[3], 0))
c.sendall(sys.argv[4].encode())
print(c.recv(1024).decode(), flush=True)
"""


def test_each_rail_carries_traffic():
    with NetRig(rails=2) as rig:
        for r in rig.rails:
            srv = rig.popen("b", [sys.executable, "-c", ECHO_SERVER, r.addr_b],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            port = readline(srv, 30)
            cli = rig.run("a", [sys.executable, "-c", ECHO_CLIENT, r.addr_b, port, r.addr_a, f"ping{r.index}"])
            assert cli.stdout.strip() == f"echo:ping{r.index}"
            out, err = _finish(srv)
            assert srv.returncode == 0, err
            assert out.strip() == r.addr_a  # the server saw the A end of this rail


SINK = r"""
import socket, sys, time
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
s.settimeout(30)
c, peer = s.accept()
c.settimeout(30)
buf = bytearray(1 << 20)
n, t0, t1 = 0, None, None
while True:
    k = c.recv_into(buf)
    if not k:
        break
    t1 = time.perf_counter()
    if t0 is None:
        t0 = t1          # bytes of the first read are not counted: the clock starts there
    else:
        n += k
print(peer[0], n, (t1 or 0) - (t0 or 0), flush=True)
"""

SOURCE = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30, source_address=(sys.argv[3], 0))
chunk = b"x" * 65536
end = time.perf_counter() + float(sys.argv[4])
while time.perf_counter() < end:
    c.sendall(chunk)
c.close()
"""


def _measure(rig: NetRig, rail: int, seconds: float = 0.5) -> float:
    """Bulk TCP A -> B over ``rail`` for ``seconds``; Mbit/s seen by B."""
    r = rig.rails[rail]
    sink = rig.popen("b", [sys.executable, "-c", SINK, r.addr_b], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    port = readline(sink, 30)
    rig.run("a", [sys.executable, "-c", SOURCE, r.addr_b, port, r.addr_a, str(seconds)])
    out, err = _finish(sink)
    assert sink.returncode == 0, err
    peer, n, dt = out.split()
    assert peer == r.addr_a
    assert float(dt) > 0.2 * seconds, out
    return int(n) * 8 / float(dt) / 1e6


def test_tbf_shaping():
    with NetRig(rails=2, rate_mbit=[200, None]) as rig:
        shaped, free = _measure(rig, 0), _measure(rig, 1)
        assert 0.5 * 200 < shaped < 1.5 * 200, (shaped, free)
        assert shaped < 0.6 * free, (shaped, free)
        # At run time: unshape rail 0, shape rail 1 to 50 Mbit/s.
        rig.set_rate(0, None)
        rig.set_rate(1, 50)
        assert rig.rates == [None, 50]
        free, shaped = _measure(rig, 0), _measure(rig, 1)
        assert 0.5 * 50 < shaped < 1.5 * 50, (shaped, free)
        assert shaped < 0.6 * free, (shaped, free)
        rig.set_rate(1, None)
        rig.set_rate(1, None)  # removing twice is fine
        for host in ("a", "b"):
            assert "tbf" not in rig.run(host, ["tc", "qdisc", "show"]).stdout


# -- aiofabric across a rail ----------------------------------------------------

def _sockaddr_ip(name: bytes) -> str | None:
    """The IPv4 address in an endpoint name that is a sockaddr_in."""
    if len(name) >= 8 and int.from_bytes(name[:2], sys.byteorder) == socket.AF_INET:
        return socket.inet_ntoa(name[4:8])
    return None


def _digest(size: int, seed: int) -> str:
    return hashlib.sha256(random.Random(seed).randbytes(size)).hexdigest()


async def _target(provider: str, nic: str, size: int, n: int) -> None:
    import aiofabric as af
    async with af.open_engine(provider, nics=[nic]) as eng:
        buf = bytearray(size)
        region = eng.register(buf)
        print("READY", eng.address.to_bytes().hex(), region.descriptor().to_bytes().hex(),
              _sockaddr_ip(eng.address.nics[0].name), flush=True)
        async with asyncio.timeout(60):
            await eng.imm_counter(7).wait(n)
        print("GOT", hashlib.sha256(buf).hexdigest(), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # "bye"


async def _initiator(provider: str, nic: str, size: int, n: int, seed: int) -> None:
    import aiofabric as af
    loop = asyncio.get_running_loop()
    line = await loop.run_in_executor(None, sys.stdin.readline)
    desc = af.RegionDescriptor.from_bytes(bytes.fromhex(line.strip()))
    async with af.open_engine(provider, nics=[nic]) as eng:
        src = bytearray(random.Random(seed).randbytes(size))
        region = eng.register(src)
        print("BOUND", _sockaddr_ip(eng.address.nics[0].name), flush=True)
        step = size // n
        async with asyncio.timeout(60):
            await asyncio.gather(*(eng.write(region[k * step:(k + 1) * step], desc[k * step:(k + 1) * step], imm=7)
                                   for k in range(n)))
        print("SENT", hashlib.sha256(src).hexdigest(), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # "bye": the target has it all


@pytest.mark.parametrize("provider,rail", [("tcp;ofi_rxm", 0), ("tcp;ofi_rxm", 1), ("udp;ofi_rxd", 0)])
def test_aiofabric_write_across_a_rail(provider, rail):
    size, n, seed = 1 << 20, 16, 11
    env = _child_env()
    me = str(Path(__file__).resolve())
    with NetRig(rails=2, rate_mbit=[400, None]) as rig:
        r = rig.rails[rail]
        tgt = rig.popen("b", [sys.executable, me, "target", provider, r.if_b, str(size), str(n)], env=env,
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ini = rig.popen("a", [sys.executable, me, "initiator", provider, r.if_a, str(size), str(n), str(seed)],
                        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready = readline(tgt, 60).split()
            assert ready[0] == "READY" and ready[3] == r.addr_b, ready
            ini.stdin.write(ready[2].encode() + b"\n")
            ini.stdin.flush()
            bound = readline(ini, 60).split()
            assert bound == ["BOUND", r.addr_a]
            sent = readline(ini, 60).split()
            got = readline(tgt, 60).split()
            expect = _digest(size, seed)
            assert sent == ["SENT", expect]
            assert got == ["GOT", expect]
            for p in (tgt, ini):
                p.stdin.write(b"bye\n")
                p.stdin.flush()
        except BaseException as e:
            for p in (tgt, ini):
                p.kill()
            outs = [_finish(p, 30) for p in (tgt, ini)]
            raise AssertionError(f"{e!r}; target: {outs[0]}; initiator: {outs[1]}") from e
        outs = [_finish(p, 30) for p in (tgt, ini)]
        assert (tgt.returncode, ini.returncode) == (0, 0), outs


if __name__ == "__main__":
    role, provider, nic, size, n, *rest = sys.argv[1:]
    if role == "target":
        asyncio.run(_target(provider, nic, int(size), int(n)))
    else:
        asyncio.run(_initiator(provider, nic, int(size), int(n), int(rest[0])))
