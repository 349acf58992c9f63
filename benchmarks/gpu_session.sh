#!/usr/bin/env bash
# Everything a lent GPU machine should run, in ONE device call of about 9 minutes
# (15 minutes of device time per session, start-up included; 10 minutes per command):
#
#   device tool:  run(command="bash benchmarks/gpu_session.sh", timeout_s=570)
#   rerun some stages on the still-warm machine (the in-place build is kept there):
#                 STAGES="ops_iso variants" GSD_GPU_BUDGET=240 bash benchmarks/gpu_session.sh
#   dry run here: GSD_GPU_DRY=1 TRITON_INTERPRET=1 bash benchmarks/gpu_session.sh (stubs, --small)
#
# Stages, in order of value; each runs under min(its cap, time left before the shared
# deadline), logs as it goes (never through `| tail`), and is skipped when too little time
# is left, so a stage killed at its cap loses only itself:
#   info       device, driver, torch / triton / nvcc versions
#   build      the CUDA extension for sm_90 only, in place (python setup.py build_ext)
#   tests      GPU correctness of the cuda and triton kernels vs the reference (kernel test
#              files only, no -x: every failure is listed)
#   accuracy   benchmarks/gpu_accuracy.py: fp32 triton (tf32x3, tf32) and cuda vs float64
#              at the benchmark shapes incl. D=d=12288; host syncs per op; bit-identical
#              rerun; torch.compile(mode="reduce-overhead") capture of a distillation-like step
#   ops_iso    isometry benchmarks, N=8192 D=d=3072: fused backends vs eager reference
#   ops_elem   SiD / fake-score benchmarks, N=4096 3x64x64 (vs measured copy bandwidth)
#   ops_compiled  the torch.compile(reference) baseline of ops_iso (separate JSON: a
#              session killed at its cap writes none, and the compiles are the slow part)
#   pipeline   one distillation iteration and sampling (no --compile options)
#   variants   Triton dot precision x tile preset timings of the isometry fwd+bwd
#   sanitizer  compute-sanitizer memcheck + racecheck of the CUDA kernels (Firecracker only)
#
# Files under $OUT (at most 8): machine.txt run.log accuracy.txt ops_iso.json ops_elem.json
# ops_compiled.json pipeline.json sanitizer.txt (test results and the build are in run.log,
# variants in accuracy.txt). If late stages were skipped, rerun them within the machine's
# 30 s warm period: STAGES="variants sanitizer" GSD_GPU_BUDGET=200 (timeout_s 230).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu-results}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export GSD_CUDA=on GSD_CUDA_ARCHS=${GSD_CUDA_ARCHS:-90}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
BUDGET=${GSD_GPU_BUDGET:-540}   # seconds for the whole script; timeout_s a little above it
STAGES=${STAGES:-"info build tests accuracy ops_iso ops_elem ops_compiled pipeline variants sanitizer"}
DRY=${GSD_GPU_DRY:-0}           # 1: no GPU here; stages run stubs or their --small forms
LOG=$OUT/run.log
PY=${PYTHON:-$(command -v python3 || command -v python)}  # the GPU image has python3 only
: > "$LOG"

