"""Memorization detection from cross-attention entropy (SPEC §4), and the per-token view.

Two metrics, higher = more likely memorized:

- **E (first step):** the entropy of the mean attention distribution at step index 0 (the
  noisiest timestep) of one layer, by default the 4th cross-attention in execution order
  (``down_blocks.1.attentions.1`` on SD1.x). Only the conditional rows are needed, and the
  UNet stops as soon as that layer has produced its statistics ("early exit"): the fast
  detector. ``early_exit=False`` computes the same number inside a normal CFG step.
- **D (last steps):** over all layers, mean E_t over the last 10 of 50 steps, plus the change
  of the partial entropy over positions >= L-1 (EOS and summary tokens) from step 0:
  ``mean_{t in last} P_t - P_0`` with ``P_t = -sum_{j >= L-1} a_j ln a_j`` (not renormalized).

Every detector takes per-prompt seeds; generation j of a prompt with seed s uses
:func:`generation_seed` ``(s, j)``, the same for all methods (E and D use j = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from attnmem.patching import PatchHandle, patch, run_unet_until
from attnmem.record import AttentionRecord, RecordSpec

__all__ = [
    "DEFAULT_E_LAYER",
    "Detector",
    "EntropyE",
    "EntropyD",
    "make_detector",
    "generation_seed",
    "token_view",
    "top_triggers",
    "METRICS",
]

DEFAULT_E_LAYER = 3  # 4th cross-attention in execution order


def generation_seed(seed: int, j: int) -> int:
    """Seed of generation ``j`` of a prompt whose seed is ``seed`` (shared by every method)."""
    return int(seed) * 1000 + int(j)


def generators(seeds: Sequence[int], n: int = 1) -> list[torch.Generator]:
    """CPU generators for n generations per prompt, prompt-major (diffusers' image order)."""
    return [torch.Generator().manual_seed(generation_seed(s, j)) for s in seeds for j in range(n)]


# ----------------------------------------------------------------------------------------------
# Per-token view
# ----------------------------------------------------------------------------------------------
def _kind(pos: int, L: int | None) -> str:
    if pos == 0:
        return "bos"
    if L is None:
        return "token"
    if pos < L - 1:
        return "prompt"
    if pos == L - 1:
        return "eos"
    return "summary"


def token_view(
    record: AttentionRecord, image: int = 0, steps=None, layers=None
) -> list[dict[str, Any]]:
    """Pixel/head/layer-averaged attention per position of one image, with its token string.

    Returns 77 dicts ``{"pos", "token", "kind", "attention"}``; kind is ``bos``, ``prompt``,
    ``eos`` or ``summary`` (padding positions >= L, which summarise the whole prompt).
    """
    a = record.mean_attention(steps, layers)[image].float().cpu().tolist()
    p = record.prompt_of_image(image)
    L = int(record.lengths[p]) if record.lengths is not None else None
    tokens = record.tokens[p] if record.tokens is not None else [str(i) for i in range(len(a))]
    return [
        {"pos": j, "token": tokens[j], "kind": _kind(j, L), "attention": v} for j, v in enumerate(a)
    ]


def top_triggers(view: list[dict[str, Any]], k: int = 5) -> list[list[Any]]:
    """The k prompt tokens drawing the most attention: ``[[pos, token, value], ...]``."""
    prompt = [t for t in view if t["kind"] in ("prompt", "token") and t["pos"] > 0]
    prompt.sort(key=lambda t: -t["attention"])
    return [[t["pos"], t["token"], round(float(t["attention"]), 6)] for t in prompt[:k]]


# ----------------------------------------------------------------------------------------------
# Detectors
# ----------------------------------------------------------------------------------------------
@dataclass
class Detector:
    """A scorer of prompts. ``score_batch(prompts, seeds)`` returns one dict per prompt with
    ``score`` (higher = more likely memorized), ``L``, ``truncated``, ``tokens``, ``attention``,
    ``triggers``, ``entropy_steps`` and ``forwards`` (UNet passes per prompt)."""

    pipe: Any
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    name: str = ""

    def settings(self) -> dict[str, Any]:
        return {
            "metric": self.name,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
        }

    def score_batch(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _pipe_kwargs(self, guidance_scale: float | None = None) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale if guidance_scale is None else guidance_scale,
            "output_type": "latent",
        }
        if self.height is not None:
            kw["height"] = self.height
        if self.width is not None:
            kw["width"] = self.width
        return kw

    @staticmethod
    def _check(prompts: Sequence[str], seeds: Sequence[int]) -> None:
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            raise ValueError("no prompts to score")

    @staticmethod
    def _records(
        rec: AttentionRecord,
        scores: torch.Tensor,
        views: list[list[dict]],
        forwards: int,
        entropy_steps=None,
    ) -> list[dict[str, Any]]:
        out = []
        for i, view in enumerate(views):
            out.append(
                {
                    "score": float(scores[i]),
                    "L": int(rec.lengths[i]) if rec.lengths is not None else None,
                    "truncated": bool(rec.truncated[i]) if rec.truncated is not None else None,
                    "tokens": [t["token"] for t in view],
                    "attention": [round(float(t["attention"]), 7) for t in view],
                    "triggers": top_triggers(view),
                    "entropy_steps": entropy_steps[i] if entropy_steps is not None else None,
                    "forwards": forwards,
                }
            )
        return out


@dataclass
class EntropyE(Detector):
    """Metric E: first-step attention entropy of one layer (default: the 4th cross-attention).

    With ``early_exit`` (default) the UNet runs on the conditional rows only and stops right
    after the chosen layer; otherwise E is read off a normal CFG step of the full pipeline.
    Both give the same score for the same seed."""

    layer: str | int = DEFAULT_E_LAYER
    early_exit: bool = True
    name: str = "E"

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "layer": self.layer, "early_exit": self.early_exit}

    def record(self, prompts: Sequence[str], seeds: Sequence[int]) -> AttentionRecord:
        """The attention record of step 0 at the chosen layer, one image per prompt."""
        self._check(prompts, seeds)
        prompts = list(prompts)
        gens = generators(seeds)
        with patch(self.pipe, record=RecordSpec(steps=(0,), layers=(self.layer,))) as handle:
            if self.early_exit:
                # guidance 1 = no CFG batch: the UNet sees the conditional rows only.
                run_unet_until(
                    handle,
                    self.layer,
                    lambda: self.pipe(prompts, generator=gens, **self._pipe_kwargs(1.0)),
                )
            else:
                run_unet_until(
                    handle,
                    None,
                    lambda: self.pipe(prompts, generator=gens, **self._pipe_kwargs()),
                    step=0,
                )
            return _finished(handle)

    def score_batch(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[dict[str, Any]]:
        rec = self.record(prompts, seeds)
        scores = rec.entropy(steps=0, layers=self.layer)[0]
        views = [token_view(rec, i, steps=0, layers=self.layer) for i in range(len(prompts))]
        return self._records(rec, scores, views, forwards=1 if self.early_exit else 2)


@dataclass
class EntropyD(Detector):
    """Metric D: mean entropy over the last ``last`` steps (all layers) plus the change of the
    partial entropy over positions >= L-1 from step 0. Runs the whole denoising loop."""

    last: int = 10
    name: str = "D"

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "last": self.last}

    def record(self, prompts: Sequence[str], seeds: Sequence[int]) -> AttentionRecord:
        self._check(prompts, seeds)
        with patch(self.pipe, record=True) as handle:
            self.pipe(list(prompts), generator=generators(seeds), **self._pipe_kwargs())
            return _finished(handle)

    def score_batch(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[dict[str, Any]]:
        rec = self.record(prompts, seeds)
        score, last = d_score(rec, self.last)
        per_step = rec.entropy()  # (n_steps, n_images), all layers
        views = [token_view(rec, i, steps=last) for i in range(len(prompts))]
        steps_info = [
            {"steps": list(rec.steps), "entropy": [round(float(x), 6) for x in per_step[:, i]]}
            for i in range(len(prompts))
        ]
        return self._records(
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


def _finished(handle: PatchHandle) -> AttentionRecord:
    rec = handle.record
    if not rec.steps:
        raise RuntimeError(
            "attnmem: the pipeline ran but no cross-attention statistics were recorded"
        )
    return rec.to("cpu")


METRICS = ("E", "D", "wen", "carlini")


def make_detector(name: str, pipe: Any, **options: Any) -> Detector:
    """A detector by name: ``"E"``, ``"D"``, ``"wen"`` or ``"carlini"``.

    Options (None values are ignored): num_inference_steps, guidance_scale, height, width;
    E: layer, early_exit; D: last; wen: start, end, n; carlini: n, tiles."""
    from attnmem.baselines import CarliniDetector, WenDetector

    registry: dict[str, type[Detector]] = {
        "E": EntropyE,
        "D": EntropyD,
        "wen": WenDetector,
        "carlini": CarliniDetector,
    }
    if name not in registry:
        raise ValueError(f"unknown metric {name!r}; choose from {list(METRICS)}")
    cls = registry[name]
    fields = set(cls.__dataclass_fields__) - {"pipe", "name"}
    unknown = sorted(k for k, v in options.items() if v is not None and k not in fields)
    if unknown:
        raise ValueError(f"metric {name!r} takes no option(s) {unknown}; it takes {sorted(fields)}")
    return cls(pipe, **{k: v for k, v in options.items() if v is not None})
