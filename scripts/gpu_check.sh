#!/usr/bin/env bash
# On the GPU machine (see ../shared/device/README.md): build in place, run the GPU
# tests and the NVLink benchmark, leave logs under $OUT.
set -uo pipefail
source .device-deps/setup.sh
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
nvidia-smi -L; nvidia-smi topo -m 2>/dev/null | head -6
timeout 300 python3 -m pytest tests/test_gpu.py tests/test_watcher.py -v -rs -p no:cacheprovider 2>&1 | tee "$OUT/test_gpu.log" | tail -25
timeout 300 python3 -m benchmarks.gpu_bw --reps 15 --json "$OUT/gpu_bw.json" 2>&1 | tee "$OUT/gpu_bw.log" | tail -20
