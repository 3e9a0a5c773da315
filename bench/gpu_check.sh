#!/usr/bin/env bash
# The one command to run on a lent GPU machine (H100/H200, no network), from the repo root:
#
#   OUT=/some/dir bash bench/gpu_check.sh                 # the op: five stages, <= 9 minutes
#   OUT=/some/dir DETECTION=1 bash bench/gpu_check.sh     # + the SD1.x UNet detection table
#
# Stages, in this order; each ends with one line "STAGE <name>: PASS | FAIL (why) | SKIP (why)":
#   1. conformance  tests/cuda_emu/ptx_conformance.cu: the kernel's PTX wrappers (mma.sync f16 /
#                   bf16 fragments, cp.async copy and zero-fill, fp16/bf16 packing) against the
#                   host emulator's model of them, on which the CI's emulator test rests
#   2. build        attnmem in place with its CUDA kernel for this GPU
#                   (TORCH_CUDA_ARCH_LIST = its compute capability unless set), then checks that
#                   the kernel loads and the fast path accepts this device
#   3. sanitizer    compute-sanitizer memcheck, racecheck, synccheck, initcheck on
#                   python -m bench.gpu_small_cases (every plan kind, also those of 99 KB parts);
#                   SKIP when the tool is missing or refuses the device
#   4. tests        pytest -k cuda tests/test_op.py tests/test_op_cuda_extra.py, then again with
#                   ATTNMEM_CUDA_SMEM_OPTIN_CAP=101376 (the launch plans of 99 KB parts)
#   5. bench        python -m bench.gpu_bench: verification against attnmem.reference, timings
#   6. detection    only with DETECTION=1: python -m bench.run_unet_bench --device cuda
#                   --prompts 8 (needs diffusers and transformers)
# The tests need pytest, DETECTION=1 diffusers and transformers; on a machine without network,
# carry a wheel folder (pip download pytest diffusers transformers safetensors -d wheels/) and set
# WHEELS=wheels: what is missing is installed from it with --no-index.
# A stage that needs the build is skipped when the build failed. Every stage has a time limit
# inside an overall budget of ${BUDGET_S:-540} s.
#
# Output, all in $OUT (default bench/results/gpu-<date>), at most 8 files (the most a lent
# machine sends back): summary.txt (nvidia-smi, the conformance report, one line per stage and
# the verdict), build.log, sanitizer.log, tests.log, bench.log, gpu_bench.json, gpu_bench.md, and
# with DETECTION=1 unet_gpu.json (its table goes into summary.txt).
# Exit status: 0 every stage passed; 1 a stage failed; 2 none failed but one was skipped.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT="$(pwd)"
OUT="${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/attnmem-gpu-check.XXXXXX")"  # binaries: never into $OUT
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
BUDGET_S="${BUDGET_S:-540}"
say() { echo "[gpu-check $(($(date +%s) - start))s] $*" | tee -a "$SUMMARY"; }

declare -a STAGES=()
declare -A RESULT=()
stage() {  # stage NAME PASS|FAIL|SKIP [why]
  STAGES+=("$1")
  RESULT[$1]="$2${3:+ ($3)}"
  say "STAGE $1: ${RESULT[$1]}"
}
# Seconds a stage may take: at most $1, and never eating the $2 seconds kept for later stages.
limit() {
  local left=$((BUDGET_S - ($(date +%s) - start) - $2))
  [ "$left" -gt "$1" ] && left=$1
  [ "$left" -lt 10 ] && left=10
  echo "$left"
}

# ---- the machine -----------------------------------------------------------------------------
PY=""
for cand in "${PYTHON:-}" python3 python; do
  [ -n "$cand" ] && command -v "$cand" >/dev/null && "$cand" -c "import torch" 2>/dev/null &&
    PY="$(command -v "$cand")" && break
done
nvidia-smi >>"$SUMMARY" 2>&1 || say "nvidia-smi failed"
say "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
say "device: $(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
if [ -z "$PY" ]; then
  say "no python with torch found (set PYTHON)"
  stage all FAIL "no python with torch"
  exit 1
fi
say "python: $PY ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' 2>&1))"
CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')"
[ -n "$CAP" ] || CAP="$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
if [ -z "$CAP" ]; then
  say "cannot read the device's compute capability: is there a GPU?"
  stage all FAIL "no GPU"
  exit 1
fi
SM="${CAP/./}"
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
    export CUDA_HOME
  fi
fi
NVCC="${CUDA_HOME:+$CUDA_HOME/bin/}nvcc"
TORCH_INC="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"

# ---- 1. conformance of the PTX wrappers with the emulator's model ------------------------------
say "conformance: nvcc -arch=sm_$SM tests/cuda_emu/ptx_conformance.cu"
if ! "$NVCC" -std=c++17 -O2 -arch="sm_$SM" -I"$ROOT/csrc/cuda" -I"$ROOT/tests/cuda_emu" \
  -I"$TORCH_INC" "$ROOT/tests/cuda_emu/ptx_conformance.cu" -o "$WORK/ptx_conformance" \
  >>"$SUMMARY" 2>&1; then
  stage conformance FAIL "does not compile, see summary.txt"
