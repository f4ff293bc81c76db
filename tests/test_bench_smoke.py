"""Smoke test of benchmarks/paged_bw.py: a quick shm run (one page size, a short
window) builds and runs the raw C baseline, runs write_pages and scatter between
processes, and writes JSON with positive rates."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_paged_bw_quick(tmp_path) -> None:
    out = tmp_path / "paged.json"
    env = {**os.environ, "FI_TCP_IFACE": "lo", "FI_UDP_IFACE": "lo", "FI_SOCKETS_IFACE": "lo"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.paged_bw", "--quick", "--providers", "shm", "--page-sizes", "4096",
         "--seconds", "0.1", "--imm", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    med = doc["median"]["shm"]
    for side in ("aiofabric", "raw"):
        for metric in ("pages_per_s", "gbit_per_s"):
            assert med["pages"]["4096"][side][metric] > 0, (side, metric)
        for metric in ("rounds_per_s", "gbit_per_s"):
            assert med["scatter"]["65536"][side][metric] > 0, (side, metric)
    raw = doc["runs"]["shm"]["raw_pages"][0]["4096"]
    assert raw["pages"] == 512 and raw["imm"] == 1 and raw["total_pages"] >= raw["ops"] > 0
    # Gbit/s and pages/s agree with the page size.
    assert abs(med["pages"]["4096"]["aiofabric"]["gbit_per_s"]
               - med["pages"]["4096"]["aiofabric"]["pages_per_s"] * 4096 * 8 / 1e9) < 1e-6
    assert [g["page"] for g in doc["goals"]] == [4096]
    assert "4 KiB pages" in proc.stdout and ("PASS" in proc.stdout or "FAIL" in proc.stdout)
