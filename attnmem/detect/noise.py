"""Noise predictions for the detectors that call the UNet directly at one or two timesteps
(``anisotropy``, ``sharpness``, ``nemo``; docs/method.md §4): prompt embeddings, the timestep
grid, and the noise prediction eps whatever the model predicts.

- **Embeddings:** the pipeline's own ``encode_prompt``, the unconditional one from the empty
  prompt ``""`` (what every official code uses), prompt-major with n rows per prompt.
- **Timesteps by index** into the pipeline scheduler's grid at ``num_inference_steps`` (a copy:
  the pipeline's scheduler is left alone). With SD's DDIM or PNDM settings at 50 steps, index 0,
  1 and -3 are t = 981, 961 and 41, the values of the official codes; other schedulers give
  other integers, which every result records in its settings.
- **Input:** the drawn standard-normal latent itself at the variance-preserving scale the UNet
  was trained on (what DDIM, PNDM and DPM-Solver feed; Euler-type schedulers scale it by
  ``init_noise_sigma / sqrt(sigma^2 + 1)``, within 0.3 % of 1 at t = T).
- **eps:** epsilon-prediction output as is; v-prediction converted with
  ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x`` (differentiable in x); sample prediction with
  ``eps = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t)``.

Only UNets without added conditioning (SD1.x, SD2.x) are supported here; an SDXL pipeline
raises a ValueError naming the detector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["check_pipeline", "timesteps", "alpha_bar", "embeddings", "predict_eps"]


def check_pipeline(pipe: Any, detector: str) -> None:
    """Refuse pipelines whose UNet needs more than text embeddings (SDXL's added conditioning)."""
    if getattr(pipe.unet.config, "addition_embed_type", None) is not None:
        raise ValueError(
            f"{detector}: calls the UNet directly and supports SD1.x / SD2.x pipelines only; this "
            f"UNet needs added conditioning ({pipe.unet.config.addition_embed_type!r}, as SDXL's)"
        )


def _scheduler(pipe: Any, num_inference_steps: int) -> Any:
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(num_inference_steps)
    return sched


def timesteps(pipe: Any, num_inference_steps: int, indices: Sequence[int]) -> list[int]:
    """The integer timesteps at these indices of the scheduler's grid (negative: from the end)."""
    grid = _scheduler(pipe, num_inference_steps).timesteps
    out = []
    for i in indices:
        if not -len(grid) <= i < len(grid):
            raise ValueError(
                f"step index {i} is outside the {len(grid)}-step grid of {type(pipe.scheduler).__name__}"
            )
        out.append(int(grid[i]))
    return out


def alpha_bar(pipe: Any, t: int) -> float:
    """abar_t of the training schedule (the scheduler's ``alphas_cumprod``)."""
    return float(pipe.scheduler.alphas_cumprod[int(t)])


def embeddings(pipe: Any, prompts: Sequence[str], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) text embeddings, each (prompts x n, 77, D), prompt-major;
    the unconditional one encodes the empty prompt."""
    device = getattr(pipe, "_execution_device", None) or pipe.unet.device
    cond, uncond = pipe.encode_prompt(
        list(prompts),
        device,
        num_images_per_prompt=n,
        do_classifier_free_guidance=True,
        negative_prompt=[""] * len(prompts),
    )
    return cond, uncond


def predict_eps(pipe: Any, x: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
    """The UNet's noise prediction eps(x, t, emb), in the UNet's dtype (see the module docstring
    for other prediction types). Differentiable in ``x`` (no grad mode is set here)."""
    x = x.to(pipe.unet.dtype)
    out = pipe.unet(x, t, encoder_hidden_states=emb.to(pipe.unet.dtype)).sample
    kind = pipe.scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return out
    a = alpha_bar(pipe, t)
    if kind == "v_prediction":
        return a**0.5 * out + (1 - a) ** 0.5 * x
    if kind == "sample":
        return (x - a**0.5 * out) / (1 - a) ** 0.5
    raise ValueError(f"unknown prediction_type {kind!r} of {type(pipe.scheduler).__name__}")
