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
part() { local secs=$1 name=$2; shift 2; echo "== $name"; timeout "$secs" "$@" > "$R/$name.log" 2>&1; echo "rc=$?" >> "$R/$name.log"; tail -"${TAIL:-12}" "$R/$name.log"; }
TAIL=6 part 90 test_gpu python3 -m pytest tests/test_gpu.py tests/test_watcher.py -q -rs -p no:cacheprovider --timeout 60
TAIL=14 part 90 gpu_bw python3 -m benchmarks.gpu_bw --reps 15 --json "$R/gpu_bw.json"
TAIL=20 part 130 test_moe_gpu python3 -m pytest tests/test_moe_gpu.py -v -rs -p no:cacheprovider --timeout 60
TAIL=25 part 180 moe_latency python3 -m benchmarks.moe_latency --iters 300 --warmup 30 --json "$R/moe_latency.json"
TAIL=12 part 120 moe_breakdown python3 -m benchmarks.moe_latency --iters 200 --warmup 20 --no-nccl --breakdown --json "$R/moe_breakdown.json"
TAIL=20 part 100 test_weights_gpu python3 -m pytest tests/test_weights_gpu.py -v -rs -p no:cacheprovider --timeout 60
TAIL=25 part 120 weights_bw python3 -m benchmarks.weights_bw --gpus 2 --gb 8 --reps 3 --json "$R/weights_bw.json"
