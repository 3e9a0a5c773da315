"""Test helpers that ship with attnmem, for its own tests and benchmarks and for users' tests.

- :mod:`attnmem.testing.pipelines`: tiny SD1 / SD2 / SDXL pipelines with random weights that
  run on a CPU in seconds (:func:`tiny_sd1_pipeline`, :func:`tiny_sd2_pipeline`,
  :func:`tiny_sdxl_pipeline`, :func:`tiny_unet`, :func:`describe`).

It imports only torch at import time (diffusers and transformers load when a pipeline is built).
"""

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
    "IMAGE_SIZE",
    "SD_SCHEDULE",
    "Attn2Layer",
    "describe",
    "tiny_sd1_pipeline",
    "tiny_sd2_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_unet",
]
