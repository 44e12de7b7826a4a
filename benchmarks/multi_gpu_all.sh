#!/usr/bin/env bash
# Every multi-GPU measurement in one go, for a lease of P GPUs (rows land in $OUT, default .):
# weak/strong scaling of both rings for 1, 2, 4, ... GPUs, the rings against one device, and the
# strong scaling of causal rings in both layouts (contiguous, balanced) for 1, 2, 4, ... GPUs.
#   [REPEATS=20] bash benchmarks/multi_gpu_all.sh   (timed calls per scaling row, median)
set -u
OUT=${OUT:-.}
P=$(python -c "import torch; print(torch.cuda.device_count())")
python -m benchmarks.ring_scaling jax --out "$OUT/ring_scaling_jax.json" --repeats "${REPEATS:-20}"
python -m benchmarks.balanced_scaling jax --out "$OUT/balanced_scaling_jax.json" --repeats "${REPEATS:-20}"
p=1
while [ "$p" -le "$P" ]; do
  torchrun --nproc_per_node="$p" -m benchmarks.ring_scaling torch --out "$OUT/ring_scaling_torch_$p.json" --repeats "${REPEATS:-20}"
  torchrun --nproc_per_node="$p" -m benchmarks.balanced_scaling torch --out "$OUT/balanced_scaling_torch_$p.json" --repeats "${REPEATS:-20}"
  p=$((p * 2))
done
python -m benchmarks.multi_gpu_ring jax --out "$OUT/multi_gpu_ring_jax.json"
torchrun --nproc_per_node="$P" -m benchmarks.multi_gpu_ring torch --out "$OUT/multi_gpu_ring_torch.json"
