"""Memorization detection: attnmem's metrics, the baselines, and the registry that names them.

- :mod:`attnmem.detect.base`: the :class:`Detector` base, the result schema
  (:class:`DetectionResult`), per-generation seeds, the per-token view (:func:`token_view`);
- :mod:`attnmem.detect.entropy`: the paper's metrics E (first step) and D (last steps);
- :mod:`attnmem.detect.baselines`: Wen et al.'s noise-difference norm, Carlini-style similarity;
- :mod:`attnmem.detect.anisotropy`, :mod:`attnmem.detect.sharpness`, :mod:`attnmem.detect.nemo`:
  Asthana & Belagiannis (ICLR 2026), Jeon et al. (ICML 2025), Hintersdorf et al. (NeurIPS 2024),
  which call the UNet directly (:mod:`attnmem.detect.noise`);
- :mod:`attnmem.detect.calibration`: a per-model choice of metric E's layer (:func:`calibrate`);
- :mod:`attnmem.detect.registry`: :data:`METRICS` (name -> class) and :func:`make_detector`.

Example::

    det = attnmem.detect.make_detector("E", pipe, num_inference_steps=50)
    results = det.score_batch(["a photo of a cat"], seeds=[0])   # [{"score": ..., ...}]
"""

from attnmem.detect.anisotropy import AnisotropyDetector, pixel_cosine
from attnmem.detect.base import (
    RESULT_FIELDS,
    DetectionResult,
    Detector,
    generation_seed,
    generators,
    initial_latents,
    token_view,
    top_triggers,
)
from attnmem.detect.baselines import CarliniDetector, WenDetector, tiled_l2
from attnmem.detect.calibration import CALIBRATION_FILE, Calibration, calibrate, choose_layer
from attnmem.detect.entropy import DEFAULT_E_LAYER, EntropyD, EntropyE, d_score
from attnmem.detect.nemo import NemoDetector, ms_ssim
from attnmem.detect.registry import METRICS, make_detector
from attnmem.detect.sharpness import SharpnessDetector

__all__ = [
    "Detector",
    "DetectionResult",
    "RESULT_FIELDS",
    "generation_seed",
    "generators",
    "initial_latents",
    "token_view",
    "top_triggers",
    "DEFAULT_E_LAYER",
    "EntropyE",
    "EntropyD",
    "d_score",
    "WenDetector",
    "CarliniDetector",
    "tiled_l2",
    "AnisotropyDetector",
    "pixel_cosine",
    "SharpnessDetector",
    "NemoDetector",
    "ms_ssim",
    "CALIBRATION_FILE",
    "Calibration",
    "calibrate",
    "choose_layer",
    "METRICS",
    "make_detector",
]
