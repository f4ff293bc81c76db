#!/usr/bin/env bash
# On the GPU machine, after the usual set-up and build (this script builds nothing):
#   source .device-deps/setup.sh && python3 setup.py -q build_ext --inplace && bash scripts/gpu_weights.sh
# Runs the weight-transfer GPU tests, then benchmarks/weights_bw.py with a short configuration
# (every GPU pair it can: 2 GPUs, and 4 when there are 4), logs and JSON under $OUT.
set -uo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
nvidia-smi -L 2>&1 | tee "$OUT/weights_gpus.log"
python3 -c "import torch, cupy, aiofabric; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), \
'cupy', cupy.__version__, 'libfabric', aiofabric.fabric_version())" 2>&1 | tee -a "$OUT/weights_gpus.log"
timeout 300 python3 -m pytest tests/test_weights_gpu.py -v -rs -p no:cacheprovider 2>&1 \
    | tee "$OUT/test_weights_gpu.log" | tail -25
n=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
for g in 2 4; do
    if [ "$n" -ge "$g" ]; then
        echo "== weights_bw on $g GPUs"
        timeout 420 python3 -m benchmarks.weights_bw --gpus "$g" --gb 8 --reps 3 --json "$OUT/weights_bw_${g}gpu.json" \
            2>&1 | tee "$OUT/weights_bw_${g}gpu.log" | tail -30
    fi
done
