"""``python -m attnmem.info``: which kernels are compiled, and why a fast path would be refused."""

from __future__ import annotations

import platform
import sys

import torch

from attnmem import __version__, _ext, ops


def report() -> str:
    lines = [
        f"attnmem {__version__}  torch {torch.__version__}  python {platform.python_version()}"
    ]
    ext = _ext.extension()
    if ext is None:
        lines.append(f"compiled extension: not loaded ({_ext.load_error()})")
        lines.append("every call runs the pure-PyTorch reference (attnmem/reference.py)")
    else:
        info = _ext.build_info()
        lines.append(f"compiled extension: {ext.__file__}")
        lines.append(f"  built against torch {info.get('torch_version')}")
        simd = "AVX2 and AVX-512 paths" if info.get("cpu_simd_compiled") else "portable path only"
        lines.append(
            f"  CPU kernel: yes ({simd}; this machine uses: {info.get('cpu_simd_runtime')})"
        )
        if info.get("cuda"):
            lines.append(
                f"  CUDA kernel: yes (CUDA {info.get('cuda_version')}, "
                f"TORCH_CUDA_ARCH_LIST {info.get('cuda_arch_list')!r} -> "
                f"{', '.join(_ext.cuda_targets())}; fp16/bf16 head dims "
                f"{list(info.get('cuda_head_dims', []))}, fp32 head dims up to "
                f"{info.get('cuda_f32_max_head_dim')})"
            )
        else:
            why = _ext.cuda_not_built()
            lines.append(
                f"  CUDA kernel: no ({'not built: ' + why if why else 'built without CUDA'})"
            )
    lines.append(f"torch.cuda.is_available(): {torch.cuda.is_available()}")
    probes = [("cpu", torch.float32, 40), ("cpu", torch.float16, 40)]
    if torch.cuda.is_available():
        probes += [
            ("cuda", torch.float16, 40),
            ("cuda", torch.float16, 72),
            ("cuda", torch.float32, 72),
            ("cuda", torch.float64, 64),
        ]
    lines.append("fast path for sample inputs (B=1, Nq=4, H=1, Nk=77):")
    for dev, dt, d in probes:
        q = torch.empty(1, 4, 1, d, device=dev, dtype=dt)
        reasons = ops.fast_path_reasons(q)
        verdict = "kernel" if not reasons else "reference: " + "; ".join(reasons)
        lines.append(f"  {dev:4s} {str(dt).replace('torch.', ''):8s} D={d:<3d} -> {verdict}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
