#!/usr/bin/env bash
# Compile the CUDA kernel of attnmem against torch 2.14.1 + CUDA 13 and import it. No GPU needed.
#
#   bash bench/cuda_compile_check.sh          (also: make cuda-check, and CI)
#
# Uses the venv at ${ATTNMEM_CUDA_VENV:-/root/.cache/attnmem/venv-cuda} when it holds torch
# 2.14.1, else creates it (torch 2.14.1 comes from local disk, ~2 min). Builds in a temporary
# copy of the sources, so the in-tree CPU build is untouched. Fails loudly if the extension does
# not compile, does not import, imports without its CUDA kernel, lacks the PTX of its newest
# arch (so that newer GPUs can run it), or if the GPU check's PTX conformance program
# (tests/cuda_emu/ptx_conformance.cu) does not compile.
#
# Environment: ATTNMEM_CUDA_VENV, CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST
# (default: setup.py's, "8.0;9.0+PTX"), MAX_JOBS (default 2), KEEP_BUILD=1 keeps the temporary
# build directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ATTNMEM_CUDA_VENV:-/root/.cache/attnmem/venv-cuda}"
TORCH_WANT="2.14.1"
PY="$VENV/bin/python"
start=$(date +%s)
say() { echo "[cuda-check $(($(date +%s) - start))s] $*"; }
die() { echo "[cuda-check] FAILED: $*" >&2; exit 1; }

# ---- venv with torch+CUDA -------------------------------------------------------------------
have_torch() {
  "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_WANT' and torch.version.cuda else 1)" \
    >/dev/null 2>&1
}
if ! have_torch; then
  if ! "$PY" -c "pass" >/dev/null 2>&1; then
    say "creating venv $VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv --clear "$VENV" || die "python3 -m venv $VENV"
  fi
  say "installing torch==$TORCH_WANT (CUDA) into $VENV"
  # `python -m pip`: a venv moved from elsewhere has bin/pip with a stale shebang.
  "$PY" -m pip install --quiet "torch==$TORCH_WANT" numpy ninja pybind11 setuptools wheel ||
    die "pip install torch==$TORCH_WANT"
  have_torch || die "$VENV has no torch $TORCH_WANT with CUDA after installing it"
fi
"$PY" -c "import ninja, pybind11, setuptools, wheel, numpy" >/dev/null 2>&1 ||
  "$PY" -m pip install --quiet ninja pybind11 setuptools wheel numpy || die "pip install build deps"
export PATH="$VENV/bin:$PATH"  # ninja

# ---- toolkit --------------------------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(command -v nvcc)")")"
  else
    die "no CUDA toolkit: set CUDA_HOME (nvcc not found)"
  fi
fi
export CUDA_HOME
[ -x "$CUDA_HOME/bin/nvcc" ] || die "$CUDA_HOME/bin/nvcc not found"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# setup.py finds the CUDA headers torch needs (cusparse.h, ...) in the nvidia-* wheels itself,
# and must build the CUDA kernel here or fail.
export ATTNMEM_REQUIRE_CUDA=1
export MAX_JOBS="${MAX_JOBS:-2}"
unset ATTNMEM_CPU_ONLY
say "torch $("$PY" -c 'import torch; print(torch.__version__)'), $("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1)"
say "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-(setup.py default)} MAX_JOBS=$MAX_JOBS CUDA_HOME=$CUDA_HOME"

