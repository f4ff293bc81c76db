#!/usr/bin/env bash
# On the GPU machine: build once, then the GPU tests and benchmarks of the NVLink
# path, MoE and weight transfer, each part bounded in time; every log and JSON goes
# into $OUT/results.tgz (one file), summaries to stdout.
set -uo pipefail
source .device-deps/setup.sh
R=/tmp/gpu_results; rm -rf "$R"; mkdir -p "$R"
python3 setup.py -q build_ext --inplace > "$R/build.log" 2>&1 || { tail -30 "$R/build.log"; exit 1; }
nvidia-smi -L | tee "$R/gpus.log"
pack() { tar czf "$OUT/results.tgz" -C "$R" .; }
trap pack EXIT
part() {  # a bounded step; the archive is refreshed after each
    local secs=$1 name=$2; shift 2; echo "== $name"
    timeout "$secs" "$@" > "$R/$name.log" 2>&1; echo "rc=$?" >> "$R/$name.log"
    tail -"${TAIL:-12}" "$R/$name.log"; pack
}
TAIL=6 part 50 test_gpu python3 -m pytest tests/test_gpu.py tests/test_watcher.py -q -rs -p no:cacheprovider --timeout 40
TAIL=15 part 50 gpu_bw python3 -m benchmarks.gpu_bw --reps 15 --json "$R/gpu_bw.json"
TAIL=12 part 60 test_moe_gpu python3 -m pytest tests/test_moe_gpu.py -q -rs -p no:cacheprovider --timeout 40
TAIL=12 part 80 moe_latency python3 -m benchmarks.moe_latency --iters 300 --warmup 30 --json "$R/moe_latency.json"
TAIL=14 part 60 moe_trace python3 -m benchmarks.moe_latency --iters 200 --warmup 20 --no-nccl --trace --json "$R/moe_trace.json"
TAIL=8 part 50 test_weights_gpu python3 -m pytest tests/test_weights_gpu.py -q -rs -p no:cacheprovider --timeout 40
TAIL=8 part 70 weights_bw python3 -m benchmarks.weights_bw --gpus 2 --gb 8 --reps 3 --json "$R/weights_bw.json"
TAIL=8 part 70 test_disagg_gpu python3 -m pytest tests/test_disagg_gpu.py -q -rs -s -p no:cacheprovider --timeout 60
TAIL=30 PYTHONPATH=$PWD:$PYTHONPATH part 80 disagg_gpu python3 examples/disagg_serving.py --device cuda --lengths 1024,4096 --repeats 2 --png "$R/disagg_gpu_timeline.png"
