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


def test_trace_points_and_table(capsys):
    """--trace: the probes of one iteration, relative to the gate, split
    into senders (tickets below the sender count) and receivers."""
    tr = np.zeros((2, 1024, 12), np.uint64)
    gate = 1_000_000
    # dispatch with 2 tokens: tickets 0, 1 (tokens), 2 (counts) are senders, 3 and 4 receivers
    for role, (start, stored, tagged, end) in enumerate([(5, 9, 10, 10), (6, 12, 14, 14), (5, 7, 8, 8),
                                                         (5, 13, 13, 20), (6, 15, 15, 22)]):
        tr[0, role, [0, 1, 2, 3]] = [gate + 1000 * v for v in (start, stored, tagged, end)]
    tr[0, 0, 4] = gate + 8000  # token 0 routed at 8 us
    # combine: 1 sender, 1 receiver
    tr[1, 0, [0, 1, 2, 3]] = [gate + 1000 * v for v in (5, 9, 11, 11)]
    tr[1, 1, [0, 1, 3]] = [gate + 1000 * v for v in (5, 12, 13)]
    pts = bench._trace_points(tr, np.array([gate, gate], np.uint64), 2, 1)
    assert pts["dispatch_first_start"] == 5.0 and pts["dispatch_last_start"] == 6.0
    assert pts["dispatch_senders_stored"] == 12.0 and pts["dispatch_senders_tagged"] == 14.0
    assert pts["dispatch_receivers_saw_first"] == 15.0 and pts["dispatch_receivers_end"] == 22.0
    assert pts["dispatch_senders_routed"] == 8.0
    assert pts["combine_senders_tagged"] == 11.0 and pts["combine_receivers_end"] == 13.0
    res = [{2: {"aiofabric_dispatch_us": [3.0], "aiofabric_combine_us": [3.0],
                **{f"trace_{k}_us": [v] for k, v in pts.items()}}}] * 2
    rows = bench.summarize(4, [2], res)
    bench.print_table({"card": "X", "gpus": 4, "iters": 1, "rows": [rows[2]]})
    out = capsys.readouterr().out
    assert "probes (--trace)" in out and "senders_tagged 14.0" in out and "receivers_end 22.0" in out
