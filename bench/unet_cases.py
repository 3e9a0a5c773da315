"""UNet-level cases of the detection and mitigation benchmark (SD1.x architecture, random weights).

Per prompt, each case runs what a method needs at step 0:

- ``plain``: one CFG UNet step with diffusers' SDPA processors (batch 2): the unit.
- ``attnmem_stats``: the same step with attnmem's processors recording every layer (metric E
  read inside a normal CFG step; also the monitoring overhead).
- ``official_stats``: the official code's way: explicit softmax in every cross-attention layer
  and every attention map kept on the host (``.cpu()``: a device-to-host copy on GPU, a no-op
  on CPU), then the same statistics computed from the maps.
- ``e_early_exit``: attnmem metric E: conditional row only (batch 1), UNet stopped after the
  4th cross-attention.
- ``wen_n4``: Wen et al. with n = 4: one CFG step for 4 generations (batch 8); ``wen_n1`` is
  ``plain`` plus a norm.
- ``attnmem_mitigated`` / ``official_mitigated``: a generation step with the begin-token rescale
  and summary-token mask, through attnmem's op and through explicit attention.
"""

from __future__ import annotations

import math
from typing import Any

import torch

import attnmem
from attnmem.patching import run_unet_until
from attnmem.record import RecordSpec

SD1_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=(
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
TINY_UNET = dict(
    SD1_UNET,
    sample_size=16,
    block_out_channels=(32, 64, 64, 64),
    attention_head_dim=2,
    cross_attention_dim=32,
    norm_num_groups=16,
)

PROMPT_LEN = 12  # L of the benchmark prompt (BOS + 10 word-pieces + EOS)


def build_unet(size: str = "sd1", dtype=torch.float32, device="cpu"):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = SD1_UNET if size == "sd1" else TINY_UNET
    return UNet2DConditionModel(**cfg).to(device=device, dtype=dtype).eval()


def inputs(unet, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
    ehs = torch.randn(batch, 77, c.cross_attention_dim, generator=g)
    p = next(unet.parameters())
    return x.to(p), ehs.to(p), torch.tensor([981], device=p.device)


class OfficialStyleProcessor:
    """Explicit attention for cross-attention layers, as the official code does it: logits,
    optional begin-token rescale and summary mask, softmax, P V; with ``keep_maps`` every
    attention map is kept on the host."""

    def __init__(
        self,
        sink: list | None,
        bos_scale: float | None = None,
        key_len: torch.Tensor | None = None,
        n_uncond: int = 0,
    ):
        self.sink, self.bos_scale, self.key_len, self.n_uncond = sink, bos_scale, key_len, n_uncond

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        B, Nq, _ = hidden_states.shape
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B*H, Nq, D)
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        s = torch.baddbmm(
            torch.empty(q.shape[0], Nq, k.shape[1], dtype=q.dtype, device=q.device),
            q,
            k.transpose(-1, -2),
            beta=0,
            alpha=attn.scale,
        )
        if self.bos_scale is not None or self.key_len is not None:
            s = s.view(B, attn.heads, Nq, -1)
            if self.bos_scale is not None:
                s[self.n_uncond :, :, :, 0] *= self.bos_scale
            if self.key_len is not None:
                keep = torch.arange(s.shape[-1], device=s.device)[None, :] < self.key_len[:, None]
                s = s.masked_fill(~keep[:, None, None, :], -math.inf)
            s = s.view(B * attn.heads, Nq, -1)
        p = s.softmax(dim=-1)
        if self.sink is not None:
            self.sink.append(p.detach().cpu())
        out = attn.batch_to_head_dim(torch.bmm(p, v))
        return attn.to_out[1](attn.to_out[0](out))


def official_statistics(
    maps: list[torch.Tensor], heads: int, cond: slice
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """prob_sum/Nq and mean row entropy per layer from host-side maps (B*H, Nq, Nk)."""
    out = []
    for p in maps:
        p = p.view(-1, heads, *p.shape[1:])[cond].float()
        a = p.mean(dim=2)
        e = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean(-1)
        out.append((a, e))
    return out


def _set_attn2(unet, make) -> dict[str, Any]:
    mods = {n: m for n, m in unet.named_modules() if n.endswith("attn2")}
    old = {n: m.processor for n, m in mods.items()}
    for n, m in mods.items():
        m.set_processor(make(n))
    return old


def _restore(unet, old: dict[str, Any]) -> None:
    for n, m in unet.named_modules():
        if n in old:
            m.set_processor(old[n])


class Cases:
    """Callables for every case, built around one UNet; each returns what it computed."""

    def __init__(self, unet, prompts: int = 1):
        self.unet = unet
        self.n = n = prompts
        self.x2, self.e2, self.t = inputs(unet, 2 * n)  # [uncond x n, cond x n]
        self.x1, self.e1 = self.x2[n:], self.e2[n:]  # the conditional rows of the same prompts
        self.x8, self.e8, _ = inputs(unet, 8 * n, seed=1)
        self.lengths = [PROMPT_LEN] * n

    @torch.inference_mode()
    def plain(self):
        return self.unet(self.x2, self.t, encoder_hidden_states=self.e2).sample

    @torch.inference_mode()
    def wen_n4(self):
        eps = self.unet(self.x8, self.t, encoder_hidden_states=self.e8).sample
        u, c = eps.float().chunk(2)
        return (c - u).flatten(1).norm(dim=1)

    @torch.inference_mode()
    def attnmem_stats(self):
        with attnmem.patch(self.unet) as h:
            h.set_prompts(lengths=self.lengths, cfg=True)
            out = self.unet(self.x2, self.t, encoder_hidden_states=self.e2).sample
            return out, h.record

    @torch.inference_mode()
    def e_early_exit(self):
        with attnmem.patch(self.unet, record=RecordSpec(steps=(0,), layers=(3,))) as h:
            h.set_prompts(lengths=self.lengths, cfg=False)
            run_unet_until(h, 3, lambda: self.unet(self.x1, self.t, encoder_hidden_states=self.e1))
            return h.record.entropy(steps=0, layers=3)

    @torch.inference_mode()
    def official_stats(self):
        maps: list[torch.Tensor] = []
        old = _set_attn2(self.unet, lambda n: OfficialStyleProcessor(maps))
        try:
            out = self.unet(self.x2, self.t, encoder_hidden_states=self.e2).sample
        finally:
            _restore(self.unet, old)
        heads = self.unet.config.attention_head_dim
        return out, official_statistics(maps, heads, slice(self.n, 2 * self.n))

    @torch.inference_mode()
    def attnmem_mitigated(self):
        with attnmem.patch(
            self.unet, record=False, mitigate=attnmem.Mitigation(bos_scale=1.25)
        ) as h:
            h.set_prompts(lengths=self.lengths, cfg=True)
            return self.unet(self.x2, self.t, encoder_hidden_states=self.e2).sample

    @torch.inference_mode()
    def official_mitigated(self):
        kl = torch.tensor(self.lengths * 2, device=self.t.device)
        old = _set_attn2(
            self.unet,
            lambda name: OfficialStyleProcessor(None, bos_scale=1.25, key_len=kl, n_uncond=self.n),
        )
        try:
            return self.unet(self.x2, self.t, encoder_hidden_states=self.e2).sample
        finally:
            _restore(self.unet, old)

    def verify(self, atol: float) -> dict[str, float]:
        """Every case computes the same thing as its reference path, checked before timing."""
        plain = self.plain()
        out, rec = self.attnmem_stats()
        torch.testing.assert_close(out, plain, atol=atol, rtol=1e-3)
        out_o, stats_o = self.official_stats()
        torch.testing.assert_close(out_o, plain, atol=atol, rtol=1e-3)
        for name, (a, e) in zip(rec.order, stats_o):
            torch.testing.assert_close(rec.attn[0][name].float(), a, atol=1e-4, rtol=1e-3)
            torch.testing.assert_close(rec.mean_entropy[0][name].float(), e, atol=1e-3, rtol=1e-3)
        e_fast = self.e_early_exit()
        e_cfg = rec.entropy(steps=0, layers=3)
        torch.testing.assert_close(e_fast, e_cfg, atol=1e-4 if atol < 1e-2 else 1e-2, rtol=1e-3)
        mit = self.attnmem_mitigated()
        mit_o = self.official_mitigated()
        torch.testing.assert_close(mit, mit_o, atol=atol, rtol=1e-3)
        return {
            "max_abs_diff_stats_step_vs_plain": float((out - plain).abs().max()),
            "max_abs_diff_mitigated_vs_official": float((mit - mit_o).abs().max()),
            "E_early_exit": float(e_fast[0]),
            "E_cfg_step": float(e_cfg[0]),
        }

    def timed(self) -> dict[str, Any]:
        return {
            "plain": self.plain,
            "attnmem_stats": self.attnmem_stats,
            "official_stats": self.official_stats,
            "e_early_exit": self.e_early_exit,
            "wen_n4": self.wen_n4,
            "attnmem_mitigated": self.attnmem_mitigated,
            "official_mitigated": self.official_mitigated,
        }
