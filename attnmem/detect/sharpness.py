"""``sharpness``: Jeon, Kim & No, *Understanding and Mitigating Memorization in Generative Models
via Sharpness of Probability Landscapes*, ICML 2025 (arXiv:2412.04140), as their public code
computes it (docs/method.md §4).

At the first timestep t (index ``step`` = 0 of the scheduler's grid at 50 steps: 981 with SD's
DDIM settings), sigma = sqrt(1 - abar_t), for generation j with starting noise x:

    s_u(x) = -eps(x, t, empty) / sigma,   s_c(x) = -eps(x, t, prompt) / sigma   (the scores)
    ds     = s_c(x) - s_u(x)                     a constant vector (no gradient through it)
    (H_u ds, H_c ds) = J(x) ds                   ONE forward-mode JVP (torch.func.jvp) of
                                                 x -> [s_u(x); s_c(x)], both branches on x
    M_j    = || H_c ds - H_u ds ||_2             over the whole latent
    score  = mean_j M_j                          higher = memorized

Equivalently M_j = sigma^-2 ||(d eps_c/dx - d eps_u/dx)(eps_c - eps_u)||. It is a JVP (J v),
not a VJP (v^T J): the learned score is not an exact gradient field, so J is not symmetric.

Cost per prompt: 1 CFG UNet call (2n sample-passes, ``forwards``) and 1 JVP through the UNet on
the same 2n rows (``jvps``; about 2-3 forwards of time and twice the activation memory), no
backward. The JVP runs with PyTorch's math attention (the fused SDPA kernels have no forward-mode
rule), as the official code does. Math attention keeps every attention matrix and its tangent:
on SD1.x at 64x64 latents one JVP on 8 rows needs more than 22 GB, so the forward and the JVP run
``jvp_generations`` generations (2 rows each) at a time (default 1; ``None``: all at once). Each
generation's value depends only on its own rows, so the chunking changes memory and speed, not
the score.

Deliberate deviations: fp32 statistics (official: the model and the JVP run in bf16, because CUDA
autocast to float32 is refused); attnmem's seeding rule (official: the same global seed 42 for
every prompt; pass ``latents=`` to reproduce); the official code's extra CFG call after the metric
is not run. Only the first step is used (the official ``hvp_sampling_num`` = 1, as run; averaging
over later guided steps is not implemented). On v-prediction models everything is computed on eps
(the official SD2 branch scales the same quantity by another factor of 1/sigma^2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from attnmem.detect.base import DetectionResult, Detector, GeneratorArg, detection_result
from attnmem.detect.noise import alpha_bar, check_pipeline, embeddings, predict_eps, timesteps

__all__ = ["SharpnessDetector"]


@dataclass
class SharpnessDetector(Detector):
    """Jeon et al. (ICML 2025): first-step sharpness ||H_c ds - H_u ds|| by a forward-mode JVP
    (module docstring)."""

    name: ClassVar[str] = "sharpness"
    summary: ClassVar[str] = "Jeon et al.: first-step sharpness by a forward-mode JVP"

    n: int = 1
    step: int = 0
    jvp_generations: int | None = 1

    def __post_init__(self) -> None:
        k = self.jvp_generations
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"jvp_generations must be a positive int or None, got {k!r}")

    def settings(self) -> dict[str, Any]:
        (t,) = timesteps(self.pipe, self.num_inference_steps, [self.step])
        return {**super().settings(), "n": self.n, "t": t}

    def unet_calls(self) -> int:
        return 2  # one forward, one JVP

    def values(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """M per generation, (prompts x n,), prompt-major, fp32."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        check_pipeline(self.pipe, self.name)
        x, _ = self.starting_noise(prompts, seeds, generator, latents)
        x = x.to(self.pipe.unet.dtype)
        (t,) = timesteps(self.pipe, self.num_inference_steps, [self.step])
        sigma = (1.0 - alpha_bar(self.pipe, t)) ** 0.5
        cond, uncond = embeddings(self.pipe, prompts, self.n)
        k = self.jvp_generations or len(x)
        out = []
        for a in range(0, len(x), k):
            emb = torch.cat([uncond[a : a + k], cond[a : a + k]])

            def scores(z: torch.Tensor, emb: torch.Tensor = emb) -> torch.Tensor:
                return -predict_eps(self.pipe, torch.cat([z, z]), t, emb) / sigma

            with torch.no_grad():
                s_u, s_c = scores(x[a : a + k]).chunk(2)
                ds = (s_c - s_u).detach()
                with sdpa_kernel(SDPBackend.MATH):
                    _, jv = torch.func.jvp(scores, (x[a : a + k],), (ds,))
            h_u, h_c = jv.float().chunk(2)
            out.append((h_c - h_u).flatten(1).norm(dim=1).cpu())
        return torch.cat(out)

    def score_batch(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> list[DetectionResult]:
        m = self.values(prompts, seeds, generator=generator, latents=latents)
        scores = m.view(len(prompts), self.n).mean(dim=1)
        return [detection_result(s, 2 * self.n, jvps=2 * self.n) for s in scores]
