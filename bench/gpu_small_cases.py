"""Small calls of the CUDA kernel that reach each of its launch plans, for compute-sanitizer.

bench/gpu_check.sh runs this under memcheck, racecheck, synccheck and initcheck. Every call is
judged against attnmem.reference by attnmem.testing's tolerance rule (the project's one rule),
so a sanitizer run is also a correctness run. The plans of 99 KB parts are reached on a larger
GPU with the test-only knob ATTNMEM_CUDA_SMEM_OPTIN_CAP.

    python -m bench.gpu_small_cases                 (a CUDA device and the compiled CUDA kernel)
    python -m bench.gpu_small_cases --device cpu    (the same calls on the CPU kernel: a dry run)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from attnmem import _ext
from attnmem.testing import OpCase, compare

CAP_99K = 101376  # the shared-memory opt-in of sm_86 / sm_89 / sm_120 parts

# (name, case, smem cap or None, stats); inputs, masks and the tolerance rule: attnmem.testing
CASES = [
    (
        "fp16 one tile per CTA, masks",
        OpCase(97, 77, 40, 4, 3, torch.float16, mask="with-empty"),
        None,
        True,
    ),
    ("bf16 Nk 128, D 80", OpCase(33, 128, 80, 1, 2, torch.bfloat16, mask="with-empty"), None, True),
    (
        "fp16 8 tiles per CTA: Q prefetch",
        OpCase(144, 77, 40, 33, 8, torch.float16, mask="with-empty"),
        None,
        True,
    ),
    (
        "bf16 D 160 Nk 128 on a 99 KB cap",
        OpCase(144, 128, 160, 33, 8, torch.bfloat16),
        CAP_99K,
        True,
    ),
    (
        "fp16 2 tiles per warp, no prefetch",
        OpCase(144, 128, 128, 33, 8, torch.float16, mask="with-empty"),
        CAP_99K,
        True,
    ),
    (
        "fp16 element loads",
        OpCase(45, 77, 40, 2, 3, torch.float16, "misaligned", "with-empty"),
        None,
        True,
    ),
    (
        "bf16 strided, no statistics",
        OpCase(45, 5, 64, 2, 3, torch.bfloat16, "last-dim-strided"),
        None,
        False,
    ),
    ("fp32 D 72 masks", OpCase(50, 77, 72, 4, 2, torch.float32, mask="with-empty"), None, True),
    ("fp32 D 160 Nk 128 on a 99 KB cap", OpCase(40, 128, 160, 33, 8, torch.float32), CAP_99K, True),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    device = ap.parse_args(argv).device
    if _ext.extension() is None or not _ext.has_kernel(device):
        print(f"gpu_small_cases: attnmem._C has no {device} kernel ({_ext.load_error()})")
        return 2
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_small_cases: no CUDA device")
        return 2
    failed = 0
    for name, case, cap, stats in CASES:
        x = case.inputs(device)
        if cap is None:
            os.environ.pop("ATTNMEM_CUDA_SMEM_OPTIN_CAP", None)
        else:
            os.environ["ATTNMEM_CUDA_SMEM_OPTIN_CAP"] = str(cap)
        got = torch.ops.attnmem.cross_attention(*x.raw_args(stats, True))
        if device == "cuda":
            torch.cuda.synchronize()
        c = compare(got, x, row_entropy=True)
        failed += not c.ok
        print(f"{'ok  ' if c.ok else 'FAIL'} {name}: {c}")
    os.environ.pop("ATTNMEM_CUDA_SMEM_OPTIN_CAP", None)
    print(f"{len(CASES) - failed}/{len(CASES)} small cases match the reference")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
