"""Wen et al., *Detecting, Explaining, and Mitigating Memorization in Diffusion Models*, ICLR 2024:
the inference-time mitigation, as their public code runs it (docs/method.md §5).

At the first UNet call of a pipeline call (step index ``step`` = 0, t = 981 with SD's DDIM
settings), on that call's own latents X_p (the n generations of prompt p, shared with the
generation), each prompt's conditional embedding e_p (77 x D; initialised to the prompt's
encoding) is optimised:

    L_p(e) = || eps(X_p, t, e) - eps(X_p, t, e_empty) ||_F     ONE Frobenius norm over the n
                                                               generations, not a mean of norms
    AdamW(lr 0.05, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01) on every position but 0
    (BOS: its gradient is zeroed; the decoupled decay still shrinks it, as in their code);
    iteration j = 0..iterations-1: compute L_p; stop if L_p <= target (before updating),
    otherwise one update. At most ``iterations`` (10) updates; the loss after the last one is
    not checked again.

Every UNet call of the pipeline call then uses the optimised e_p (the unconditional half keeps
the empty prompt's embedding), so the generation starts from the same latents.

Cost per prompt: up to ``iterations`` forward passes on its n conditional rows with a backward
each (the unconditional prediction does not depend on e and is computed once: n more rows), then
the normal generation. Each call's report (``handle.calls[i]``) holds per prompt the
iterations, updates, the first and last loss, and the forward / backward sample-passes.

Deliberate deviations: per prompt (the official code handles one prompt per call and would
optimise only the last of several); eps_u computed once instead of every iteration (the same
numbers, fewer passes); the model's dtype as loaded (official: bf16). The target's meaning
depends on n (official runs: n = 4, target 3, i.e. a per-image RMS of 1.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from attnmem.mitigate.hooks import CallHook

__all__ = ["PromptOptimization"]


@dataclass(frozen=True)
class PromptOptimization:
    """Wen et al.'s prompt-embedding optimisation at the first step (module docstring)."""

    target: float = 3.0
    lr: float = 0.05
    iterations: int = 10
    weight_decay: float = 0.01
    step: int = 0

    def install(self, pipe: Any) -> CallHook:
        """Switch it on for the pipeline's calls; the handle restores the pipeline."""
        return CallHook(pipe, self)

    def post_forward(self, hook: CallHook, t: int, output: Any, state: dict) -> Any:
        return output

    def pre_forward(self, hook: CallHook, unet: Any, args: tuple, kwargs: dict, state: dict):
        ehs = kwargs["encoder_hidden_states"]
        N = ehs.shape[0] // 2
        if state["step"] == self.step and "embeds" not in state:
            sample = args[0] if args else kwargs["sample"]
            t = args[1] if len(args) > 1 else kwargs["timestep"]
            state["embeds"], hook.calls[-1]["prompts"] = self.optimise(
                unet, sample[N:], t, ehs[:N], ehs[N:], state["images_per_prompt"]
            )
        if "embeds" in state:
            kwargs = {**kwargs, "encoder_hidden_states": torch.cat([ehs[:N], state["embeds"]])}
        return args, kwargs

    def optimise(
        self,
        unet: Any,
        x: torch.Tensor,
        t: Any,
        uncond: torch.Tensor,
        cond: torch.Tensor,
        n: int,
    ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Optimised conditional embeddings (N rows, n per prompt) and the per-prompt report."""
        P = cond.shape[0] // n
        with torch.no_grad():
            eps_u = unet.forward(x, t, encoder_hidden_states=uncond).sample
        embeds = [cond[p * n].detach().clone().unsqueeze(0).requires_grad_(True) for p in range(P)]
        opts = [torch.optim.AdamW([e], lr=self.lr, weight_decay=self.weight_decay) for e in embeds]
        report = [
            {"iterations": 0, "updates": 0, "loss": [], "forwards": n, "backwards": 0}
            for _ in range(P)
        ]
        active = list(range(P))
        for _ in range(self.iterations):
            if not active:
                break
            xs = torch.cat([x[p * n : (p + 1) * n] for p in active])
            us = torch.cat([eps_u[p * n : (p + 1) * n] for p in active])
            with torch.enable_grad():  # the pipeline runs under no_grad
                rows = torch.cat([embeds[p].expand(n, -1, -1) for p in active])
                eps_c = unet.forward(xs, t, encoder_hidden_states=rows).sample
                diff = (eps_c - us).float().view(len(active), -1)
                losses = diff.norm(dim=1)
            still = []
            for k, p in enumerate(active):
                report[p]["iterations"] += 1
                report[p]["forwards"] += n
                report[p]["loss"].append(float(losses[k]))
                if float(losses[k]) > self.target:
                    still.append((k, p))
            if still:
                with torch.enable_grad():
                    total = sum(losses[k] for k, _ in still)
                    grads = torch.autograd.grad(total, [embeds[p] for _, p in still])
                for (_, p), g in zip(still, grads):
                    g = g.clone()
                    g[:, 0] = 0  # BOS stays (up to the decoupled weight decay)
                    embeds[p].grad = g
                    opts[p].step()
                    embeds[p].grad = None
                    report[p]["updates"] += 1
                    report[p]["backwards"] += n
            active = [p for _, p in still]
        out = torch.cat([e.detach().expand(n, -1, -1) for e in embeds]).to(cond.dtype)
        return out, report
