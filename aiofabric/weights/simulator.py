"""Predict the transfer time of a weight update from its plan.

The model: every source rank sends over ``nics_per_rank`` NICs of
``nic_gbps / nics_per_rank`` each, every destination rank receives at
``nic_gbps``; the update takes as long as its busiest link
(``max(bytes) / bandwidth`` over source NICs and destination ranks), or as
long as its busiest source takes to post its writes (``write_us`` each), plus
one round trip for the final acknowledgements.  It leaves out: gathering
trainer shards (FSDP unshard), copies to GPU, the FP8 cast itself, network
congestion beyond the end links, and per-packet protocol overheads.

Trainer side (``src_mode``): ``"fsdp"``: every parameter split over all
trainer ranks along one dimension (written from the shards themselves);
``"gathered"``: every trainer rank may send any byte (after an all-gather;
its cost is not modelled), the planner balancing by LPT.  ``"fsdp"`` plans
one layer of each kind and multiplies by the layer count (exact there: each
byte has one holder, so loads add up); ``"gathered"`` plans the whole model.

    python -m aiofabric.weights.simulate --model kimi-k2 --src 256 --dst 128 --gbps 400
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from .models import MODELS, inference_dim, model, quantized
from .plan import plan
from .spec import Layout, ParamSpec

__all__ = ["main", "simulate"]


def _layouts(params: list[ParamSpec], n_src: int, n_dst: int, dst_group: int, src_mode: str,
             fp8: bool) -> tuple[Layout, Layout]:
    if src_mode == "fsdp":
        src = Layout.fsdp(params, n_src)
    elif src_mode == "gathered":
        src = Layout.replicated(params, n_src)
    else:
        raise ValueError(f"src_mode must be 'fsdp' or 'gathered', got {src_mode!r}")
    dparams = [p._replace(dtype="fp8_e4m3") if fp8 and quantized(p) else p for p in params]
    dst = Layout.tensor_parallel(dparams, dst_group, replicas=n_dst // dst_group, dims=inference_dim)
    return src, dst


def simulate(model_name: str = "kimi-k2", n_src: int = 256, n_dst: int = 128, nic_gbps: float = 400.0, *,
             dst_group: int = 16, nics_per_rank: int = 1, src_mode: str = "fsdp", fp8: bool = True,
             write_us: float = 1.0, rtt_us: float = 10.0, max_write_bytes: int = 64 << 20,
             layers: int | None = None) -> dict[str, Any]:
    """Plan ``model_name``'s update from ``n_src`` trainer ranks (BF16) to
    ``n_dst`` inference ranks in groups of ``dst_group`` (FP8 where
    :func:`~.models.quantized`), and predict its time.  Returns a dict of
    the plan's figures and the prediction (seconds)."""
    m = model(model_name)
    if n_dst % dst_group:
        raise ValueError(f"n_dst ({n_dst}) must be a multiple of dst_group ({dst_group})")
    t0 = time.perf_counter()
    if src_mode == "fsdp" and layers is None:
        kinds = m.compact()
    else:
        kinds = [(1, m.params(layers))]
    src_b = np.zeros(n_src)
    nic_b = np.zeros((n_src, nics_per_rank))
    dst_b = np.zeros(n_dst)
    writes = np.zeros(n_src)
    routes = 0
    for mult, params in kinds:
        src, dst = _layouts(params, n_src, n_dst, dst_group, src_mode, fp8)
        pl = plan(src, dst, nics_per_rank=nics_per_rank, max_write_bytes=max_write_bytes)
        s, n, d = pl.link_bytes()
        src_b += mult * s
        nic_b += mult * n
        dst_b += mult * d
        writes += mult * pl.expected().sum(axis=1)
        routes += mult * len(pl)
    plan_s = time.perf_counter() - t0
    bw = nic_gbps * 1e9 / 8
    egress = nic_b.max() / (bw / nics_per_rank)
    ingress = dst_b.max() / bw
    posting = writes.max() * write_us * 1e-6
    predicted = max(egress, ingress, posting) + rtt_us * 1e-6
    return {
        "model": model_name, "params_B": m.numel() / 1e9, "n_src": n_src, "n_dst": n_dst, "dst_group": dst_group,
        "replicas": n_dst // dst_group, "nic_gbps": nic_gbps, "nics_per_rank": nics_per_rank, "src_mode": src_mode,
        "fp8": fp8, "routes": int(routes), "total_GB": float(dst_b.sum() / 1e9),
        "src_GB_max": float(src_b.max() / 1e9), "src_GB_mean": float(src_b.mean() / 1e9),
        "nic_GB_max": float(nic_b.max() / 1e9), "dst_GB_max": float(dst_b.max() / 1e9),
        "dst_GB_mean": float(dst_b.mean() / 1e9), "writes_max": int(writes.max()),
        "writes_mean": float(writes.mean()), "egress_s": float(egress), "ingress_s": float(ingress),
        "posting_s": float(posting), "predicted_s": float(predicted),
        "bottleneck": max((egress, "source egress"), (ingress, "destination ingress"), (posting, "posting"))[1],
        "plan_s": plan_s,
    }


def _table(rows: list[dict[str, Any]]) -> str:
    cols = [("model", "{}"), ("n_src", "{}"), ("n_dst", "{}"), ("dst_group", "{}"), ("src_mode", "{}"),
            ("total_GB", "{:.0f}"), ("src_GB_max", "{:.2f}"), ("dst_GB_max", "{:.2f}"), ("writes_max", "{}"),
            ("egress_s", "{:.3f}"), ("ingress_s", "{:.3f}"), ("posting_s", "{:.3f}"), ("predicted_s", "{:.3f}"),
            ("bottleneck", "{}")]
    head = [c for c, _ in cols]
    body = [[f.format(r[c]) for c, f in cols] for r in rows]
    w = [max(len(h), *(len(b[k]) for b in body)) for k, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w[k]) for k, h in enumerate(head))]
    lines += ["  ".join(v.rjust(w[k]) for k, v in enumerate(b)) for b in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aiofabric.weights.simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="kimi-k2", choices=sorted(MODELS))
    ap.add_argument("--src", type=int, default=256, help="trainer ranks (BF16)")
    ap.add_argument("--dst", type=int, default=128, help="inference ranks")
    ap.add_argument("--gbps", type=float, default=400.0, help="Gbit/s per rank (all its NICs together)")
    ap.add_argument("--dst-group", type=int, nargs="+", default=[16],
                    help="inference ranks per replica (TP/EP group); several values: one row each")
    ap.add_argument("--nics", type=int, default=1, help="NICs per trainer rank")
    ap.add_argument("--src-mode", choices=("fsdp", "gathered"), nargs="+", default=["fsdp"])
    ap.add_argument("--no-fp8", action="store_true", help="inference in BF16 (no cast)")
    ap.add_argument("--write-us", type=float, default=1.0, help="posting cost per write, microseconds")
    ap.add_argument("--layers", type=int, default=None, help="only the first N layers")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    rows = []
    for mode in a.src_mode:
        for g in a.dst_group:
            rows.append(simulate(a.model, a.src, a.dst, a.gbps, dst_group=g, nics_per_rank=a.nics, src_mode=mode,
                                 fp8=not a.no_fp8, write_us=a.write_us, layers=a.layers))
    print(_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
