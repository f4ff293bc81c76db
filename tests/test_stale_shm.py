"""libfabric's shm provider leaves a SIGKILLed process's region in /dev/shm;
a new process that gets the same pid must still open shm engines."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from aiofabric.liveness import remove_stale_shm_regions

SHM = "/dev/shm"
pytestmark = pytest.mark.skipif(not os.path.isdir(SHM), reason="no /dev/shm")


def test_open_engine_after_a_dead_process_left_our_pid_s_region():
    # The child plays the new owner of a recycled pid: before its first engine
    # it finds the region a killed predecessor left under that pid.
    code = textwrap.dedent(f"""
        import asyncio, os, time
        name = os.path.join({SHM!r}, f"{{os.getpid()}}:0:0")
        with open(name, "wb") as f:
            f.write(b"left by a killed process")
        old = time.time() - 3600
        os.utime(name, (old, old))
        import aiofabric as af

        async def main():
            async with af.open_engine("shm") as a, af.open_engine("shm") as b:
                buf = bytearray(64)
                d = b.register(buf).descriptor()
                await asyncio.wait_for(a.write(a.register(bytearray(b"x" * 64))[0:64], d[0:64], imm=1), 10)
                await asyncio.wait_for(b.imm_counter(1).wait(1), 10)
                assert bytes(buf) == b"x" * 64
            print("ok")

        asyncio.run(main())
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_only_regions_older_than_this_process_are_removed():
    pid = os.getpid()
    old, new, other = (os.path.join(SHM, n) for n in (f"{pid}:97:0", f"{pid}:98:0", f"{pid + 1}x:0:0"))
    try:
        for p in (old, new, other):
            with open(p, "wb") as f:
                f.write(b"x")
        t = time.time() - 3600
        os.utime(old, (t, t))
        os.utime(other, (t, t))
        removed = remove_stale_shm_regions()
        assert f"{pid}:97:0" in removed
        assert not os.path.exists(old)
        assert os.path.exists(new), "a region made after this process started may be ours"
        assert os.path.exists(other), "not a region name of this pid"
    finally:
        for p in (old, new, other):
            if os.path.exists(p):
                os.unlink(p)
