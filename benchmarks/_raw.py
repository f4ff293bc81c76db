"""Raw-libfabric baseline: build and run ``benchmarks/raw/fabric_raw.c``.

``fabric_raw`` forks itself into a target and an initiator process and measures what the
provider itself can do for one-sided RMA writes (bandwidth, message rate, zero-byte
``fi_writedata`` ping-pong latency, paged writes through permuted index arrays, and a scatter
to several target endpoints), without any Python in the loop.  The numbers serve as the
ceiling that aiofabric's own benchmarks are compared against.

    python -m benchmarks._raw --provider shm
    python -m benchmarks._raw --provider "tcp;ofi_rxm"
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np

RAW_DIR = pathlib.Path(__file__).resolve().parent / "raw"
SOURCE = RAW_DIR / "fabric_raw.c"
DEFAULT_BUILD_DIR = RAW_DIR / "build"
BINARY_NAME = "fabric_raw"

# Loopback only: never let a provider pick a real NIC.
LOOPBACK_ENV = {"FI_TCP_IFACE": "lo", "FI_UDP_IFACE": "lo", "FI_SOCKETS_IFACE": "lo"}

# pages mode: the permutations fabric_raw.c builds (perm(), PERM_SEED_*) and its immediate.
PERM_SEED_SRC, PERM_SEED_DST = 1, 2
PAGES_IMM = 0x5A17
_M64 = (1 << 64) - 1


def page_permutation(n: int, seed: int) -> np.ndarray:
    """The shuffle of ``0..n-1`` that fabric_raw.c's ``perm(n, seed)`` makes (Fisher-Yates
    driven by splitmix64), as int64: the index arrays of a paged-write benchmark."""
    idx = list(range(n))
    state = seed
    for i in range(n - 1, 0, -1):
        state = (state + 0x9E3779B97F4A7C15) & _M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        z ^= z >> 31
        j = z % (i + 1)
        idx[i], idx[j] = idx[j], idx[i]
    return np.array(idx, dtype=np.int64)


def index_checksum(src_idx, dst_idx) -> int:
    """FNV-1a over both index arrays' values, as fabric_raw reports it (``index_checksum``)."""
    h = 0xCBF29CE484222325
    for v in (*src_idx, *dst_idx):
        h = ((h ^ (int(v) & _M64)) * 0x100000001B3) & _M64
    return h


_MISSING_HEADERS_HINT = (
    "libfabric development files not found; install them with "
    "`apt-get install libfabric-dev` (Debian/Ubuntu)"
)


