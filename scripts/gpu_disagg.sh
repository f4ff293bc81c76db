#!/usr/bin/env bash
# On the GPU machine, after the usual set-up and build (this script builds nothing):
#   source .device-deps/setup.sh && python3 setup.py -q build_ext --inplace && bash scripts/gpu_disagg.sh
# Runs the disaggregated-serving GPU test (tiny model), then examples/disagg_serving.py --device cuda
# with its default GPU model (48 layers, d=2048, FFN 8192) on 1024- and 4096-token prompts;
# logs under $OUT.  Prefill on GPU 0, decode on GPU 1 (GPU 0 for both with one GPU).
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
[ -f .device-deps/setup.sh ] && source .device-deps/setup.sh
nvidia-smi -L 2>&1 | tee "$OUT/disagg_gpus.log"
nvidia-smi topo -m 2>/dev/null | head -8 | tee -a "$OUT/disagg_gpus.log"
python3 -c "import cupy, aiofabric; print('cupy', cupy.__version__, 'gpus', cupy.cuda.runtime.getDeviceCount(), \
'libfabric', aiofabric.fabric_version())" 2>&1 | tee -a "$OUT/disagg_gpus.log"
timeout 240 python3 -m pytest tests/test_disagg_gpu.py -v -rs -s -p no:cacheprovider 2>&1 \
    | tee "$OUT/test_disagg_gpu.log" | tail -40
echo "test exit: ${PIPESTATUS[0]}" | tee -a "$OUT/test_disagg_gpu.log"
timeout 240 python3 examples/disagg_serving.py --device cuda --lengths 1024,4096 --repeats 2 \
    --png "$OUT/disagg_gpu_timeline.png" 2>&1 | tee "$OUT/disagg_gpu_demo.log"
echo "demo exit: ${PIPESTATUS[0]}" | tee -a "$OUT/disagg_gpu_demo.log"
