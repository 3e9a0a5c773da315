"""Inference-time mitigation (docs/method.md §5): the settings, and how they apply to each row
of a CFG batch.

Per cross-attention layer and denoising step (optionally a step range and a layer subset):

- **Begin-token rescale:** the pre-softmax logit of key 0 is *multiplied* by ``bos_scale`` (the
  paper's c1) on the conditional rows only (1.0 is off). It is a multiplication, not an
  addition: when that logit is negative, ``bos_scale > 1`` lowers the beginning token's
  attention instead of raising it.
- **Summary-token mask:** positions ``>= L`` (``mask="padding"``, the default) or ``>= L - 1``
  (``mask="padding+eos"``) are masked, per row from that row's own prompt; ``mask="none"``
  turns masking off. The unconditional rows are masked with their conditional prompt's L
  (``uncond="official"``, the official code's behaviour) or left unmasked (``"unmasked"``).

Apply with ``attnmem.patch(pipe, mitigate=attnmem.Mitigation(bos_scale=1.25))``; the mitigated
pipeline runs the same number of UNet passes as the plain one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["Mitigation"]

MaskMode = Literal["padding", "padding+eos", "none"]
UncondMode = Literal["official", "unmasked"]


@dataclass(frozen=True)
class Mitigation:
    """What to change in the cross-attention of a patched pipeline.

    Args:
        bos_scale: factor on the beginning token's logit, conditional rows only (default 1.25;
            the paper's c1). The op's ``bos_scale`` per row is this on conditional rows, 1 on
            unconditional ones.
        mask: which summary tokens to mask: ``"padding"`` (positions >= L), ``"padding+eos"``
            (>= L - 1) or ``"none"``.
        uncond: ``"official"`` masks unconditional rows with the conditional prompt's L;
            ``"unmasked"`` leaves them alone.
        steps: ``(start, end)``: apply only at denoising step indices start <= t < end
            (the UNet call index within one pipeline call); None = every step.
        layers: apply only to these cross-attention layers, by module name (e.g.
            ``"down_blocks.1.attentions.1.transformer_blocks.0.attn2"``) or by index in
            execution order; None = every layer.
    """

    bos_scale: float = 1.25
    mask: MaskMode = "padding"
    uncond: UncondMode = "official"
    steps: tuple[int, int] | None = None
    layers: Sequence[str | int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bos_scale, (int, float)) or not math.isfinite(self.bos_scale):
            raise ValueError(
                f"Mitigation: bos_scale must be a finite number, got {self.bos_scale!r}"
            )
        if self.mask not in ("padding", "padding+eos", "none"):
            raise ValueError(
                f"Mitigation: mask must be 'padding', 'padding+eos' or 'none', got {self.mask!r}"
            )
        if self.uncond not in ("official", "unmasked"):
            raise ValueError(
                f"Mitigation: uncond must be 'official' or 'unmasked', got {self.uncond!r}"
            )
        if self.steps is not None:
            if (
                len(self.steps) != 2
                or not all(isinstance(s, int) for s in self.steps)
                or self.steps[0] > self.steps[1]
            ):
                raise ValueError(
                    f"Mitigation: steps must be (start, end) integers with start <= end, got {self.steps!r}"
                )
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def masks(self) -> bool:
        return self.mask != "none"

    def active_at(self, step: int) -> bool:
        return self.steps is None or self.steps[0] <= step < self.steps[1]

    def applies_to(self, name: str, index: int) -> bool:
        return self.layers is None or name in self.layers or index in self.layers

    def key_len(self, L: int, Nk: int) -> int:
        """Unmasked key count for a prompt of length L (BOS and EOS included)."""
        if self.mask == "none":
            return Nk
        keep = L - 1 if self.mask == "padding+eos" else L
        return max(0, min(keep, Nk))

    def per_row(
        self,
        n_rows: int,
        cfg: bool,
        lengths: Sequence[int] | None,
        images_per_prompt: int,
        Nk: int,
        device: torch.device | str,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The op's ``key_len`` (or None: no mask) and ``bos_scale`` for every UNet batch row.

        With guidance the batch is ``[uncond x n, cond x n]`` (n = ``n_rows`` = prompts x
        ``images_per_prompt``, one prompt's images contiguous); without it every row is
        conditional. ``bos_scale`` is the mitigation's on conditional rows and 1 on unconditional ones;
        ``key_len`` follows each row's own prompt (``lengths`` per prompt), and on
        unconditional rows the conditional prompt's (``uncond="official"``) or every key.
        """
        n = n_rows
        c = float(self.bos_scale)
        bos_scale = [1.0] * n + [c] * n if cfg else [c] * n
        key_len = None
        if self.masks:
            if lengths is None:
                raise ValueError(
                    "attnmem: masking summary tokens needs each prompt's length L; pass prompts "
                    "as text, or call handle.set_prompts(lengths=...), or use "
                    "Mitigation(mask='none')"
                )
            per_image = [
                self.key_len(int(L), Nk) for L in lengths for _ in range(images_per_prompt)
            ]
            if cfg:
                uncond = per_image if self.uncond == "official" else [Nk] * n
                key_len = uncond + per_image
            else:
                key_len = per_image
        bos_t = torch.tensor(bos_scale, dtype=torch.float32).to(device, non_blocking=True)
        if key_len is None:
            return None, bos_t
        return torch.tensor(key_len, dtype=torch.int64).to(device, non_blocking=True), bos_t
