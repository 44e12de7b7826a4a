#!/usr/bin/env bash
# xformers for real on a GPU machine: build xformers from its sdist against the installed torch,
# check that the library detects it, run the CUDA tests' xformers rows, then time the xformers
# backend against backend torch in one process.
#
#   bash benchmarks/xformers_check.sh xformers-0.0.35.tar.gz OUT_DIR
#
# TORCH_CUDA_ARCH_LIST (default 9.0: Hopper) and MAX_JOBS (default 16) steer the build;
# python3 must be the interpreter that has torch (on some hosts a bare `pip` belongs to another).
set -euo pipefail
sdist=$1
out=$2
target=${XFORMERS_TARGET:-/tmp/xformers_build}
mkdir -p "$out"
start=$(date +%s)
if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install --no-build-isolation --no-deps --target "$target" "$sdist" >"$out/xformers_build.log" 2>&1; then
  echo "xformers build failed; the end of its log:"
  tail -40 "$out/xformers_build.log"
  exit 1
fi
echo "xformers built in $(( $(date +%s) - start )) s"
export PYTHONPATH="$target:${PYTHONPATH:-}"
python3 -c "import torch, xformers; from ring_torch._kernels import xformers_available, select_backend; \
print('xformers', xformers.__version__, 'torch', torch.__version__, 'available', xformers_available(), \
'auto ->', select_backend('cuda', torch.bfloat16, torch.cuda.get_device_capability()))"
if ! python3 -m pytest -q -p no:cacheprovider -o addopts="" -rf --tb=short parity_tests/test_torch_cuda.py -k xformers \
    >"$out/xformers_tests.log" 2>&1; then
  echo "some xformers CUDA tests failed (all of it in xformers_tests.log):"
fi
grep -E "^(FAILED|E  )|passed|failed" "$out/xformers_tests.log" | tail -30
python3 -m benchmarks.xformers_check --out "$out/xformers.json"
