"""Training-time mitigation (docs/method.md §6): drop likely-memorized samples from the loss.

The entropy filter reads the cross-attention entropy that attnmem's processors record during
the *training forward itself* (per sample, at its own timestep; default the metric-E layer),
so it costs no extra UNet pass. Samples whose entropy is above a threshold get loss weight 0.
Zero weights, not indexing: every data-parallel rank keeps its batch shape and stays in step.

Use it in a diffusers ``train_text_to_image.py``-style loop::

    filt = attnmem.EntropyFilter(unet)                 # patches the UNet's cross-attention
    pred = unet(noisy_latents, timesteps, encoder_hidden_states=text_emb).sample
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    w = filt.weights(timesteps)                         # (B,) 0 or 1, from that same forward
    loss = (w * per_sample).mean()                      # mean over the whole local batch
    loss.backward()

With the mean over the whole local batch, data-parallel training (DDP averages gradients over
ranks) gives the same gradient as one process on the global batch. Running thresholds are
updated from the entropies of the *global* batch (all-gathered when torch.distributed is
initialized), so every rank applies the same threshold.

Thresholds: :class:`Absolute` (a fixed tau), :class:`RunningQuantile` and :class:`RunningZScore`
(per timestep bucket). Attention entropy depends strongly on the noise level, so running
thresholds are kept per bucket of timesteps. Default: ``RunningZScore(z=3.0, buckets=10,
min_count=64)``: it only drops samples that are clear outliers for their noise level, drops
nothing while a bucket has too little history, and — unlike a quantile — does not drop a
fixed fraction of clean data when nothing is memorized.

Wen et al.'s filter is the baseline (:class:`WenFilter`): one extra no-grad forward with the
empty prompt, dropping samples with ||eps(x_t, c) - eps(x_t, empty)|| above the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from attnmem.patching import PatchHandle, patch
from attnmem.record import RecordSpec

__all__ = [
    "Absolute",
    "RunningQuantile",
    "RunningZScore",
    "SampleFilter",
    "EntropyFilter",
    "WenFilter",
    "FilterStats",
]


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' values concatenated in rank order (the local tensor without distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    sizes = [
        torch.zeros(1, dtype=torch.int64, device=x.device) for _ in range(dist.get_world_size())
    ]
    dist.all_gather(sizes, torch.tensor([x.numel()], device=x.device))
    n_max = int(max(s.item() for s in sizes))
    padded = torch.zeros(n_max, dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


# ----------------------------------------------------------------------------------------------
# Thresholds
# ----------------------------------------------------------------------------------------------
class Threshold:
    """Decides which samples to drop: ``drop(values, timesteps) -> bool mask``, then
    ``update(global_values, global_timesteps)`` (decisions use the history *before* the batch)."""

    def drop(self, values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, values: torch.Tensor, timesteps: torch.Tensor) -> None:
        pass


@dataclass
class Absolute(Threshold):
    """Drop samples whose value is above ``tau``."""

    tau: float

    def drop(self, values, timesteps):
        return values > self.tau


@dataclass
class _Bucketed(Threshold):
    buckets: int = 10
    num_train_timesteps: int = 1000
    min_count: int = 64
    window: int = 2048
    history: list[list[float]] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.buckets < 1 or self.min_count < 1 or self.window < self.min_count:
            raise ValueError("need buckets >= 1, min_count >= 1 and window >= min_count")
        self.history = [[] for _ in range(self.buckets)]

    def bucket(self, timesteps: torch.Tensor) -> torch.Tensor:
        t = timesteps.detach().float().cpu().flatten()
        return (t * self.buckets / self.num_train_timesteps).long().clamp(0, self.buckets - 1)

    def update(self, values, timesteps):
        for b, v in zip(self.bucket(timesteps).tolist(), values.detach().float().cpu().tolist()):
            h = self.history[b]
            h.append(v)
            if len(h) > self.window:
                del h[: len(h) - self.window]

    def _limit(self, recent: torch.Tensor) -> float:
        """The threshold from a bucket's recent values (float64)."""
        raise NotImplementedError

    def drop(self, values, timesteps):
        limits = [
            self._limit(torch.tensor(h, dtype=torch.float64)) if len(h) >= self.min_count else None
            for h in self.history
        ]  # None: too little history in that bucket, drop nothing there
        out = []
        for b, v in zip(self.bucket(timesteps).tolist(), values.detach().float().cpu().tolist()):
            out.append(limits[b] is not None and v > limits[b])
        return torch.tensor(out, dtype=torch.bool, device=values.device)


@dataclass
class RunningQuantile(_Bucketed):
    """Drop samples above the q-quantile of the recent values of their timestep bucket."""

    q: float = 0.95

    def _limit(self, recent):
        return float(torch.quantile(recent, self.q))


