#!/usr/bin/env bash
# The one command to run on a lent GPU machine (H100/H200, no network), from the repo root:
#
#   OUT=/some/dir bash bench/gpu_check.sh                 # op: build, CUDA tests, op benchmark
#   OUT=/some/dir DETECTION=1 bash bench/gpu_check.sh     # + the SD1.x UNet detection table
#                                                         #   (fp16, 8 prompts per batch)
#
# The CUDA tests need pytest, DETECTION=1 needs diffusers and transformers; on a machine without
# network, carry a wheel folder (pip download pytest diffusers transformers safetensors -d wheels/)
# and set WHEELS=wheels: they are installed with --no-index first.
#
# 1. builds attnmem in place with its CUDA kernel (TORCH_CUDA_ARCH_LIST=9.0 by default: sm_90
#    only, to save build time), 2. runs the CUDA tests, 3. runs python -m bench.gpu_bench (verification
#    against attnmem.reference, then timings). Everything lands in $OUT (default
#    bench/results/gpu-<date>): summary.txt (with nvidia-smi), build.log, tests.log, bench.log,
#    gpu_bench.json, gpu_bench.md, and with DETECTION=1 unet_gpu.json, unet_gpu.md (8 files: the
#    most a lent machine sends back). Each step runs even if an earlier one failed (when it can); the exit status
#    is non-zero if any step failed. Budget: build ~2-3 min, tests <= 150 s, bench <= ~4 min.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-$(command -v python || command -v python3)}"
start=$(date +%s)
status=0
say() { echo "[gpu-check $(($(date +%s) - start))s] $*" | tee -a "$OUT/summary.txt"; }

nvidia-smi >>"$OUT/summary.txt" 2>&1 || true
say "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
say "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1))"

# ---- 1. build ------------------------------------------------------------------------------
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset ATTNMEM_CPU_ONLY
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for inc in "$SITE"/nvidia/cu13/include "$SITE"/nvidia/*/include; do  # cusparse.h & co (pip CUDA)
  [ -d "$inc" ] && CPLUS_INCLUDE_PATH="${CPLUS_INCLUDE_PATH:+$CPLUS_INCLUDE_PATH:}$inc"
done
export CPLUS_INCLUDE_PATH="${CPLUS_INCLUDE_PATH:-}"
say "building (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, CUDA_HOME=${CUDA_HOME:-auto})"
rm -f attnmem/_C*.so
if "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  say "build OK"
else
  say "BUILD FAILED (tail of build.log follows)"
  tail -n 40 "$OUT/build.log"
  exit 1
fi
if ! "$PY" -c "
from attnmem import _ext
info = _ext.build_info()
print('build_info:', info)
assert info.get('cuda'), _ext.load_error()
" 2>&1 | tee -a "$OUT/summary.txt"; then
  say "the extension did not load with its CUDA kernel"
  exit 1
fi

# ---- 2. CUDA tests -------------------------------------------------------------------------
TESTS=$(ls tests/test_op.py tests/test_op_cuda_extra.py 2>/dev/null | tr '\n' ' ')
if ! "$PY" -c "import pytest" 2>/dev/null && [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" pytest >/dev/null 2>&1 || true
fi
if "$PY" -c "import pytest" 2>/dev/null; then
  say "pytest -k cuda $TESTS"
  # shellcheck disable=SC2086
  timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda $TESTS \
    >"$OUT/tests.log" 2>&1
  rc=$?
else
  say "pytest is not installed: CUDA tests not run (carry its wheels: WHEELS=folder)"
  echo "pytest is not installed" >"$OUT/tests.log"
  rc=1
fi
tail -n 15 "$OUT/tests.log"
if [ $rc -eq 0 ]; then say "tests OK"; else say "TESTS FAILED (rc $rc, see tests.log)"; status=1; fi

# ---- 3. benchmark --------------------------------------------------------------------------
say "python -m bench.gpu_bench"
timeout 300 "$PY" -m bench.gpu_bench --out "$OUT" --require-gpu --max-seconds 200 \
  >"$OUT/bench.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then say "BENCH FAILED or found a verification failure (rc $rc, see bench.log)"; status=1; fi
if [ -f "$OUT/gpu_bench.md" ]; then cat "$OUT/gpu_bench.md"; else tail -n 30 "$OUT/bench.log"; fi

# ---- 4. optional: detection/mitigation table on the SD1.x UNet ---------------------------------
if [ "${DETECTION:-0}" = "1" ]; then
  if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" diffusers transformers safetensors >>"$OUT/bench.log" 2>&1 || true
  fi
  say "python -m bench.run_unet_bench --device cuda --prompts 8"
  if timeout 240 "$PY" -m bench.run_unet_bench --device cuda --prompts 8 --rounds 5 --out "$OUT" --name unet_gpu >>"$OUT/bench.log" 2>&1; then
    cat "$OUT/unet_gpu.md"
  else
    say "DETECTION BENCH FAILED (see bench.log)"
    status=1
  fi
fi
say "done, status $status; results in $OUT"
exit $status