def build_raw(build_dir: pathlib.Path | None = None) -> pathlib.Path:
    """Compile fabric_raw.c into *build_dir* (default ``benchmarks/raw/build/``).

    Recompiles only when the source is newer than the binary.  Returns the binary's path;
    raises RuntimeError carrying the compiler's stderr if compilation fails.
    """
    build_dir = pathlib.Path(build_dir) if build_dir is not None else DEFAULT_BUILD_DIR
    binary = build_dir / BINARY_NAME
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    build_dir.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    tmp = build_dir / f".{BINARY_NAME}.{os.getpid()}.tmp"
    cmd = [cc, "-O2", "-Wall", "-Wextra", "-o", str(tmp), str(SOURCE), "-lfabric"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise RuntimeError(f"C compiler not found ({cc!r}): {exc}") from exc
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        stderr = proc.stderr.strip()
        msg = f"building {SOURCE} failed ({' '.join(cmd)}):\n{stderr}"
        if "rdma/" in stderr or "-lfabric" in stderr:
            msg += f"\n{_MISSING_HEADERS_HINT}"
        raise RuntimeError(msg)
    os.replace(tmp, binary)  # atomic: concurrent builders never see a half-written binary
    return binary


def _tail(stderr: str | None) -> str:
    stderr = (stderr or "").strip()
    return f":\n{stderr}" if stderr else " (no stderr output)"


def _stop(proc: subprocess.Popen) -> None:
    """Stop fabric_raw: SIGTERM makes the target kill and reap its initiator; SIGKILL the
    whole process group (our own session) if that does not happen within 2 s."""
    proc.terminate()
    try:
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_raw(
    provider: str,
    mode: str,
    *,
    size: int = 0,
    inflight: int = 1,
    seconds: float = 2.0,
    iters: int = 20000,
    pages: int = 4096,
    stride: int = 0,
    peers: int = 8,
    imm: bool = False,
    timeout: float = 120,
) -> dict:
    """Run one fabric_raw measurement and return its JSON result as a dict.

    *mode* is ``"bw"`` or ``"rate"`` (uses *size*, *inflight*, *seconds*), ``"rtt"``
    (uses *iters*), ``"pages"`` (*size* is the page size; *pages* per batch, *stride*
    (0: the page size), *inflight* pages outstanding, *imm*: one fi_writedata per page) or
    ``"scatter"`` (*size* bytes to each of *peers* target endpoints per round, *inflight*
    writes outstanding, *imm*).  Raises RuntimeError with the program's stderr on failure or
    timeout (fabric_raw also fails when the target finds a page or an immediate missing).
    """
    if mode in ("bw", "rate", "pages", "scatter"):
        if size <= 0 or inflight <= 0 or seconds <= 0:
            raise ValueError(f"mode {mode!r} needs size > 0, inflight > 0 and seconds > 0")
        args = ["--size", str(size), "--inflight", str(inflight), "--seconds", repr(float(seconds))]
        if mode == "pages":
            if pages <= 0 or (stride and stride < size):
                raise ValueError("mode 'pages' needs pages > 0 and stride 0 or >= size")
            args += ["--pages", str(pages), "--stride", str(stride)]
        elif mode == "scatter":
            if peers <= 0:
                raise ValueError("mode 'scatter' needs peers > 0")
            args += ["--peers", str(peers)]
        if imm:
            if mode not in ("pages", "scatter"):
                raise ValueError("imm applies to modes 'pages' and 'scatter' only")
            args.append("--imm")
    elif mode == "rtt":
        if iters <= 0:
            raise ValueError("mode 'rtt' needs iters > 0")
        args = ["--iters", str(iters)]
    else:
        raise ValueError(f"unknown mode {mode!r} (expected 'bw', 'rate', 'rtt', 'pages' or 'scatter')")

    cmd = [str(build_raw()), "--provider", provider, "--mode", mode, *args]
    env = {**os.environ, **LOOPBACK_ENV}
    # Own process group, so a timeout can take down both the target and its forked initiator.
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:  # timeout, KeyboardInterrupt, ...
        _stop(proc)
        out, err = proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise RuntimeError(
                f"fabric_raw {provider} {mode} timed out after {timeout}s{_tail(err)}"
            ) from None
        raise
    if proc.returncode != 0:
        raise RuntimeError(
            f"fabric_raw {provider} {mode} failed (exit status {proc.returncode}){_tail(err)}"
        )
    lines = [line for line in out.splitlines() if line.strip()]
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise RuntimeError(
            f"fabric_raw {provider} {mode}: no JSON result in output {out!r}{_tail(err)}"
        ) from exc


def _format(result: dict) -> str:
    if result["mode"] == "rtt":
        return (
            f"{result['provider']:<12} rtt   writedata {result['size']} B  iters={result['iters']:<6}"
            f"  median {result['rtt_us_median']:8.2f} us  mean {result['rtt_us_mean']:8.2f} us"
            f"  p99 {result['rtt_us_p99']:8.2f} us"
        )
    if result["mode"] == "pages":
        return (
            f"{result['provider']:<12} pages page={result['size']:<6} x{result['pages']:<5}"
            f" inflight={result['inflight']:<4} imm={result['imm']} {result['pages_per_s']:12,.0f} pages/s"
            f"  {result['gbit_per_s']:8.2f} Gbit/s"
        )
    if result["mode"] == "scatter":
        return (
            f"{result['provider']:<12} scatter size={result['size']:<8} peers={result['peers']:<2}"
            f" inflight={result['inflight']:<3} imm={result['imm']} {result['rounds_per_s']:12,.0f} rounds/s"
            f"  {result['gbit_per_s']:8.2f} Gbit/s"
        )
    return (
        f"{result['provider']:<12} {result['mode']:<5} size={result['size']:<9}"
        f" inflight={result['inflight']:<3} {result['ops_per_s']:12,.0f} ops/s"
        f"  {result['gbit_per_s']:8.2f} Gbit/s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks._raw", description="raw libfabric RMA-write baseline"
    )
    parser.add_argument("--provider", default="shm", help='e.g. shm, "tcp;ofi_rxm", "udp;ofi_rxd"')
    parser.add_argument("--seconds", type=float, default=2.0, help="measurement time per bw/rate run")
    parser.add_argument("--iters", type=int, default=20000, help="timed round trips for rtt")
    parser.add_argument("--json", action="store_true", help="print raw JSON result lines")
    opts = parser.parse_args(argv)

    runs = [
        *(("bw", dict(size=size, inflight=16, seconds=opts.seconds))
          for size in (4096, 65536, 1 << 20, 16 << 20)),
        ("rate", dict(size=4096, inflight=64, seconds=opts.seconds)),
        ("rtt", dict(iters=opts.iters)),
        ("pages", dict(size=4096, pages=4096, inflight=1024, seconds=opts.seconds)),
        ("pages", dict(size=4096, pages=4096, inflight=1024, seconds=opts.seconds, imm=True)),
        ("scatter", dict(size=65536, peers=8, inflight=32, seconds=opts.seconds)),
    ]
    build_raw()
    failures = 0
    for mode, kwargs in runs:
        try:
            result = run_raw(opts.provider, mode, **kwargs)
        except RuntimeError as exc:
            failures += 1
            print(f"{opts.provider} {mode} {kwargs}: FAILED: {exc}", file=sys.stderr)
            continue
        print(json.dumps(result) if opts.json else _format(result), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