@dataclass
class RunningZScore(_Bucketed):
    """Drop samples more than ``z`` standard deviations above the recent mean of their bucket."""

    z: float = 3.0

    def _limit(self, recent):
        return float(recent.mean() + self.z * recent.std())


# ----------------------------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------------------------
@dataclass
class FilterStats:
    """What the last call decided: the values, the weights and the fraction dropped."""

    values: torch.Tensor
    weights: torch.Tensor
    dropped: float


class SampleFilter:
    """What the training filters share: a threshold, the per-sample weights it gives, and what
    the last call decided. Subclasses compute the per-sample values and call :meth:`_decide`."""

    def __init__(self, threshold: Threshold | None = None):
        self.threshold = threshold if threshold is not None else RunningZScore()
        self.last: FilterStats | None = None

    def _decide(self, values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) float weights, 0 for the samples the threshold drops; then update it from the
        global batch."""
        timesteps = torch.as_tensor(timesteps, device=values.device).flatten()
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(values.shape[0])
        drop = self.threshold.drop(values, timesteps)
        self.threshold.update(_gather(values.float()), _gather(timesteps.float()))
        w = (~drop).to(torch.float32)
        self.last = FilterStats(
            values=values.detach(),
            weights=w,
            dropped=float(drop.float().mean()) if drop.numel() else 0.0,
        )
        return w

    @property
    def fraction_dropped(self) -> float:
        """Fraction of the last batch that got weight 0."""
        return self.last.dropped if self.last is not None else 0.0

    def remove(self) -> None:
        """Undo what the filter installed (nothing by default)."""

    def __enter__(self) -> SampleFilter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class EntropyFilter(SampleFilter):
    """Per-sample loss weights from the attention entropy of the training forward.

    Args:
        unet: the UNet being trained (its cross-attention gets attnmem's processors; ``out``
            backpropagates through attnmem's op).
        layers: layer names or execution-order indices whose mean distribution's entropy is
            used (default: the metric-E layer, index 3); ``"all"`` for every layer.
        threshold: a :class:`Threshold`; default ``RunningZScore()``.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        layers: Sequence[str | int] | str | int = 3,
        threshold: Threshold | None = None,
    ):
        super().__init__(threshold)
        self.layers = (
            None
            if layers == "all"
            else ([layers] if isinstance(layers, (str, int)) else list(layers))
        )
        self.handle: PatchHandle = patch(
            unet, record=RecordSpec(layers=tuple(self.layers) if self.layers else None)
        )
        # Runs before the handle's own pre-hook: describe each training batch (all rows are
        # conditional, no CFG) and drop the previous batch's record.
        self._hook = self.handle.unet.register_forward_pre_hook(
            self._new_batch, with_kwargs=True, prepend=True
        )

    def _new_batch(self, module, args, kwargs):
        if not self.handle.active:
            return
        sample = kwargs.get("sample", args[0] if args else None)
        self.handle.controller.records.clear()  # keep memory flat over training
        self.handle.set_prompts(n_rows=int(sample.shape[0]), cfg=False)

    def entropy(self) -> torch.Tensor:
        """(B,) entropy of the mean attention distribution of the last forward, per sample."""
        rec = self.handle.record
        if not rec.steps:
            raise RuntimeError("EntropyFilter: no statistics recorded; call the UNet forward first")
        return rec.entropy(steps=rec.steps[-1], layers=self.layers)

    def weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """(B,) float weights, 0 for dropped samples, for the last forward's batch."""
        return self._decide(self.entropy(), timesteps)

    def remove(self) -> None:
        """Restore the UNet's original processors."""
        self._hook.remove()
        self.handle.remove()


class WenFilter(SampleFilter):
    """Wen et al.'s training filter: one extra no-grad forward with the empty prompt; drop
    samples whose ||eps(x_t, c) - eps(x_t, empty)||_2 is above the threshold."""

    def __init__(self, unet: torch.nn.Module, threshold: Threshold | None = None):
        super().__init__(threshold)
        self.unet = unet

    def weights(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        eps_cond: torch.Tensor,
        empty_embeds: torch.Tensor,
        **unet_kwargs: Any,
    ) -> torch.Tensor:
        """Weights from the conditional prediction of the training forward (detached here) and
        an extra forward with ``empty_embeds`` (the encoded empty prompt, (1 or B, 77, dim))."""
        B = noisy_latents.shape[0]
        if empty_embeds.shape[0] == 1:
            empty_embeds = empty_embeds.expand(B, *empty_embeds.shape[1:])
        with torch.no_grad():
            eps_empty = self.unet(
                noisy_latents, timesteps, encoder_hidden_states=empty_embeds, **unet_kwargs
            ).sample
        values = (eps_cond.detach().float() - eps_empty.float()).flatten(1).norm(dim=1)
        return self._decide(values, timesteps)
