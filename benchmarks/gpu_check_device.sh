#!/usr/bin/env bash
# `make gpu-check-device`: the one prepared call for a lent GPU machine (the workplace's H200: its
# python3 already holds torch, triton, numpy, tqdm; nothing can be installed or downloaded there,
# so `make gpu-check`, which builds a venv from PyPI, cannot run). It
#   1. records the machine (GPU, driver, torch / CUDA / Triton / nvcc versions) first, so even a
#      failed build leaves a validation trail;
#   2. builds msff._C in place for the GPU it finds (TORCH_CUDA_ARCH_LIST: 9.0a on Hopper, else the
#      device's own capability), all cores, unless an importable build with CUDA kernels is there;
#   3. runs `python -m msff.gpu_check --budget $GPU_BUDGET` (default 360 s: parity of every unit,
#      block timings, the sanitizer of the fastest passing CUDA variant) plus any arguments given;
#   4. copies the log, the results JSON and the validation record into $OUT (the device tool's
#      return folder; ./gpu-check-out when unset) so they can be committed here.
# Exit status: that of the check (the build's when it fails). Environment: GPU_PY (python3),
# GPU_BUDGET (360), OUT. On the device tool: `run` with command `bash benchmarks/gpu_check_device.sh`
# (`make` is not listed on that image) and timeout_s 540 (machine start ~1-2 min + build < 1 min on
# 16 cores + 360 s + record fit in the 15-minute lease).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PY:-python3}
OUT=${OUT:-gpu-check-out}
BUDGET=${GPU_BUDGET:-360}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

say() { echo "[gpu-check-device $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
: > "$LOG"
say "python: $PY; budget ${BUDGET}s; out: $OUT"
{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
    --format=csv,noheader; } 2>&1 | tee -a "$LOG"
"$PY" - <<'PY' 2>&1 | tee -a "$LOG"
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as e:  # noqa: BLE001
    tv = f"not importable ({e})"
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"triton {tv}  gpu {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
PY
{ command -v nvcc >/dev/null && nvcc --version | tail -n 2; } 2>&1 | tee -a "$LOG"

built() {
  "$PY" -c "import msff.ops._cuda as c, sys; sys.exit(0 if c.kernels_built() else 1)" >/dev/null 2>&1
}
if built; then
  say "msff._C with CUDA kernels is importable: no build"
else
  ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'{m}.{n}' + ('a' if (m, n) == (9, 0) else ''))" 2>/dev/null || echo "9.0a")
  say "building msff._C for TORCH_CUDA_ARCH_LIST=$ARCH"
  start=$SECONDS
  if ! env TORCH_CUDA_ARCH_LIST="$ARCH" MSFF_BUILD_CUDA=1 MAX_JOBS="$(nproc)" \
      "$PY" setup.py -q build_ext --inplace >>"$LOG" 2>&1; then
    say "build FAILED (see $LOG)"
    tail -n 40 "$LOG"
    exit 3
  fi
  say "build done in $((SECONDS - start)) s"
  built || { say "built, but msff.ops._cuda reports no CUDA kernels"; exit 3; }
fi

say "python -m msff.gpu_check --budget $BUDGET $*"
"$PY" -m msff.gpu_check --budget "$BUDGET" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
say "gpu_check exit status $rc"
for f in msff/validation/*.json benchmarks/results/gpu-check-*.json; do
  [ -f "$f" ] && cp "$f" "$OUT/" && say "copied $f"
done
exit "$rc"
