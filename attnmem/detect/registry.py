"""The detectors by name: :data:`METRICS` (name -> class) and :func:`make_detector`.

``attnmem scan --metric`` offers exactly these names, with each class's ``summary`` as help.
Add a detector by listing its class here.
"""

from __future__ import annotations

from typing import Any

from attnmem.detect.anisotropy import AnisotropyDetector
from attnmem.detect.base import Detector
from attnmem.detect.baselines import CarliniDetector, WenDetector
from attnmem.detect.entropy import EntropyD, EntropyE
from attnmem.detect.nemo import NemoDetector
from attnmem.detect.sharpness import SharpnessDetector

__all__ = ["METRICS", "make_detector"]

METRICS: dict[str, type[Detector]] = {
    cls.name: cls
    for cls in (
        EntropyE,
        EntropyD,
        WenDetector,
        CarliniDetector,
        AnisotropyDetector,
        SharpnessDetector,
        NemoDetector,
    )
}


def make_detector(name: str, pipe: Any, **options: Any) -> Detector:
    """A detector by name (a key of :data:`METRICS`: ``"E"``, ``"D"``, ``"wen"``, ``"carlini"``,
    ``"anisotropy"``, ``"sharpness"``, ``"nemo"``).

    Options are the class's dataclass fields (None values are ignored, so a caller can pass
    every option it has): num_inference_steps, guidance_scale, height, width; E: layer,
    early_exit, calibration (a :class:`~attnmem.detect.calibration.Calibration` or its file);
    D: last; wen: start, end, n; carlini: n, tiles; anisotropy: n, gamma_norm,
    gamma_cos, step_high, step_low; sharpness: n, step; nemo: n, step, scales. Raises
    ValueError naming the options the metric does not take.
    """
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; choose from {list(METRICS)}")
    cls = METRICS[name]
    fields = set(cls.__dataclass_fields__) - {"pipe"}
    unknown = sorted(k for k, v in options.items() if v is not None and k not in fields)
    if unknown:
        raise ValueError(f"metric {name!r} takes no option(s) {unknown}; it takes {sorted(fields)}")
    return cls(pipe, **{k: v for k, v in options.items() if v is not None})