log() { echo "$*" | tee -a "$LOG"; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

stage() {  # stage NAME CAP FUNCTION: FUNCTION under min(CAP, time left) seconds, logged
  local name=$1 cap=$2 fn=$3
  want "$name" || return 0
  local left=$(( BUDGET - SECONDS - 5 ))
  local t=$(( left < cap ? left : cap ))
  if (( t < 15 )); then log "== $name: skipped, ${left}s left"; return 0; fi
  log "== $name: start at ${SECONDS}s, cap ${t}s"
  # timeout signals its whole process group: a stage killed at its cap takes its children
  timeout --kill-after=5 "$t" bash -o pipefail -c "$fn" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  log "== $name: rc=$rc at ${SECONDS}s$( (( rc == 124 || rc == 137 )) && echo ' (hit its cap)')"
}

info() {
  if [[ $DRY == 1 ]]; then echo "dry run: no nvidia-smi"; else
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  fi
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  command -v nvcc >/dev/null && nvcc --version | tail -1
  git -C "$ROOT" log -1 --format='commit %h %cI' 2>/dev/null || true
}
build() {
  if [[ $DRY == 1 ]]; then echo "dry run: build skipped"; return 0; fi
  $PY setup.py -q build_ext --inplace || return 1
  $PY -c "import gsd_kernels as g; import gsd_kernels._C as C; assert C.has_cuda(), 'no CUDA in _C'; print('backends', g.available_backends('cuda'))"
}
tests() {
  # test_isometry_groups.py: the grouped cuda/triton kernels' only GPU test
  local files="tests/kernels/test_native_primitives.py tests/kernels/test_triton_primitives.py tests/kernels/test_ops.py tests/kernels/test_ops_api.py tests/kernels/test_isometry_groups.py"
  for f in tests/kernels/test_kernel_*.py; do [[ -e $f ]] && files="$files $f"; done
  if [[ $DRY == 1 ]]; then echo "dry run: would run pytest on $files"; return 0; fi
  $PY -m pytest -q -n 8 -p no:cacheprovider -rfE --timeout=120 $files
}
accuracy() {
  local small=; [[ $DRY == 1 ]] && small=--small
  $PY benchmarks/gpu_accuracy.py $small | tee "$OUT/accuracy.txt"
}
ops_iso() {
  if [[ $DRY == 1 ]]; then
    $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_ops.py --benchmark-disable -k "isometry and fwd+bwd"
    return
  fi
  $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_ops.py --benchmark-only \
    -k "isometry and 8192 and not compiled" --benchmark-json="$OUT/ops_iso.json"
}
ops_compiled() {  # its own session: two Inductor compiles, and the JSON is written at the end
  if [[ $DRY == 1 ]]; then echo "dry run: torch.compile baseline skipped"; return 0; fi
  $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_ops.py --benchmark-only \
    -k "isometry and 8192 and compiled" --benchmark-json="$OUT/ops_compiled.json"
}
ops_elem() {
  if [[ $DRY == 1 ]]; then
    $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_ops.py --benchmark-disable -k "sid or fake"
    return
  fi
  $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_ops.py --benchmark-only \
    -k "(sid or fake) and 4096" --benchmark-json="$OUT/ops_elem.json"
}
variants() {
  if [[ $DRY == 1 ]]; then echo "dry run: variants need a GPU"; return 0; fi
  $PY benchmarks/gpu_accuracy.py --only-variants | tee -a "$OUT/accuracy.txt"
}
pipeline() {
  if [[ $DRY == 1 ]]; then
    $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_pipeline.py --benchmark-disable -k "not options"
    return
  fi
  $PY -m pytest -q -p no:cacheprovider benchmarks/test_bench_pipeline.py --benchmark-only \
    -k "not options" --benchmark-json="$OUT/pipeline.json"
}
sanitizer() {  # memcheck + racecheck on tiny inputs; works on Firecracker machines, not gVisor
  if [[ $DRY == 1 ]]; then echo "dry run: no compute-sanitizer"; return 0; fi
  local prog='import torch, gsd_kernels as g
x = torch.randn(130, 70, device="cuda", requires_grad=True); z = torch.randn(130, 33, device="cuda", requires_grad=True)
torch.autograd.grad(g.isometry_loss(x, z, backend="cuda"), (x, z))
a, b, c = (torch.randn(9, 3, 5, 7, device="cuda", requires_grad=True) for _ in range(3))
torch.autograd.grad(g.sid_generator_loss(a, b, c, backend="cuda"), (a, b, c))
s = torch.rand(9, device="cuda") + 0.1
torch.autograd.grad(g.fake_score_loss(a, b, s, backend="cuda"), (a, b)); torch.cuda.synchronize(); print("ran")'
  for tool in memcheck racecheck; do
    echo "-- compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --print-limit 20 $PY -c "$prog" 2>&1
  done | tee "$OUT/sanitizer.txt"
}

export -f info build tests accuracy ops_iso ops_compiled ops_elem variants pipeline sanitizer
export DRY PY ROOT
stage info 30 'info | tee "$OUT/machine.txt"'
stage build 150 build
stage tests 150 tests
stage accuracy 100 accuracy
stage ops_iso 100 ops_iso
stage ops_elem 60 ops_elem
stage ops_compiled 120 ops_compiled
stage pipeline 90 pipeline
stage variants 90 variants
stage sanitizer 60 sanitizer
log "== done at ${SECONDS}s of ${BUDGET}s; files: $(ls "$OUT" | tr '\n' ' ')"
