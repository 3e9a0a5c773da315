"""Test helpers that ship with attnmem, for its own tests and benchmarks and for users' tests.

- :mod:`attnmem.testing.pipelines`: tiny SD1 / SD2 / SDXL pipelines with random weights that
  run on a CPU in seconds (:func:`tiny_sd1_pipeline`, :func:`tiny_sd2_pipeline`,
  :func:`tiny_sdxl_pipeline`, :func:`tiny_unet`, :func:`describe`).
- :mod:`attnmem.testing.op_cases`: the one table of op cases (shapes, dtypes, input layouts,
  masks) and the one tolerance rule against :mod:`attnmem.reference` (:func:`compare`,
  :func:`assert_matches_reference`).

Both import only torch at import time (diffusers and transformers load when a pipeline is
built), so the op helpers work on a machine with torch alone.
"""

from attnmem.testing.op_cases import (
    DTYPE_NAMES,
    DTYPES,
    LAYOUTS,
    MASKS,
    ODD_SHAPES,
    SD_LAYERS,
    SD_SHAPES,
    SHAPES,
    TILING_SHAPES,
    TOLERANCES,
    Comparison,
    OpCase,
    OpInputs,
    SDLayer,
    Tolerance,
    assert_matches_reference,
    case_grid,
    compare,
    dtype_id,
    make_masks,
    make_qkv,
    pytorch_attention,
    shape_id,
)
from attnmem.testing.pipelines import (
    IMAGE_SIZE,
    SD_SCHEDULE,
    Attn2Layer,
    describe,
    tiny_sd1_pipeline,
    tiny_sd2_pipeline,
    tiny_sdxl_pipeline,
    tiny_unet,
)

__all__ = [
    # pipelines
    "IMAGE_SIZE",
    "SD_SCHEDULE",
    "Attn2Layer",
    "describe",
    "tiny_sd1_pipeline",
    "tiny_sd2_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_unet",
    # op cases and the tolerance rule
    "SDLayer",
    "SD_LAYERS",
    "SD_SHAPES",
    "ODD_SHAPES",
    "SHAPES",
    "TILING_SHAPES",
    "DTYPES",
    "DTYPE_NAMES",
    "LAYOUTS",
    "MASKS",
    "Tolerance",
    "TOLERANCES",
    "OpCase",
    "OpInputs",
    "Comparison",
    "case_grid",
    "make_qkv",
    "make_masks",
    "pytorch_attention",
    "compare",
    "assert_matches_reference",
    "shape_id",
    "dtype_id",
]
