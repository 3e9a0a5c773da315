"""Detection baselines, in the same API as attnmem's metrics (docs/method.md §4, "Baselines").

- **Wen et al. (ICLR 2024):** d_t = ||eps(x_t, c) - eps(x_t, empty)||_2 over the whole latent,
  read off the two halves of the pipeline's CFG UNet call, averaged over steps
  [start, end) and n generations. Fast settings: step 0 only, n = 1 or 4.
- **Carlini-style:** n full generations per prompt, scored by how alike they are: for every
  pair, the largest per-tile L2 distance over a tiles x tiles grid (a pair of near-duplicates
  has every tile close); the score is minus the median over pairs, so higher = more alike =
  more likely memorized.

Both run the plain pipeline (no attnmem processors) with the same per-prompt seeds as E/D.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from attnmem.detect.base import DetectionResult, Detector, GeneratorArg, detection_result

__all__ = ["WenDetector", "CarliniDetector", "tiled_l2"]


class _Stop(Exception):
    pass


@dataclass
class WenDetector(Detector):
    """Wen et al.'s noise-difference norm over steps [start, end) and n generations."""

    name: ClassVar[str] = "wen"
    summary: ClassVar[str] = "Wen et al.'s noise-difference norm"

    start: int = 0
    end: int = 1
    n: int = 1

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "start": self.start, "end": self.end, "n": self.n}

    def unet_calls(self) -> int:
        return self.end

    def norms(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(n_steps, n_prompts * n) noise-difference norms, prompt-major."""
        if not 0 <= self.start < self.end <= self.num_inference_steps:
            raise ValueError(
                f"wen: need 0 <= start < end <= num_inference_steps, got [{self.start}, {self.end}) of {self.num_inference_steps}"
            )
        if self.guidance_scale <= 1:
            raise ValueError(
                "wen: the noise difference needs classifier-free guidance (guidance_scale > 1)"
            )
        x, gens = self.starting_noise(prompts, seeds, generator, latents)
        found: list[torch.Tensor] = []
        step = {"t": 0}

        def hook(module, args, output):
            eps = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
            t = step["t"]
            step["t"] += 1
            if self.start <= t < self.end:
                uncond, cond = eps.float().chunk(2)
                found.append((cond - uncond).flatten(1).norm(dim=1).cpu())
            if step["t"] >= self.end:
                raise _Stop

        h = self.pipe.unet.register_forward_hook(hook)
        try:
            self.pipe(
                prompts,
                num_images_per_prompt=self.n,
                latents=x,
                generator=gens,
                **self._pipe_kwargs(),
            )
        except _Stop:
            pass
        finally:
            h.remove()
        return torch.stack(found)

    def score_batch(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> list[DetectionResult]:
        d = self.norms(prompts, seeds, generator=generator, latents=latents)  # (steps, P * n)
        scores = d.mean(dim=0).view(len(prompts), self.n).mean(dim=1)
        return [detection_result(s, 2 * self.n * (self.end - self.start)) for s in scores]


def tiled_l2(a: np.ndarray, b: np.ndarray, tiles: int = 4) -> float:
    """Largest RMS difference over a tiles x tiles grid of two (H, W, C) images in [0, 1]."""
    H, W = a.shape[:2]
    hs, ws = max(1, H // tiles), max(1, W // tiles)
    worst = 0.0
    for i in range(tiles):
        for j in range(tiles):
            ta = a[i * hs : (i + 1) * hs, j * ws : (j + 1) * ws]
            tb = b[i * hs : (i + 1) * hs, j * ws : (j + 1) * ws]
            worst = max(worst, float(np.sqrt(np.mean((ta - tb) ** 2))))
    return worst


@dataclass
class CarliniDetector(Detector):
    """Carlini-style mutual similarity of n full generations per prompt."""

    name: ClassVar[str] = "carlini"
    summary: ClassVar[str] = "similarity of n full generations"

    n: int = 4
    tiles: int = 4

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "n": self.n, "tiles": self.tiles}

    def images(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> np.ndarray:
        """(n_prompts, n, H, W, C) generated images in [0, 1]."""
        x, gens = self.starting_noise(prompts, seeds, generator, latents)
        kw = self._pipe_kwargs()
        kw["output_type"] = "np"
        imgs = self.pipe(
            list(prompts), num_images_per_prompt=self.n, latents=x, generator=gens, **kw
        ).images
        return np.asarray(imgs).reshape(len(prompts), self.n, *np.asarray(imgs).shape[1:])

    def score_batch(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> list[DetectionResult]:
        if self.n < 2:
            raise ValueError("carlini: needs n >= 2 generations per prompt")
        imgs = self.images(prompts, seeds, generator=generator, latents=latents)
        out = []
        for group in imgs:
            d = [
                tiled_l2(group[i], group[j], self.tiles)
                for i, j in itertools.combinations(range(self.n), 2)
            ]
            out.append(
                detection_result(-float(np.median(d)), 2 * self.n * self.num_inference_steps)
            )
        return out
