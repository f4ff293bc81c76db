"""examples/disagg_serving.py --device cuda.  The ``gpu`` test runs the demo's GPU mode
with a tiny model in a subprocess (needs CuPy and a CUDA GPU; skips with the reason
otherwise).  The others run everywhere: the array-module model equals the CPU model bit for
bit under NumPy, and the whole GPU-mode flow (compute stream, events, reference pages,
verification) runs end to end with a NumPy stand-in for CuPy, on host memory."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "disagg_serving.py"
TINY = ["--layers", "4", "--heads", "4", "--head-dim", "64", "--ffn", "512", "--vocab", "512",
        "--lengths", "100,300", "--repeats", "1", "--png", os.devnull]

sys.path.insert(0, str(ROOT / "examples"))
import disagg_serving as demo
from conftest import cuda_devices

N_GPUS, WHY = cuda_devices()

# A module named cupy over NumPy, enough for the demo's GPU mode: streams and events are no-ops
# (NumPy finishes before it returns), the random generator is NumPy's.
FAKE_CUPY = textwrap.dedent('''
    import contextlib
    import numpy
    from numpy import *  # noqa: F401,F403
    __version__ = "numpy-stand-in"

    class _Ctx(contextlib.ContextDecorator):
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return False
        def synchronize(self):
            pass

    class _Device(_Ctx):
        def __init__(self, n=0):
            self.id = n
        def use(self):
            pass

    class _Stream(_Ctx):
        def __init__(self, non_blocking=False):
            pass

    class _Event:
        def __init__(self, block=False, disable_timing=False):
            self.done = False
        def record(self, stream=None):
            self.done = True
        def synchronize(self):
            assert self.done, "event synchronised before it was recorded"

    class _Runtime:
        @staticmethod
        def getDeviceCount():
            return 1
        @staticmethod
        def getDeviceProperties(n):
            return {"name": b"NumPy stand-in"}

    class cuda:
        Device, Stream, Event, runtime = _Device, _Stream, _Event, _Runtime

    class _RandomState:
        def __init__(self, seed):
            self._rng = numpy.random.default_rng(seed)
        def standard_normal(self, size=None, dtype=float):
            return self._rng.standard_normal(size, dtype)

    class random:
        RandomState = _RandomState

    def asnumpy(a, stream=None):
        return numpy.array(a)
''')


def test_xmodel_is_the_cpu_model_under_numpy():
    m, x = demo.Model(), demo.XModel(np, demo.CPU_CFG)
    tokens = list(range(3, 43))
    a, b = m.embed(tokens), x.embed(tokens)
    for layer in range(demo.LAYERS):
        a, ka, va = m.layer(layer, a)
        b, kb, vb = x.layer(layer, b)
        assert (a.tobytes(), ka.tobytes(), va.tobytes()) == (b.tobytes(), kb.tobytes(), vb.tobytes()), layer
    assert m.first_token(a[-1]) == x.first_token(b[-1])


def test_xstore_matches_store():
    cfg = demo.CPU_CFG._replace(num_blocks=8)
    c1 = demo.xcache_view(np.zeros(cfg.layout.nbytes, np.uint8), cfg)
    c2 = demo.cache_view(np.zeros(demo.LAYOUT.nbytes, np.uint8))
    rng = np.random.default_rng(0)
    k, v = (rng.standard_normal((37, demo.HEADS, demo.HEAD_DIM)).astype(np.float16) for _ in range(2))
    blocks = np.array([5, 2, 7])
    demo.xstore(np, c1, 3, blocks, k, v)
    demo.store(c2, 3, blocks, k, v)
    assert c1[3].tobytes() == c2[3, :, :8].tobytes()


def _run(env_extra: dict, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    p = subprocess.run([sys.executable, str(DEMO), "--device", "cuda", *args], cwd=ROOT, env=env, check=False,
                       capture_output=True, text=True, timeout=timeout)
    print(p.stdout)
    print(p.stderr, file=sys.stderr)
    return p


def _check(p: subprocess.CompletedProcess) -> None:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    # 5 requests (2 lengths x stream/not); 4 layers x 2 planes x (7 + 19) blocks, times 2 modes.
    assert "4 requests, 416 pages" in p.stdout, p.stdout
    assert "every page checked byte for byte: all equal" in p.stdout, p.stdout
    assert "transfer hidden behind compute:" in p.stdout, p.stdout


def test_gpu_mode_flow_with_numpy_standin(tmp_path):
    (tmp_path / "cupy.py").write_text(FAKE_CUPY)
    path = os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])
    p = _run({"PYTHONPATH": path}, TINY, 240)
    _check(p)
    assert "bit for bit in 4/4 requests" in p.stdout, p.stdout


@pytest.mark.gpu
@pytest.mark.skipif(N_GPUS == 0, reason=WHY or "no GPU")
def test_gpu_mode_tiny():
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    p = _run({"PYTHONPATH": path}, TINY, 300)
    _check(p)
    gpus = "0 -> GPU 1" if N_GPUS >= 2 else "0 -> GPU 0"
    assert f"GPU {gpus}" in p.stdout, p.stdout
