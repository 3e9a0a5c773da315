"""``nemo``: the detection step of Hintersdorf et al., *Finding NeMo: Localizing Neurons
Responsible For Memorization in Diffusion Models*, NeurIPS 2024 (arXiv:2406.02366), as their
public code computes it (docs/method.md §4).

For a prompt with n = 10 starting latents x_1..x_n, at timestep t = index ``step`` = 1 of the
scheduler's grid at 50 steps (961 with SD's DDIM settings), conditional branch only (their
default guidance 0: no unconditional pass), on the unchanged starting latent:

    D_j  = eps(x_j, t, prompt) - x_j             predicted minus initial noise
    D~_j = (D_j - min_hw D_j) / (max_hw D_j - min_hw D_j)   per sample and channel
    score = max over pairs i < j of MS-SSIM(D~_i, D~_j)     higher = memorized

MS-SSIM (:func:`ms_ssim`) with the settings of their code (torchmetrics 1.3.2,
``kernel_size=11, betas=(0.33, 0.33, 0.33)``, the rest default): Gaussian window sigma 1.5
(11 x 11), reflect padding, k1 = 0.01, k2 = 0.03, 2 x 2 average pooling between scales, per
scale the SSIM and contrast-structure maps cropped by 5 pixels per border and averaged over
channels and pixels, ReLU, then ``cs_0^b0 * cs_1^b1 * ssim_2^b2``. The dynamic range R_s of each
scale comes from the whole batch of pairs as torchmetrics computes it without ``data_range``:
``max(range of all first members, range of all second members)`` at that scale, all 45 pairs of
a prompt in one batch (lexicographic), so R_s depends on all 10 samples of the prompt (never on
other prompts). Their decision threshold is 0.428 (calibrated with a different guidance setting;
not used here: the raw score is reported).

Cost per prompt: 1 conditional UNet call on n rows = n sample-passes (``forwards``), plus 45
small MS-SSIMs on the CPU side.

Deliberate deviations: the UNet in the pipeline's dtype and the statistics in float64
(official: fp16 autocast); attnmem's seeding rule
(official: the same 10 CPU latents ``torch.manual_seed(1); randn(10, 4, 64, 64)`` for every prompt,
reproducible with ``latents=``); the official code's wasted UNet call at index 0 is not run.
MS-SSIM needs latents of at least 44 x 44 for 3 scales (SD1.x: 64 x 64); on smaller latents
``scales=None`` uses the most scales that fit (recorded in the settings) and ``scales=3`` raises.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from attnmem.detect.base import (
    DetectionResult,
    Detector,
    GeneratorArg,
    detection_result,
    latent_shape,
)
from attnmem.detect.noise import check_pipeline, embeddings, predict_eps, timesteps

__all__ = ["NemoDetector", "ms_ssim", "max_scales", "minmax_normalize"]

KERNEL = 11
SIGMA = 1.5
BETA = 0.33


def max_scales(h: int, w: int, limit: int = 3) -> int:
    """The most MS-SSIM scales (<= limit) torchmetrics accepts for an h x w image (0: none)."""
    for s in range(limit, 0, -1):
        div = max(1, s - 1) ** 2
        if min(h, w) >= 2**s and h // div > KERNEL - 1 and w // div > KERNEL - 1:
            return s
    return 0


def _window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    d = torch.arange((1 - KERNEL) / 2, (1 + KERNEL) / 2, 1.0, dtype=dtype, device=device)
    g = torch.exp(-((d / SIGMA) ** 2) / 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ms_ssim(preds: torch.Tensor, target: torch.Tensor, scales: int = 3) -> torch.Tensor:
    """(B,) multi-scale SSIM of (B, C, H, W) pairs with betas ``(0.33,) * scales`` and the
    dynamic range of each scale taken from the whole batch (module docstring)."""
    if preds.shape != target.shape or preds.ndim != 4:
        raise ValueError(
            f"ms_ssim: need two (B, C, H, W) tensors of one shape, got {preds.shape} and {target.shape}"
        )
    h, w = preds.shape[-2:]
    if not 1 <= scales <= max_scales(h, w, limit=scales):
        raise ValueError(
            f"ms_ssim: {scales} scales need images of at least {(KERNEL - 1) * max(1, scales - 1) ** 2 + 1} "
            f"pixels a side (kernel {KERNEL}); got {h} x {w}"
        )
    C = preds.shape[1]
    kernel = _window(preds.dtype, preds.device).expand(C, 1, KERNEL, KERNEL)
    pad = (KERNEL - 1) // 2
    values = []
    for s in range(scales):
        R = torch.maximum(preds.max() - preds.min(), target.max() - target.min())
        c1, c2 = (0.01 * R) ** 2, (0.03 * R) ** 2
        p = F.pad(preds, (pad,) * 4, mode="reflect")
        q = F.pad(target, (pad,) * 4, mode="reflect")
        stats = F.conv2d(torch.cat([p, q, p * p, q * q, p * q]), kernel, groups=C)
        mu_p, mu_q, pp, qq, pq = stats.split(preds.shape[0])
        var_p = (pp - mu_p**2).clamp_min(0)
        var_q = (qq - mu_q**2).clamp_min(0)
        cov = pq - mu_p * mu_q
        cs = (2 * cov + c2) / (var_p + var_q + c2)
        ssim = (2 * mu_p * mu_q + c1) / (mu_p**2 + mu_q**2 + c1) * cs
        crop = (..., slice(pad, -pad), slice(pad, -pad))
        last = s == scales - 1
        values.append(torch.relu((ssim if last else cs)[crop].flatten(1).mean(dim=1)))
        preds, target = F.avg_pool2d(preds, 2), F.avg_pool2d(target, 2)
    return torch.stack(values).pow(BETA).prod(dim=0)


def minmax_normalize(d: torch.Tensor) -> torch.Tensor:
    """Each (sample, channel) map of a (B, C, h, w) tensor scaled to [0, 1] (no epsilon)."""
    lo = d.amin(dim=(-2, -1), keepdim=True)
    hi = d.amax(dim=(-2, -1), keepdim=True)
    return (d - lo) / (hi - lo)


@dataclass
class NemoDetector(Detector):
    """Hintersdorf et al. (NeurIPS 2024): the largest pairwise MS-SSIM of the first-step noise
    differences of n = 10 starting latents (module docstring)."""

    name: ClassVar[str] = "nemo"
    summary: ClassVar[str] = "Hintersdorf et al. (NeMo): max pairwise MS-SSIM of noise differences"

    n: int = 10
    step: int = 1
    scales: int | None = None

    def used_scales(self) -> int:
        """The MS-SSIM scales for this pipeline's latent size (see the module docstring)."""
        _, h, w = latent_shape(self.pipe, self.height, self.width)
        fit = max_scales(h, w)
        if self.scales is None:
            if fit == 0:
                raise ValueError(
                    f"nemo: latents of {h} x {w} are too small for MS-SSIM with an {KERNEL}-pixel "
                    "window (at least 11 x 11); pass a larger height/width"
                )
            if fit < 3:
                warnings.warn(
                    f"nemo: {h} x {w} latents fit only {fit} MS-SSIM scale(s) of the official 3",
                    stacklevel=3,
                )
            return fit
        return int(self.scales)

    def settings(self) -> dict[str, Any]:
        (t,) = timesteps(self.pipe, self.num_inference_steps, [self.step])
        return {**super().settings(), "n": self.n, "t": t, "scales": self.used_scales()}

    def unet_calls(self) -> int:
        return 1

    def differences(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalised noise differences D~, (prompts x n, C, h, w), prompt-major, float64
        (the MS-SSIM of nearly flat maps amplifies rounding; it is cheap next to the UNet)."""
        check_pipeline(self.pipe, self.name)
        x, _ = self.starting_noise(prompts, seeds, generator, latents)
        (t,) = timesteps(self.pipe, self.num_inference_steps, [self.step])
        cond, _ = embeddings(self.pipe, prompts, self.n)
        with torch.no_grad():
            eps = predict_eps(self.pipe, x, t, cond)
        return minmax_normalize(eps.double() - x.double()).cpu()

    def score_batch(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        *,
        generator: GeneratorArg = None,
        latents: torch.Tensor | None = None,
    ) -> list[DetectionResult]:
        if self.n < 2:
            raise ValueError("nemo: needs n >= 2 starting latents per prompt")
        scales = self.used_scales()
        d = self.differences(prompts, seeds, generator=generator, latents=latents)
        pairs = list(itertools.combinations(range(self.n), 2))
        first = torch.tensor([i for i, _ in pairs])
        second = torch.tensor([j for _, j in pairs])
        out = []
        for group in d.view(len(prompts), self.n, *d.shape[1:]):
            sim = ms_ssim(group[first], group[second], scales)
            out.append(detection_result(float(sim.max()), self.n))
        return out
