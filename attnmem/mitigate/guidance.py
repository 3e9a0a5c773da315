"""Jain et al., *Classifier-Free Guidance inside the Attraction Basin May Cause Memorization*,
CVPR 2025 (arXiv:2411.16738): delay classifier-free guidance until the trajectory has left the
attraction basin (docs/method.md §5).

Per denoising step k at timestep t, with the two halves of the pipeline's own CFG call, each
generation (row) r is combined as ``eps = eps_u + g_r (eps_c - eps_u)``:

- **static** (``mode="static"``, STP): ``g_r = guidance_before`` while ``t > transition``,
  ``guidance_after`` once ``t <= transition`` (official defaults: transition 500,
  guidance_before 0 = unconditional only, guidance_after 7.5);
- **dynamic** (``mode="dynamic"``, DTP): ``d_k = ||eps_c - eps_u||_2`` per row over the whole
  latent; the row's transition happens at the first step k with ``d_k > d_{k-1}`` and
  ``d_{k-2} > d_{k-1}`` (strict; d_{-1} = d_{-2} = -1, so k >= 2), i.e. right after the first
  strict local minimum, and guidance ``guidance_after`` applies from step k itself on; before
  it ``guidance_before`` (official default 1 = conditional only). No minimum: no guidance to
  the end.

``guidance_after=None`` is the pipeline call's ``guidance_scale``. The mitigator rescales the
conditional half of the UNet output to ``eps_u + (g_r / g)(eps_c - eps_u)``, so the pipeline's
own combination with its scalar g yields the per-row g_r: **no extra UNet call**, any diffusers
SD pipeline, any scheduler. Each call's report (``handle.calls[i]``) holds the step of every
row's transition (None: none).

Ambiguities of the official code, and what is chosen: before the transition the paper says "no
guidance", which its STP ablation writes as zero CFG (eps_u) and its DTP script implements as
g = 1 (eps_c); both are ``guidance_before`` (defaults: static 0, dynamic 1, as the official
scripts). The official STP script re-discretises the schedule onto a 200-step grid when a step
lands exactly on the transition (a branch that cannot have fired in finished runs: it loops
forever when it does); here the rule is applied on the pipeline's own grid. The official scripts
run DPM-Solver++ with batch 1; here the state is per row of any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from attnmem.mitigate.hooks import CallHook, unet_sample, with_sample

__all__ = ["GuidanceDelay"]


@dataclass(frozen=True)
class GuidanceDelay:
    """Classifier-free guidance delayed to a transition point (module docstring).

    Args:
        mode: ``"static"`` (a fixed transition timestep) or ``"dynamic"`` (per generation, the
            first local minimum of ``||eps_c - eps_u||``).
        transition: static mode: the timestep value tau (guidance from ``t <= tau`` on).
        guidance_before: the guidance scale before the transition (None: 0 for static, 1 for
            dynamic, the official defaults).
        guidance_after: the guidance scale after it (None: the pipeline call's guidance_scale).
    """

    mode: Literal["static", "dynamic"] = "dynamic"
    transition: int = 500
    guidance_before: float | None = None
    guidance_after: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("static", "dynamic"):
            raise ValueError(
                f"GuidanceDelay: mode must be 'static' or 'dynamic', got {self.mode!r}"
            )

    @property
    def before(self) -> float:
        if self.guidance_before is not None:
            return float(self.guidance_before)
        return 0.0 if self.mode == "static" else 1.0

    def install(self, pipe: Any) -> CallHook:
        """Switch it on for the pipeline's calls; the handle restores the pipeline."""
        return CallHook(pipe, self)

    def post_forward(self, hook: CallHook, t: int, output: Any, state: dict) -> Any:
        eps = unet_sample(output)
        u, c = eps.chunk(2)
        g = float(hook.pipe.guidance_scale)
        after = g if self.guidance_after is None else float(self.guidance_after)
        rows = u.shape[0]
        report = hook.calls[-1]
        if self.mode == "static":
            on = torch.full((rows,), t <= self.transition, dtype=torch.bool)
            if "transition_step" not in report and t <= self.transition:
                report["transition_step"] = [state["step"]] * rows
        else:
            d = (c.float() - u.float()).flatten(1).norm(dim=1).cpu()
            if "d" not in state:
                state["d"] = [torch.full((rows,), -1.0), torch.full((rows,), -1.0)]
                state["on"] = torch.zeros(rows, dtype=torch.bool)
                report["transition_step"] = [None] * rows
            d2, d1 = state["d"]
            start = ~state["on"] & (d > d1) & (d2 > d1)
            for r in start.nonzero().flatten().tolist():
                report["transition_step"][r] = state["step"]
            state["on"] = state["on"] | start
            state["d"] = [d1, d]
            on = state["on"]
        g_row = torch.where(on, after, self.before).to(eps.device, eps.dtype)
        scale = (g_row / g).view(-1, *([1] * (eps.ndim - 1)))
        return with_sample(output, torch.cat([u, u + scale * (c - u)]))
