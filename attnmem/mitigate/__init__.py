"""Inference-time mitigation (docs/method.md §5): every mitigator, and how each is applied to a
pipeline call.

- :class:`Mitigation` (:mod:`attnmem.mitigate.attention`): Ren et al.'s beginning-token rescale
  (c1) and summary-token mask, inside attnmem's cross-attention op (``attnmem.patch(pipe,
  mitigate=...)``);
- :class:`GuidanceDelay` (:mod:`attnmem.mitigate.guidance`): Jain et al. (CVPR 2025), classifier-free
  guidance delayed to a static transition timestep or to the first local minimum of
  ``||eps_c - eps_u||``, per generation;
- :class:`PromptOptimization` (:mod:`attnmem.mitigate.prompt`): Wen et al. (ICLR 2024), the
  prompt embedding optimised at the first step until ``||eps_c - eps_u||`` falls below a target.

Each is switched on for the pipeline calls inside ``with attnmem.mitigate.apply(pipe, m):``
(one call, :func:`apply`, for all three), and can be named by a short spec string
(:func:`parse`, e.g. ``"cfg-delay:mode=dynamic"``, ``"attention:bos_scale=1.5"``), the names in
:data:`MITIGATORS`.
"""

from __future__ import annotations

import json
from typing import Any

from attnmem.mitigate.attention import Mitigation
from attnmem.mitigate.guidance import GuidanceDelay
from attnmem.mitigate.prompt import PromptOptimization

__all__ = ["Mitigation", "GuidanceDelay", "PromptOptimization", "MITIGATORS", "parse", "apply"]

MITIGATORS: dict[str, type] = {
    "attention": Mitigation,
    "cfg-delay": GuidanceDelay,
    "prompt-opt": PromptOptimization,
}


def parse(spec: str | dict[str, Any]) -> Mitigation | GuidanceDelay | PromptOptimization:
    """A mitigator from ``"NAME"`` or ``"NAME:key=value,key=value"`` (values read as JSON when
    they parse), or from a dict ``{"name": NAME, key: value, ...}``; NAME a key of
    :data:`MITIGATORS`. Raises ValueError naming what is wrong."""
    if isinstance(spec, dict):
        options = dict(spec)
        name = options.pop("name", None)
    else:
        name, _, rest = str(spec).partition(":")
        options = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, raw = item.partition("=")
            if not sep:
                raise ValueError(f"mitigation {spec!r}: expected key=value, got {item!r}")
            try:
                options[key.strip()] = json.loads(raw)
            except json.JSONDecodeError:
                options[key.strip()] = raw.strip()
    if name not in MITIGATORS:
        raise ValueError(f"unknown mitigation {name!r}; choose from {list(MITIGATORS)}")
    cls = MITIGATORS[name]
    if "steps" in options and isinstance(options["steps"], list):
        options["steps"] = tuple(options["steps"])
    try:
        return cls(**options)
    except TypeError as e:
        fields = sorted(cls.__dataclass_fields__)
        raise ValueError(f"mitigation {name!r}: {e}; it takes {fields}") from None


def apply(pipe: Any, mitigator: Mitigation | GuidanceDelay | PromptOptimization | str) -> Any:
    """Switch a mitigator on for the pipeline calls inside ``with apply(pipe, m) as handle:``.

    Returns a handle (``remove()``, or leave the ``with`` block): for :class:`Mitigation` the
    :class:`attnmem.patching.PatchHandle` of ``attnmem.patch(pipe, record=False, mitigate=m)``,
    for the others their own handle, which also reports what they did per call
    (``handle.calls``). A string or dict goes through :func:`parse` first."""
    if isinstance(mitigator, (str, dict)):
        mitigator = parse(mitigator)
    if isinstance(mitigator, Mitigation):
        from attnmem.patching import patch

        return patch(pipe, record=False, mitigate=mitigator)
    if isinstance(mitigator, (GuidanceDelay, PromptOptimization)):
        return mitigator.install(pipe)
    raise ValueError(f"not a mitigator: {type(mitigator).__name__}")