else
  timeout "$(limit 60 480)" "$WORK/ptx_conformance" 2>&1 | tee -a "$SUMMARY"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then
    stage conformance PASS
  else
    stage conformance FAIL "rc $rc: the emulator's model of a PTX wrapper is wrong, see summary.txt"
  fi
fi

# ---- 2. build --------------------------------------------------------------------------------
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$CAP}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
unset ATTNMEM_CPU_ONLY ATTNMEM_CUDA_SMEM_OPTIN_CAP ATTNMEM_FORCE_REFERENCE
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for inc in "$SITE"/nvidia/cu13/include "$SITE"/nvidia/*/include; do  # cusparse.h & co (pip CUDA)
  [ -d "$inc" ] && CPLUS_INCLUDE_PATH="${CPLUS_INCLUDE_PATH:+$CPLUS_INCLUDE_PATH:}$inc"
done
export CPLUS_INCLUDE_PATH="${CPLUS_INCLUDE_PATH:-}"
say "build: TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-auto}"
rm -f attnmem/_C*.so
built=0
if ! timeout "$(limit 240 300)" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
  tail -n 30 "$OUT/build.log"
  stage build FAIL "see build.log"
elif "$PY" - >>"$SUMMARY" 2>&1 <<'EOF'; then
import torch
from attnmem import _ext, ops

info = _ext.build_info()
print("build_info:", info)
assert info.get("cuda"), f"attnmem._C has no CUDA kernel ({_ext.load_error()})"
reasons = ops.fast_path_reasons(torch.empty(1, 4, 1, 64, device="cuda", dtype=torch.float16))
assert not reasons, f"the fast path refuses this device: {reasons}"
EOF
  built=1
  stage build PASS
else
  tail -n 5 "$SUMMARY"
  stage build FAIL "the CUDA kernel does not load or refuses this device, see summary.txt"
fi

# ---- 3. compute-sanitizer --------------------------------------------------------------------
SAN="$(command -v compute-sanitizer || true)"
[ -z "$SAN" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ] &&
  SAN="$CUDA_HOME/bin/compute-sanitizer"
if [ "$built" -ne 1 ]; then
  stage sanitizer SKIP "no build"
elif [ -z "$SAN" ]; then
  stage sanitizer SKIP "compute-sanitizer not found"
else
  : >"$OUT/sanitizer.log"
  # Only attnmem's kernels are checked (torch's own would be slow and are not ours to judge).
  FILTER=(--kernel-name kns=attnmem)
  "$SAN" "${FILTER[@]}" true >>"$OUT/sanitizer.log" 2>&1 || FILTER=()
  [ ${#FILTER[@]} -eq 0 ] && say "sanitizer: --kernel-name not accepted, checking every kernel"
  failed_tools=() skipped_tools=()
  for tool in memcheck racecheck synccheck initcheck; do
    say "sanitizer: $tool"
    echo "==== compute-sanitizer --tool $tool" >>"$OUT/sanitizer.log"
    extra=()
    [ "$tool" = racecheck ] && extra=(--racecheck-report all)
    timeout "$(limit 60 240)" "$SAN" --tool "$tool" "${FILTER[@]}" "${extra[@]}" \
      --error-exitcode 97 "$PY" -m bench.gpu_small_cases >>"$WORK/$tool.log" 2>&1
    rc=$?
    cat "$WORK/$tool.log" >>"$OUT/sanitizer.log"
    summary_line="$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$WORK/$tool.log" | tail -n 1)"
    if [ "$rc" -eq 0 ]; then
      say "sanitizer: $tool clean ${summary_line:+($summary_line)}"
    elif grep -qiE "device not supported|not supported on this|unsupported device" "$WORK/$tool.log"; then
      say "sanitizer: $tool cannot run on this device (see sanitizer.log)"
      skipped_tools+=("$tool")
    elif [ "$rc" -eq 97 ]; then
      say "sanitizer: $tool FOUND ERRORS: $summary_line"
      failed_tools+=("$tool")
    elif [ "$rc" -eq 124 ]; then
      say "sanitizer: $tool ran out of time"
      failed_tools+=("$tool (time)")
    else
      say "sanitizer: $tool run failed (rc $rc; a wrong result shows as FAIL in sanitizer.log)"
      failed_tools+=("$tool (rc $rc)")
    fi
  done
  if [ ${#failed_tools[@]} -gt 0 ]; then
    stage sanitizer FAIL "${failed_tools[*]}, see sanitizer.log"
  elif [ ${#skipped_tools[@]} -gt 0 ]; then
    stage sanitizer SKIP "the tool refused the device for ${skipped_tools[*]}"
  else
    stage sanitizer PASS
  fi
fi

# ---- 4. the CUDA test matrix, then again with the plans of 99 KB parts ------------------------
if ! "$PY" -c "import pytest" 2>/dev/null && [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" pytest >/dev/null 2>&1 ||
    say "tests: installing pytest from $WHEELS failed"
fi
if [ "$built" -ne 1 ]; then
  stage tests SKIP "no build"
elif ! "$PY" -c "import pytest" 2>/dev/null; then
  stage tests FAIL "pytest is not installed (carry its wheel: WHEELS=folder)"
else
  : >"$OUT/tests.log"
  tests_failed=()
  for cap in "" 101376; do
    label="${cap:+ATTNMEM_CUDA_SMEM_OPTIN_CAP=$cap }pytest -k cuda"
    say "tests: $label"
    ATTNMEM_CUDA_SMEM_OPTIN_CAP="$cap" timeout "$(limit 110 120)" "$PY" -m pytest -q -rs \
      -p no:cacheprovider -k cuda tests/test_op.py tests/test_op_cuda_extra.py \
      >"$WORK/tests.log" 2>&1
    rc=$?
    { echo "==== $label (rc $rc)"; cat "$WORK/tests.log"; } >>"$OUT/tests.log"
    result="$(tail -n 1 "$WORK/tests.log")"
    say "tests: $result"
    # A run that skipped its CUDA tests (no device or no kernel) has not tested anything.
    if [ "$rc" -ne 0 ]; then
      tests_failed+=("${cap:-uncapped} (rc $rc)")
    elif ! grep -qE "[0-9]+ passed" <<<"$result" || grep -q "needs a CUDA device" "$WORK/tests.log"; then
      tests_failed+=("${cap:-uncapped} (CUDA tests did not run)")
    fi
  done
  if [ ${#tests_failed[@]} -gt 0 ]; then
    stage tests FAIL "${tests_failed[*]}, see tests.log"
  else
    stage tests PASS
  fi
fi

# ---- 5. benchmark ----------------------------------------------------------------------------
if [ "$built" -ne 1 ]; then
  stage bench SKIP "no build"
else
  t=$(limit 200 10)
  timing=$((t > 60 ? t - 30 : t / 2))  # leave time for the verification and the write-up
  say "bench: python -m bench.gpu_bench (time limit $t s, timing $timing s)"
  timeout "$t" "$PY" -m bench.gpu_bench --out "$OUT" --require-gpu --max-seconds "$timing" \
    >"$OUT/bench.log" 2>&1
  rc=$?
  if [ -f "$OUT/gpu_bench.md" ]; then cat "$OUT/gpu_bench.md"; else tail -n 30 "$OUT/bench.log"; fi
  if [ "$rc" -eq 0 ]; then
    stage bench PASS
  else
    stage bench FAIL "rc $rc: a verification failure or an error, see bench.log"
  fi
fi

# ---- 6. optional: detection/mitigation table on the SD1.x UNet ---------------------------------
if [ "${DETECTION:-0}" = "1" ]; then
  if [ "$built" -ne 1 ]; then
    stage detection SKIP "no build"
  else
    if [ -n "${WHEELS:-}" ]; then
      "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" diffusers transformers \
        safetensors >>"$OUT/bench.log" 2>&1 || say "detection: installing from $WHEELS failed"
    fi
    say "detection: python -m bench.run_unet_bench --device cuda --prompts 8"
    if timeout 240 "$PY" -m bench.run_unet_bench --device cuda --prompts 8 --rounds 5 \
      --out "$OUT" --name unet_gpu >>"$OUT/bench.log" 2>&1; then
      cat "$OUT/unet_gpu.md" >>"$SUMMARY" && rm -f "$OUT/unet_gpu.md"  # 8 files at most
      stage detection PASS
    else
      rm -f "$OUT/unet_gpu.md"
      stage detection FAIL "see bench.log"
    fi
  fi
fi

# ---- verdict ---------------------------------------------------------------------------------
status=0
for s in "${STAGES[@]}"; do
  case "${RESULT[$s]}" in
    FAIL*) status=1 ;;
    SKIP*) [ "$status" -eq 0 ] && status=2 ;;
  esac
done
say "---- summary ($(($(date +%s) - start)) s) ----"
for s in "${STAGES[@]}"; do say "  $(printf '%-12s' "$s") ${RESULT[$s]}"; done
case $status in
  0) say "gpu-check: every stage PASSED" ;;
  1) say "gpu-check: FAILED in: $(for s in "${STAGES[@]}"; do [[ ${RESULT[$s]} == FAIL* ]] && printf '%s ' "$s"; done)" ;;
  2) say "gpu-check: no failure, but SKIPPED: $(for s in "${STAGES[@]}"; do [[ ${RESULT[$s]} == SKIP* ]] && printf '%s ' "$s"; done)" ;;
esac
say "results in $OUT"
exit $status
