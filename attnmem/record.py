"""What to record, the recorded cross-attention statistics of one generation, and the
entropies of docs/method.md §4.

For every UNet call (denoising step) t, cross-attention layer l (module name, execution order)
and conditional image i, the processors record

    a[t][l][i, h, j] = prob_sum[b, h, j] / Nq   (pixel-averaged attention per head and token)
    r[t][l][i, h]    = ent_sum[b, h] / Nq       (mean per-pixel attention entropy per head)

where b is image i's conditional row in the UNet batch. That is heads x 77 floats per layer per
step per image. The entropy used by the detection metrics is the entropy of the *mean*
distribution: average a over heads and over the chosen layers (each layer counts equally) to
get one distribution over the 77 positions, then take -sum_j a_j ln a_j.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["RecordSpec", "AttentionRecord", "entropy_of"]


def entropy_of(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """-sum p ln p along ``dim`` with 0 ln 0 = 0."""
    return -torch.where(p > 0, p * torch.log(p.clamp_min(1e-38)), torch.zeros_like(p)).sum(dim)


@dataclass(frozen=True)
class RecordSpec:
    """What to record: steps (indices, or None = all) and layers (names/indices, None = all)."""

    steps: tuple[int, ...] | None = None
    layers: tuple[str | int, ...] | None = None

    def wants_step(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def wants_layer(self, name: str, index: int) -> bool:
        return (
            self.layers is None
            or name in self.layers
            or index in self.layers
            or any(isinstance(x, str) and name.startswith(x + ".") for x in self.layers)
        )


@dataclass
class AttentionRecord:
    """Statistics of the conditional rows of one pipeline call (or one series of UNet calls).

    Attributes:
        layers: recorded cross-attention module names, in execution order.
        order: every cross-attention module that ran, in execution order (layer indices refer
            to this list, so index 3 is the 4th cross-attention even if only it was recorded).
        steps: recorded step indices (UNet call index within the call), in order.
        attn: step -> layer -> (n_images, heads, Nk) float32.
        mean_entropy: step -> layer -> (n_images, heads) float32, each head's per-pixel
            attention entropy averaged over pixels (the op's ent_sum / Nq; not the entropy of
            the mean distribution, which :meth:`entropy` computes).
        lengths: (n_prompts,) L per prompt (first EOS + 1), or None when unknown.
        images_per_prompt: images per prompt; image i belongs to prompt i // images_per_prompt.
        prompts, tokens, truncated: per prompt, when the prompts were seen as text.
    """

    layers: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    attn: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    mean_entropy: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    lengths: torch.Tensor | None = None
    images_per_prompt: int = 1
    prompts: list[str] | None = None
    tokens: list[list[str]] | None = None
    truncated: list[bool] | None = None

    # -- building ---------------------------------------------------------------------------
    def add_step(
        self,
        step: int,
        attn: dict[str, torch.Tensor],
        mean_entropy: dict[str, torch.Tensor],
        order: Sequence[str] = (),
    ) -> None:
        if len(order) > len(self.order):
            self.order = list(order)
        if not attn:
            return
        if not self.layers:
            self.layers = list(attn)
        else:
            self.layers += [name for name in attn if name not in self.layers]
        if step not in self.attn:
            self.steps.append(step)
        self.attn[step] = attn
        self.mean_entropy[step] = mean_entropy

    def to(self, device: str | torch.device) -> AttentionRecord:
        """A copy with every tensor on ``device`` (one transfer per tensor)."""
        mv = {t: {n: a.to(device) for n, a in d.items()} for t, d in self.attn.items()}
        me = {t: {n: a.to(device) for n, a in d.items()} for t, d in self.mean_entropy.items()}
        return AttentionRecord(
            layers=list(self.layers),
            order=list(self.order),
            steps=list(self.steps),
            attn=mv,
            mean_entropy=me,
            lengths=self.lengths,
            images_per_prompt=self.images_per_prompt,
            prompts=self.prompts,
            tokens=self.tokens,
            truncated=self.truncated,
        )

    # -- selection --------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        for d in self.attn.values():
            for a in d.values():
                return a.shape[0]
        return 0

    def prompt_of_image(self, i: int) -> int:
        return i // self.images_per_prompt

    def image_lengths(self) -> torch.Tensor:
        """(n_images,) L of each image's prompt."""
        if self.lengths is None:
            raise ValueError(
                "prompt lengths are unknown: pass prompts as text, or set them with handle.set_prompts(lengths=...)"
            )
        return self.lengths.repeat_interleave(self.images_per_prompt)

    def resolve_layers(self, layers: str | int | Iterable[str | int] | None) -> list[str]:
        """Layer names from names or execution-order indices (None = all)."""
        if layers is None:
            return list(self.layers)
        if isinstance(layers, (str, int)):
            layers = [layers]
        out = []
        for item in layers:
            if isinstance(item, int):
                order = self.order or self.layers
                if not -len(order) <= item < len(order):
                    raise ValueError(
                        f"layer index {item} out of range: {len(order)} cross-attention layers ran"
                    )
                if order[item] not in self.layers:
                    raise ValueError(
                        f"layer {item} ({order[item]}) was not recorded; recorded: {self.layers}"
                    )
                out.append(order[item])
            elif item in self.layers:
                out.append(item)
            else:
                matches = [n for n in self.layers if n.startswith(item + ".")]
                if not matches:
                    raise ValueError(
                        f"no recorded cross-attention layer named {item!r}; recorded: {self.layers}"
                    )
                out.extend(m for m in matches if m not in out)
        return out

    def resolve_steps(self, steps: int | Iterable[int] | None) -> list[int]:
        if steps is None:
            return list(self.steps)
        if isinstance(steps, int):
            steps = [steps]
        out = []
        for s in steps:
            s = self.steps[s] if s < 0 else s
            if s not in self.attn:
                raise ValueError(f"step {s} was not recorded; recorded steps: {self.steps}")
            out.append(s)
        return out

    # -- quantities of docs/method.md §4 ----------------------------------------------------
    def mean_attention_per_step(self, steps=None, layers=None) -> torch.Tensor:
        """(n_steps, n_images, Nk): per step, a averaged over heads, then over layers equally."""
        names = self.resolve_layers(layers)
        out = []
        for t in self.resolve_steps(steps):
            per_layer = [self.attn[t][n].float().mean(dim=1) for n in names if n in self.attn[t]]
            if not per_layer:
                raise ValueError(f"none of the layers {names} was recorded at step {t}")
            out.append(torch.stack(per_layer).mean(dim=0))
        return torch.stack(out)

    def mean_attention(self, steps=None, layers=None) -> torch.Tensor:
        """(n_images, Nk): the per-step mean distribution averaged over the chosen steps."""
        return self.mean_attention_per_step(steps, layers).mean(dim=0)

    def entropy(self, steps=None, layers=None) -> torch.Tensor:
        """E_t = entropy of the mean distribution over layers: (n_images,) for one step given
        as an int (``entropy(steps=0)``: one value per image), else (n_steps, n_images)."""
        e = entropy_of(self.mean_attention_per_step(steps, layers))
        return e[0] if isinstance(steps, int) else e

    def partial_entropy(
        self, steps=None, layers=None, start: torch.Tensor | Sequence[int] | None = None
    ) -> torch.Tensor:
        """-sum_{j >= start_i} a_j ln a_j, not renormalized: (n_images,) for one step given as
        an int, else (n_steps, n_images).

        ``start`` per image defaults to L - 1 (the EOS position onward: EOS and summary tokens).
        """
        a = self.mean_attention_per_step(steps, layers)
        start_t = self.image_lengths() - 1 if start is None else torch.as_tensor(start)
        pos = torch.arange(a.shape[-1])
        keep = (pos[None, :] >= start_t.to(torch.int64)[:, None]).to(a.device)
        e = entropy_of(torch.where(keep[None], a, torch.zeros_like(a)))
        return e[0] if isinstance(steps, int) else e
