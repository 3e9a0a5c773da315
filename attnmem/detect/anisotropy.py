"""``anisotropy``: Asthana & Belagiannis, *Detecting and Mitigating Memorization in Diffusion
Models through Anisotropy of the Log-Probability*, ICLR 2026 (arXiv:2601.20642), as their
public code computes it (docs/method.md §4).

For generation j with starting noise x_j (pure noise, no denoising loop, no gradients):

    N_j = || eps_c(x_j, t_hi) - eps_u(x_j, t_hi) ||_2            over the whole latent
    C_j = mean over pixels (h, w) of cos( eps_u(x_j, t_lo)[:, h, w], Delta(x_j, t_lo)[:, h, w] )
          with Delta = eps_c - eps_u; the cosine over the latent channels at each pixel
          (norms guarded by 1e-8 as torch's cosine_similarity)
    score = gamma_norm * mean_j N_j + gamma_cos * mean_j C_j      higher = memorized

t_hi and t_lo are indices ``step_high`` = 0 and ``step_low`` = -3 of the pipeline scheduler's
grid at ``num_inference_steps`` = 50 (981 and 41 with SD's DDIM settings), both on the *same*
pure-noise latent (the low-noise call is not on a denoised latent). The official SD1 weights
are gamma_norm = 1, gamma_cos = 2. N_j alone is Wen et al.'s first-step metric.

Cost per prompt: 2 CFG UNet calls = 4n sample-passes (``forwards``), no backward.

Deliberate deviations from the official code: statistics in fp32 (official: bf16 model and
latents); the noise per generation from attnmem's seeding rule (official: one global seed, the
same latents for every prompt; pass ``latents=`` to reproduce them); the official code also runs
two more CFG calls after the metric that do not enter it, not run here. On v-prediction models
(SD2) everything is computed on eps (the official code builds its own v-based "score", with other
weights: gamma 1 and 0.1); attnmem's default weights are the SD1 ones there too, so fit them
(``components`` of each result holds N and C) before comparing SD2 numbers. The paper fits the
weights by logistic regression on a small labelled set; that procedure is not part of the code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnmem.detect.base import DetectionResult, Detector, GeneratorArg, detection_result
from attnmem.detect.noise import check_pipeline, embeddings, predict_eps, timesteps

__all__ = ["AnisotropyDetector", "pixel_cosine"]


def pixel_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(B,) mean over pixels of the cosine over channels of two (B, C, h, w) tensors."""
    a, b = a.float(), b.float()
    dot = (a * b).sum(dim=1)
    norm = a.norm(dim=1).clamp_min(eps) * b.norm(dim=1).clamp_min(eps)
    return (dot / norm).flatten(1).mean(dim=1)


@dataclass
class AnisotropyDetector(Detector):
    """Asthana & Belagiannis (ICLR 2026): first-step guidance norm plus the low-noise alignment
    of the unconditional prediction with the guidance direction (module docstring)."""

    name: ClassVar[str] = "anisotropy"
    summary: ClassVar[str] = "Asthana & Belagiannis: guidance norm + low-noise alignment"

    n: int = 1
    gamma_norm: float = 1.0
    gamma_cos: float = 2.0
    step_high: int = 0
    step_low: int = -3

    def settings(self) -> dict[str, Any]:
        t_hi, t_lo = timesteps(self.pipe, self.num_inference_steps, [self.step_high, self.step_low])
        return {
            **super().settings(),
            "n": self.n,
            "gamma_norm": self.gamma_norm,
            "gamma_cos": self.gamma_cos,
            "t_high": t_hi,
            "t_low": t_lo,
        }

    def unet_calls(self) -> int:
        return 2

    def terms(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) per generation, each (prompts x n,), prompt-major, fp32."""
        check_pipeline(self.pipe, self.name)
        x, _ = self.starting_noise(prompts, seeds, generator, latents)
        t_hi, t_lo = timesteps(self.pipe, self.num_inference_steps, [self.step_high, self.step_low])
        cond, uncond = embeddings(self.pipe, prompts, self.n)
        emb = torch.cat([uncond, cond])
        x2 = torch.cat([x, x])
        with torch.no_grad():
            u, c = predict_eps(self.pipe, x2, t_hi, emb).float().chunk(2)
            norm = (c - u).flatten(1).norm(dim=1)
            u, c = predict_eps(self.pipe, x2, t_lo, emb).float().chunk(2)
            cos = pixel_cosine(u, c - u)
        return norm.cpu(), cos.cpu()

    def score_batch(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> list[DetectionResult]:
        norm, cos = self.terms(prompts, seeds, generator=generator, latents=latents)
        norm = norm.view(len(prompts), self.n).mean(dim=1)
        cos = cos.view(len(prompts), self.n).mean(dim=1)
        score = self.gamma_norm * norm + self.gamma_cos * cos
        return [
            detection_result(s, 4 * self.n, components={"norm": float(a), "cosine": float(b)})
            for s, a, b in zip(score, norm, cos)
        ]
