#!/usr/bin/env bash
# On the GPU machine: the MoE work alone (probe of NVLink costs, MoE GPU tests,
# latency benchmark with NCCL, timing probes inside the kernels), each part bounded; logs and
# JSON in $OUT/results.tgz.  Usage: bash scripts/gpu_moe.sh [probe] [tests] [bench] [trace]
set -uo pipefail
source .device-deps/setup.sh
R=/tmp/gpu_results; rm -rf "$R"; mkdir -p "$R"
python3 setup.py -q build_ext --inplace > "$R/build.log" 2>&1 || { tail -30 "$R/build.log"; exit 1; }
nvidia-smi -L | tee "$R/gpus.log"; nvidia-smi topo -m > "$R/topo.log" 2>&1; head -8 "$R/topo.log"
pack() { tar czf "$OUT/results.tgz" -C "$R" .; }
trap pack EXIT
part() {
    local secs=$1 name=$2; shift 2; echo "== $name"
    timeout "$secs" "$@" > "$R/$name.log" 2>&1; echo "rc=$?" >> "$R/$name.log"
    tail -"${TAIL:-12}" "$R/$name.log"; pack
}
want() { [ $# -eq 0 ] || [[ " $WANT " == *" $1 "* ]]; }
WANT="${*:-probe tests bench trace}"
want probe && TAIL=40 part 90 probe python3 -m benchmarks.nvlink_probe --json "$R/probe.json"
want tests && TAIL=12 part 120 test_moe_gpu python3 -m pytest tests/test_moe_gpu.py -q -rs -p no:cacheprovider --timeout 40
want bench && TAIL=20 part 150 moe_latency python3 -m benchmarks.moe_latency --iters 500 --warmup 50 ${EP:+--ep $EP} --json "$R/moe_latency.json"
want trace && TAIL=20 part 100 moe_trace python3 -m benchmarks.moe_latency --iters 200 --warmup 20 --no-nccl --trace ${EP:+--ep $EP} --json "$R/moe_trace.json"
