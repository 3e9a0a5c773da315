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

from attnmem.testing import op_cases, pipelines
from attnmem.testing.op_cases import *  # noqa: F403
from attnmem.testing.pipelines import *  # noqa: F403

__all__ = [*pipelines.__all__, *op_cases.__all__]
