#!/usr/bin/env bash
# On the GPU machine, after the build: the MoE GPU tests, then the MoE latency
# benchmark with a short configuration; logs and JSON under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/aiofabric-moe-out}
mkdir -p "$OUT"
[ -f .device-deps/setup.sh ] && source .device-deps/setup.sh
nvidia-smi -L 2>&1 | tee "$OUT/gpus.log"
nvidia-smi topo -m 2>/dev/null | head -8 | tee -a "$OUT/gpus.log"
timeout 420 python3 -m pytest tests/test_moe_gpu.py tests/test_moe_kernels_emu.py -v -rs -p no:cacheprovider 2>&1 \
    | tee "$OUT/test_moe_gpu.log" | tail -30
timeout 300 python3 -m benchmarks.moe_latency --iters 300 --warmup 30 --json "$OUT/moe_latency.json" 2>&1 \
    | tee "$OUT/moe_latency.log" | tail -20
