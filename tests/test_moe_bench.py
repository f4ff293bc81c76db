"""benchmarks/moe_latency.py without GPUs: the per-iteration worst-rank
summary, the table, and a failed NCCL baseline that keeps our numbers."""
from __future__ import annotations

import numpy as np

from benchmarks import moe_latency as bench


def test_summary_takes_the_slowest_rank_per_iteration(capsys):
    fast = {1: {"aiofabric_dispatch_us": [1.0, 1.0, 1.0], "aiofabric_combine_us": [2.0, 2.0, 2.0],
                "nccl_dispatch_us": [5.0, 5.0, 5.0], "nccl_combine_us": [6.0, 6.0, 6.0], "rows_sent": [1, 1]}}
    slow = {1: {"aiofabric_dispatch_us": [1.0, 9.0, 1.0], "aiofabric_combine_us": [2.0, 2.0, 4.0],
                "nccl_error": "RuntimeError: no NCCL"}}
    rows = bench.summarize(2, [1], [fast, slow])
    row = rows[1]
    assert row["aiofabric_dispatch_us"]["p50"] == 1.0 and row["aiofabric_dispatch_us"]["iters"] == 3
    assert row["aiofabric_combine_us"]["p99"] > 2.0
    assert "nccl_dispatch_us" not in row and row["nccl_error"].startswith("RuntimeError")
    bench.print_table({"card": "X", "gpus": 2, "iters": 3, "rows": [row]})
    out = capsys.readouterr().out
    assert "dispatch" in out and "combine" in out and " - " in out


def test_problem_shapes():
    x, idx, w = bench._problem(4, 32, 1)
    assert x.dtype == np.uint16 and x.shape == (32, bench.HIDDEN)
    assert len(idx) == 4 and idx[0].shape == (32, bench.TOPK) and w.shape == (32, bench.TOPK)
    assert all((np.sort(i, axis=1)[:, 1:] != np.sort(i, axis=1)[:, :-1]).all() for i in idx)  # distinct experts


def test_breakdown_table(capsys):
    stage = {f"stage_{k}_us": [1.0, 2.0] for k in ("dispatch_send", "dispatch_recv", "combine_send", "combine_recv")}
    res = [{32: {"aiofabric_dispatch_us": [3.0, 4.0], "aiofabric_combine_us": [3.0, 4.0], **stage}}] * 2
    rows = bench.summarize(4, [32], res)
    assert rows[32]["stage_combine_recv_us"]["iters"] == 2
    bench.print_table({"card": "X", "gpus": 4, "iters": 2, "rows": [rows[32]]})
    out = capsys.readouterr().out
    assert "per kernel" in out and "dispatch_send" in out and "combine_recv" in out
