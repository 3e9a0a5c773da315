"""Loading the compiled extension without ever breaking ``import attnmem``.

If ``attnmem._C`` is missing or cannot load (not built, built for another torch), attnmem
still works on the pure-PyTorch reference, and :func:`load_error` says why.
"""

from __future__ import annotations

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


def has_kernel(device_type: str) -> bool:
    """True when a compiled kernel for ``device_type`` ('cpu' or 'cuda') is registered."""
    if _C is None:
        return False
    info = _C.build_info()
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return bool(info.get("cuda", False))
    return False
