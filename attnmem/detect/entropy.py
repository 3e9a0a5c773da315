"""The paper's detection metrics, from cross-attention entropy (docs/method.md §4).

Higher = more likely memorized:

- **E (first step):** the entropy of the mean attention distribution at step index 0 (the
  noisiest timestep) of one layer, by default the 4th cross-attention in execution order
  (``down_blocks.1.attentions.1`` on SD1.x). Only the conditional rows are needed, and the
  UNet stops as soon as that layer has produced its statistics ("early exit"): the fast
  detector. ``early_exit=False`` computes the same number inside a normal CFG step.
- **D (last steps):** over all layers, mean E_t over the last 10 of 50 steps, plus the change
  of the partial entropy over positions >= L-1 (EOS and summary tokens) from step 0:
  ``mean_{t in last} P_t - P_0`` with ``P_t = -sum_{j >= L-1} a_j ln a_j`` (not renormalized).

E and D use one generation per prompt: generation 0 of its seed
(:func:`attnmem.detect.base.generation_seed`), or the given ``generator`` / ``latents``.
E's layer can come from a per-model calibration (:mod:`attnmem.detect.calibration`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from attnmem.detect.base import (
    DetectionResult,
    Detector,
    GeneratorArg,
    attention_results,
    finished_record,
    token_view,
)
from attnmem.detect.calibration import Calibration
from attnmem.patching import check_layer, patch, run_unet_until
from attnmem.record import AttentionRecord, RecordSpec

__all__ = ["DEFAULT_E_LAYER", "EntropyE", "EntropyD", "d_score"]

DEFAULT_E_LAYER = 3  # 4th cross-attention in execution order


@dataclass
class EntropyE(Detector):
    """Metric E: first-step attention entropy of one layer (default: the 4th cross-attention).

    ``layer``: an index in execution order or a module name; ``calibration``: a
    :class:`~attnmem.detect.calibration.Calibration` or the path of its JSON file, whose chosen
    layer is then used (giving both is an error unless they name the same layer). With
    ``early_exit`` (default) the UNet runs on the conditional rows only and stops right after
    the chosen layer; otherwise E is read off a normal CFG step of the full pipeline. Both give
    the same score for the same seed."""

    name: ClassVar[str] = "E"
    summary: ClassVar[str] = "first-step attention entropy of one layer (fast)"

    layer: str | int | None = None
    early_exit: bool = True
    calibration: Calibration | str | Path | None = None

    def __post_init__(self) -> None:
        if self.calibration is not None:
            cal = self.calibration
            if not isinstance(cal, Calibration):
                cal = Calibration.load(cal)
            if self.layer is not None and self.layer not in (cal.layer, cal.layer_index):
                raise ValueError(
                    f"layer={self.layer!r} contradicts the calibration's layer {cal.layer!r}; "
                    "give one of them"
                )
            self.layer, self.calibration = cal.layer, cal
        elif self.layer is None:
            self.layer = DEFAULT_E_LAYER
        check_layer(self.pipe, self.layer)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "layer": self.layer, "early_exit": self.early_exit}

    def unet_calls(self) -> int:
        return 1  # step 0 only

    def record(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> AttentionRecord:
        """The attention record of step 0 at the chosen layer, one image per prompt."""
        prompts = list(prompts)
        x, gens = self.starting_noise(prompts, seeds, generator, latents)
        with patch(self.pipe, record=RecordSpec(steps=(0,), layers=(self.layer,))) as handle:
            if self.early_exit:
                # guidance 1 = no CFG batch: the UNet sees the conditional rows only.
                run_unet_until(
                    handle,
                    self.layer,
                    lambda: self.pipe(prompts, latents=x, generator=gens, **self._pipe_kwargs(1.0)),
                )
            else:
                run_unet_until(
                    handle,
                    None,
                    lambda: self.pipe(prompts, latents=x, generator=gens, **self._pipe_kwargs()),
                    step=0,
                )
            return finished_record(handle)

    def score_batch(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> list[DetectionResult]:
        rec = self.record(prompts, seeds, generator=generator, latents=latents)
        scores = rec.entropy(steps=0, layers=self.layer)
        views = [token_view(rec, i, steps=0, layers=self.layer) for i in range(len(prompts))]
        return attention_results(rec, scores, views, forwards=1 if self.early_exit else 2)


@dataclass
class EntropyD(Detector):
    """Metric D: mean entropy over the last ``last`` steps (all layers) plus the change of the
    partial entropy over positions >= L-1 from step 0. Runs the whole denoising loop."""

    name: ClassVar[str] = "D"
    summary: ClassVar[str] = "attention entropy over the last steps, all layers"

    last: int = 10

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "last": self.last}

    def record(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> AttentionRecord:
        x, gens = self.starting_noise(prompts, seeds, generator, latents)
        with patch(self.pipe, record=True) as handle:
            self.pipe(list(prompts), latents=x, generator=gens, **self._pipe_kwargs())
            return finished_record(handle)

    def score_batch(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> list[DetectionResult]:
        rec = self.record(prompts, seeds, generator=generator, latents=latents)
        score, last = d_score(rec, self.last)
        per_step = rec.entropy()  # (n_steps, n_images), all layers
        views = [token_view(rec, i, steps=last) for i in range(len(prompts))]
        steps_info = [
            {"steps": list(rec.steps), "entropy": [round(float(x), 6) for x in per_step[:, i]]}
            for i in range(len(prompts))
        ]
        return attention_results(
            rec, score, views, forwards=2 * self.num_inference_steps, entropy_steps=steps_info
        )


def d_score(rec: AttentionRecord, last: int = 10) -> tuple[torch.Tensor, list[int]]:
    """Metric D per image from a record of all steps and layers, and the steps it averaged."""
    if 0 not in rec.attn:
        raise ValueError("metric D needs step 0 recorded")
    steps = sorted(rec.steps)
    last_steps = steps[-min(last, len(steps)) :]
    e_last = rec.entropy(steps=last_steps).mean(dim=0)
    p_last = rec.partial_entropy(steps=last_steps).mean(dim=0)
    p_first = rec.partial_entropy(steps=[0])[0]
    return e_last + (p_last - p_first), last_steps
