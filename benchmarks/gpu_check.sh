#!/usr/bin/env bash
# The GPU checks, as one script for a borrowed CUDA machine that has torch but neither this package's other
# dependencies nor network access: nvCOMP arrives as wheels in .whl/ (pip download ... nvidia-nvcomp-cu12==6.0.0.12
# nvidia-libnvcomp-cu12==6.0.0.12), LMCache is not installed there (the throughput table then has no fp8 row).
#   bash benchmarks/gpu_check.sh OUT_DIR [tests] [throughput] [fit]
set -o pipefail
out=${1:?output directory}; shift
stages=${*:-tests throughput}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for stage in $stages; do
  case $stage in
    tests) timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_path.py 2>&1 | tee "$out/tests.log" ;;
    throughput) timeout 240 python3 -m benchmarks.throughput --device cuda --shapes 8b,qwen0.5b,qwen1.5b \
             --batches 1,16,64 --repeats 3 --out "$out/throughput.md" 2>&1 | tail -30 ;;
    fit) timeout 300 python3 -m benchmarks.fit_scaling --device cuda --out "$out/fit-scaling.md" 2>&1 | tail -30 ;;
  esac
done
