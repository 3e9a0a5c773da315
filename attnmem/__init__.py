"""attnmem: fused cross-attention statistics for detecting and mitigating memorization in
text-to-image diffusion models (Ren et al., ECCV 2024).

The op (:func:`cross_attention`) loads without the compiled extension; the diffusers
integration is imported on first use, so ``import attnmem`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from attnmem import reference
from attnmem.ops import cross_attention, fast_path_reasons, strict

__version__ = "0.1.0"

__all__ = ["cross_attention", "fast_path_reasons", "strict", "reference", "__version__"]

# Public names that live in modules importing diffusers/transformers: resolved lazily.
_LAZY: dict[str, str] = {
    "patch": "attnmem.patching",
    "PatchHandle": "attnmem.patching",
    "RecordSpec": "attnmem.record",
    "Mitigation": "attnmem.mitigate",
    "GuidanceDelay": "attnmem.mitigate",
    "PromptOptimization": "attnmem.mitigate",
    "AttentionRecord": "attnmem.record",
    "make_detector": "attnmem.detect",
    "METRICS": "attnmem.detect",
    "Calibration": "attnmem.detect",
    "calibrate": "attnmem.detect",
    "EntropyFilter": "attnmem.train",
    "WenFilter": "attnmem.train",
    "token_view": "attnmem.detect",
    "generation_seed": "attnmem.detect",
    "clip_tokenizer": "attnmem.tokenizer",
    "encode_prompts": "attnmem.tokenizer",
    "lengths_from_ids": "attnmem.tokenizer",
}


# Subpackages reachable as attributes without an import (``attnmem.mitigate.apply(...)``).
_SUBMODULES = ("detect", "mitigate")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"attnmem.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'attnmem' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
