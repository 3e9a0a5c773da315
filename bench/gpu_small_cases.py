"""Small calls of the CUDA kernel that reach each of its launch plans, for compute-sanitizer.

bench/gpu_check.sh runs this under memcheck, racecheck, synccheck and initcheck. Every call
is checked against attnmem.reference, so a sanitizer run is also a correctness run. The plans
of 99 KB parts are reached on a larger GPU with the test-only knob ATTNMEM_CUDA_SMEM_OPTIN_CAP.

    python bench/gpu_small_cases.py                 (a CUDA device and the compiled CUDA kernel)
    python bench/gpu_small_cases.py --device cpu    (the same calls on the CPU kernel: a dry run)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from attnmem import _ext, reference

CASES = [  # (name, dtype, (B, Nq, H, D, Nk), layout, masks, smem cap or None, stats)
    (
        "fp16 one tile per CTA, masks",
        torch.float16,
        (4, 97, 3, 40, 77),
        "contiguous",
        True,
        None,
        True,
    ),
    ("bf16 Nk 128, D 80", torch.bfloat16, (1, 33, 2, 80, 128), "contiguous", True, None, True),
    (
        "fp16 8 tiles per CTA: Q prefetch",
        torch.float16,
        (33, 144, 8, 40, 77),
        "contiguous",
        True,
        None,
        True,
    ),
    (
        "bf16 D 160 Nk 128 on a 99 KB cap",
        torch.bfloat16,
        (33, 144, 8, 160, 128),
        "contiguous",
        False,
        101376,
        True,
    ),
    (
        "fp16 2 tiles per warp, no prefetch",
        torch.float16,
        (33, 144, 8, 128, 128),
        "contiguous",
        True,
        101376,
        True,
    ),
    ("fp16 element loads", torch.float16, (2, 45, 3, 40, 77), "misaligned", True, None, True),
    (
        "bf16 strided, no statistics",
        torch.bfloat16,
        (2, 45, 3, 64, 5),
        "strided",
        False,
        None,
        False,
    ),
    ("fp32 D 72 masks", torch.float32, (4, 50, 2, 72, 77), "contiguous", True, None, True),
    (
        "fp32 D 160 Nk 128 on a 99 KB cap",
        torch.float32,
        (33, 40, 8, 160, 128),
        "contiguous",
        False,
        101376,
        True,
    ),
]


def inputs(dtype, shape, layout, device):
    B, Nq, H, D, Nk = shape
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*s):
        return torch.randn(*s, device=device, generator=g).to(dtype)

    if layout == "misaligned":
        return tuple(rand(B * n * H * D + 1)[1:].view(B, n, H, D) for n in (Nq, Nk, Nk))
    if layout == "strided":
        return tuple(rand(B, n, H, 2 * D)[..., ::2] for n in (Nq, Nk, Nk))
    return rand(B, Nq, H, D), rand(B, Nk, H, D), rand(B, Nk, H, D)


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
    for name, dtype, shape, layout, masks, cap, stats in CASES:
        q, k, v = inputs(dtype, shape, layout, device)
        B, Nk = shape[0], shape[4]
        key_len = bos = None
        if masks:
            key_len = torch.tensor([[Nk, 0, 17, 1][b % 4] for b in range(B)], device=device)
            bos = torch.tensor([[1.25, 0.5, 2.0, 1.0][b % 4] for b in range(B)], device=device)
        if cap is None:
            os.environ.pop("ATTNMEM_CUDA_SMEM_OPTIN_CAP", None)
        else:
            os.environ["ATTNMEM_CUDA_SMEM_OPTIN_CAP"] = str(cap)
        got = torch.ops.attnmem.cross_attention(q, k, v, key_len, bos, None, stats, True)
        if device == "cuda":
            torch.cuda.synchronize()
        want = reference.cross_attention(
            q, k, v, key_len=key_len, bos_scale=bos, stats=stats, row_entropy=True
        )
        # out, prob_sum / Nq, ent_sum / Nq, row_ent
        tols = (1e-4,) * 4 if dtype == torch.float32 else (3e-2, 2e-3, 2e-3, 2e-2)
        errs = {}
        for i, (label, g_, w_) in enumerate(
            zip(("out", "prob_sum", "ent_sum", "row_ent"), got, want)
        ):
            if g_.numel():
                div = shape[1] if label in ("prob_sum", "ent_sum") else 1
                errs[label] = ((g_.float() - w_.float()).abs().max() / div).item(), tols[i]
        ok = all(e <= t for e, t in errs.values())
        failed += not ok
        shown = ", ".join(f"{label} {e:.2g}" for label, (e, _) in errs.items())
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max error {shown}")
    os.environ.pop("ATTNMEM_CUDA_SMEM_OPTIN_CAP", None)
    print(f"{len(CASES) - failed}/{len(CASES)} small cases match the reference")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