# ---- build in a temporary copy --------------------------------------------------------------
BUILD="$(mktemp -d "${TMPDIR:-/tmp}/attnmem-cuda-check.XXXXXX")"
if [ "${KEEP_BUILD:-0}" != "1" ]; then trap 'rm -rf "$BUILD"' EXIT; fi
cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/csrc" "$ROOT/attnmem" "$BUILD/"
rm -f "$BUILD"/attnmem/*.so
find "$BUILD" -name __pycache__ -prune -exec rm -rf {} +
say "building in $BUILD"
(cd "$BUILD" && "$PY" setup.py build_ext --inplace >build.log 2>&1) || {
  grep -E "error|Error" -A3 "$BUILD/build.log" | head -n 80 >&2 || true
  tail -n 40 "$BUILD/build.log" >&2
  die "build (log above; KEEP_BUILD=1 keeps $BUILD)"
}
grep -E "csrc/cuda/.*warning" "$BUILD/build.log" | sort -u | head -n 20 || true  # ours only
say "built"

# ---- per-kernel registers / spills (triton ships cuobjdump; the system toolkit may not) ------
SO="$(ls "$BUILD"/attnmem/_C*.so)"
OBJDUMP="$(command -v cuobjdump || true)"
[ -z "$OBJDUMP" ] && [ -x "$CUDA_HOME/bin/cuobjdump" ] && OBJDUMP="$CUDA_HOME/bin/cuobjdump"
[ -z "$OBJDUMP" ] && [ -x "$SITE/triton/backends/nvidia/bin/cuobjdump" ] && OBJDUMP="$SITE/triton/backends/nvidia/bin/cuobjdump"
if [ -n "$OBJDUMP" ]; then
  "$OBJDUMP" -res-usage "$SO" 2>/dev/null | "$PY" -c '
import re, sys
arch, name, rows = "?", "?", []
for line in sys.stdin:
    m = re.search(r"arch = (sm_\d+)", line)
    if m: arch = m.group(1)
    m = re.search(r"Function (\S+):", line)
    if m: name = m.group(1)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
    if m and "attnmem" in name:
        rows.append((arch, int(m.group(1)), int(m.group(2)), int(m.group(4)), name))
print(f"{len(rows)} kernels (arch, registers, stack bytes, local bytes, mangled name):")
for r in rows:
    print(f"  {r[0]} REG {r[1]:3d} STACK {r[2]:4d} LOCAL {r[3]:4d}  {r[4][:90]}")
spill = [r for r in rows if r[3] > 0]
print("spills to local memory:", "none" if not spill else f"{len(spill)} kernels (see LOCAL)")
' || say "cuobjdump output not parsed"
  # The tensor-core kernels were built from the PTX wrappers, not the emulator's seam.
  SASS="$("$OBJDUMP" -sass "$SO" 2>/dev/null)"
  for insn in 'HMMA\.16816\.F32 ' 'HMMA\.16816\.F32\.BF16 ' 'LDGSTS'; do
    grep -qE "$insn" <<<"$SASS" || die "no '$insn' instruction in the machine code of $SO"
  done
  say "machine code has the tensor-core mma (f16, bf16) and cp.async instructions"
  # Newer GPUs (compute capability 10.x, 12.x) can only run the kernel from PTX.
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    # cuobjdump names each embedded PTX "<file>.sm_90.ptx".
    [ "$("$OBJDUMP" -lptx "$SO" 2>/dev/null | grep -cE 'PTX file.*_90\.ptx')" -ge 3 ] ||
      die "the default build lacks sm_90 PTX in its 3 CUDA files (cuobjdump -lptx $SO)"
    say "default build embeds sm_90 PTX (newer GPUs compile it at load)"
  fi
else
  say "no cuobjdump found: machine code and PTX not inspected"
fi

# ---- the GPU check's PTX conformance program compiles ---------------------------------------
TORCH_INC="$("$PY" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
"$CUDA_HOME/bin/nvcc" -std=c++17 -O2 -arch=sm_90 -I"$ROOT/csrc/cuda" -I"$ROOT/tests/cuda_emu" \
  -I"$TORCH_INC" "$ROOT/tests/cuda_emu/ptx_conformance.cu" -o "$BUILD/ptx_conformance" ||
  die "tests/cuda_emu/ptx_conformance.cu does not compile"
say "tests/cuda_emu/ptx_conformance.cu compiles"

# ---- import with the CUDA venv --------------------------------------------------------------
(cd "$BUILD" && PYTHONPATH="$BUILD" "$PY" - <<'EOF') || die "import check"
import os
import torch
import attnmem
from attnmem import _ext

assert _ext.extension() is not None, f"attnmem._C did not load: {_ext.load_error()}"
info = _ext.build_info()
print("build_info:", info)
assert info["cuda"], "attnmem._C was built without its CUDA kernel"
assert list(info["cuda_head_dims"]), "cuda_head_dims is empty"
assert info["cuda_f32_max_head_dim"] == 160, info
assert _ext.cuda_targets(), "build_info has no CUDA targets"
if not os.environ.get("TORCH_CUDA_ARCH_LIST"):  # setup.py's default
    assert "compute_90" in _ext.cuda_targets(), _ext.cuda_targets()
    # A Blackwell device would run the PTX; without it the wrapper would fall back.
    assert not attnmem.ops.cuda_kernel_reasons(
        torch.float16, 64, (10, 0), _ext.cuda_targets(), _ext.cuda_head_dims(), 160
    )
assert torch._C._dispatch_has_kernel_for_dispatch_key("attnmem::cross_attention", "CUDA"), \
    "no CUDA kernel registered for attnmem::cross_attention"
assert torch._C._dispatch_has_kernel_for_dispatch_key("attnmem::cross_attention", "CPU")
# The CPU kernel of the CUDA build still agrees with the reference.
q, k, v = torch.randn(2, 33, 2, 40), torch.randn(2, 77, 2, 40), torch.randn(2, 77, 2, 40)
got = torch.ops.attnmem.cross_attention(q, k, v, None, None, None, True, False)
ref = attnmem.reference.cross_attention(q, k, v)
for g, r in zip(got[:3], ref[:3]):
    torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
print("import OK: CUDA kernel registered; CPU kernel of this build matches the reference")
EOF
say "OK"
