"""Loading the compiled extension without ever breaking ``import attnmem``.

If ``attnmem._C`` is missing or cannot load (not built, built for another torch), attnmem
still works on the pure-PyTorch reference, and :func:`load_error` says why.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

_C: ModuleType | None
_error: str | None

try:
    from attnmem import _C as _C  # type: ignore[attr-defined]

    _error = None
except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError
    _C = None
    _error = f"{type(exc).__name__}: {exc}"


def extension() -> ModuleType | None:
    """The compiled module, or None."""
    return _C


def load_error() -> str | None:
    """Why the compiled module is absent (None when it loaded)."""
    return _error


def build_info() -> dict[str, Any]:
    """What the compiled module was built with (empty when it is absent)."""
    if _C is None:
        return {}
    return dict(_C.build_info())


@functools.cache
def _cuda_build() -> dict[str, Any]:
    """build_info() of a module built with the CUDA kernel, else {}. Fixed at build time, so
    read once: the fast-path check runs on every attention call."""
    if _C is None:
        return {}
    info = dict(_C.build_info())
    return info if info.get("cuda", False) else {}


def cuda_head_dims() -> tuple[int, ...]:
    """Head dims of the compiled tensor-core (fp16/bf16) CUDA kernel (empty without one)."""
    return tuple(_cuda_build().get("cuda_head_dims", ()))


def cuda_f32_max_head_dim() -> int:
    """The fp32 CUDA kernel takes every head dim up to this one (0 without a CUDA kernel)."""
    return int(_cuda_build().get("cuda_f32_max_head_dim", 0))


def cuda_targets() -> tuple[str, ...]:
    """What the CUDA kernel was compiled to: "sm_XY" machine code and "compute_XY" PTX targets,
    e.g. ("sm_80", "compute_90", "sm_90") (empty without a CUDA kernel)."""
    return tuple(t for t in str(_cuda_build().get("cuda_targets", "")).split(";") if t)


def cuda_not_built() -> str:
    """Why the compiled module has no CUDA kernel, as setup.py found it ("" when it has one or
    the module is absent)."""
    return str(build_info().get("cuda_not_built", "")) if _C is not None else ""


def has_kernel(device_type: str) -> bool:
    """True when a compiled kernel for ``device_type`` ('cpu' or 'cuda') is registered."""
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(cuda_head_dims())
    return False
