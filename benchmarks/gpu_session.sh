#!/usr/bin/env bash
# Everything a lent GPU machine should run, in stages that each fit the device tool's
# 10-minute limit per command. Results go to $OUT (default ./gpu-results).
#
#   bash benchmarks/gpu_session.sh build    # install against the machine's torch/triton, GPU info
#   bash benchmarks/gpu_session.sh tests    # the whole test suite (CUDA tests no longer skip)
#   bash benchmarks/gpu_session.sh ops      # kernel benchmarks: fused vs eager vs torch.compile
#   bash benchmarks/gpu_session.sh pipeline # sampling, distillation iteration, scale-out options
#   bash benchmarks/gpu_session.sh nccl     # torchrun with NCCL (one process per GPU), train + resume
#
# Stages after `build` expect the build to be there (same warm machine). Copy the JSON files
# and logs into BENCHMARKS.md with the device, driver and versions that `build` prints.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
stage=${1:?"stage: build | tests | ops | pipeline | nccl"}

case "$stage" in
build)
  { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    nvcc --version | tail -1 || true; } 2>&1 | tee "$OUT/machine.txt"
  python -m pip install --no-build-isolation --no-deps . 2>&1 | tail -3
  python -c "import gsd_kernels._C as C; assert C.has_cuda(), 'CUDA kernels not built'; print('gsd_kernels._C with CUDA')" \
    | tee -a "$OUT/machine.txt"
  ;;
tests)
  # outside the source tree, so the installed package (with _C) is what is tested
  (cd "$OUT" && python -m pytest -q -x -p no:cacheprovider "$OLDPWD/tests" -rs 2>&1 | tail -40) | tee "$OUT/tests.txt"
  ;;
ops)
  python -m pytest -q benchmarks/test_bench_ops.py --benchmark-only --benchmark-json="$OUT/ops.json" 2>&1 \
    | tail -60 | tee "$OUT/ops.txt"
  ;;
pipeline)
  python -m pytest -q benchmarks/test_bench_pipeline.py --benchmark-only --benchmark-json="$OUT/pipeline.json" \
    2>&1 | tail -60 | tee "$OUT/pipeline.txt"
  ;;
nccl)
  gpus=$(python -c "import torch; print(torch.cuda.device_count())")
  run="$OUT/nccl-run"
  rm -rf "$run"
  torchrun --standalone --nproc_per_node="$gpus" -m gsd.train --fused --iters 20 --ckpt-every 10 \
    --eval-samples 0 --out "$run" --no-progress 2>&1 | tail -5 | tee "$OUT/nccl.txt"
  torchrun --standalone --nproc_per_node="$gpus" -m gsd.train --resume "$run" --iters 30 --eval-samples 0 \
    --no-progress 2>&1 | tail -5 | tee -a "$OUT/nccl.txt"
  cp "$run/log.jsonl" "$OUT/nccl-log.jsonl"
  ;;
*)
  echo "unknown stage $stage" >&2
  exit 2
  ;;
esac
