"""Inputs the compiled kernel cannot take still get attnmem's mitigation and statistics: more
than 128 text tokens (long-prompt embeddings) and an ``encoder_attention_mask`` run on the
reference, checked against an explicit float64 softmax written here; a warning once, an error
in strict mode; a mask attnmem cannot apply is said so, never silently ignored."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import attnmem
from attnmem.testing import tiny_unet

N = 2  # conditional rows; the UNet batch is [uncond x N, cond x N]


class Explicit:
    """Cross-attention written out in float64: logit of key 0 times ``bos[b]``, keys where
    ``keep[b, j]`` is False masked, softmax; records each layer's conditional-row
    probabilities averaged over queries."""

    def __init__(self, name, bos, keep, seen):
        self.name, self.bos, self.keep, self.seen = name, bos, keep, seen

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        B, Nq, _ = hidden_states.shape
        H = attn.heads
        q = attn.to_q(hidden_states).double()
        k = attn.to_k(encoder_hidden_states).double()
        v = attn.to_v(encoder_hidden_states).double()
        D = q.shape[-1] // H
        q, k, v = (t.view(B, -1, H, D).transpose(1, 2) for t in (q, k, v))
        s = q @ k.transpose(-1, -2) * attn.scale
        s[:, :, :, 0] = s[:, :, :, 0] * self.bos.double()[:, None, None]
        s = s.masked_fill(~self.keep[:, None, None, :], -math.inf)
        p = s.softmax(-1)
        self.seen[self.name] = p.mean(2)[N:]
        out = (p @ v).transpose(1, 2).reshape(B, Nq, H * D).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def explicit_unet(bos, keep):
    unet = tiny_unet("sd1")
    seen = {}
    for name, m in unet.named_modules():
        if name.endswith("attn2"):
            m.set_processor(Explicit(name, bos, keep, seen))
    return unet, seen


def inputs(Nk):
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(2 * N, 4, 8, 8, generator=g)
    ehs = torch.randn(2 * N, Nk, 32, generator=g)
    return sample, ehs


def test_more_than_128_text_tokens_are_mitigated_and_recorded():
    Nk, c1 = 154, 1.5  # compel-style embeddings: two 77-token chunks
    sample, ehs = inputs(Nk)
    unet = tiny_unet("sd1")
    with torch.no_grad():
        plain = unet(sample, 10, encoder_hidden_states=ehs).sample
        with attnmem.patch(unet, mitigate=attnmem.Mitigation(bos_scale=c1, mask="none")) as h:
            h.set_prompts(n_rows=N, cfg=True)
            with pytest.warns(UserWarning, match="154 text tokens") as caught:
                got = unet(sample, 10, encoder_hidden_states=ehs).sample
        rec = h.record
        bos = torch.tensor([1.0] * N + [c1] * N)
        ref_unet, seen = explicit_unet(bos, torch.ones(2 * N, Nk, dtype=torch.bool))
        want = ref_unet(sample, 10, encoder_hidden_states=ehs).sample
    assert len([w for w in caught if "text tokens" in str(w.message)]) == 1  # once per patch
    assert (got - plain).abs().max() > 1e-3  # not the unmitigated output
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert set(rec.layers) == set(seen)  # every layer recorded
    for name, p in seen.items():
        assert rec.attn[0][name].shape == (N, p.shape[1], Nk)
        torch.testing.assert_close(rec.attn[0][name].double(), p, atol=1e-5, rtol=1e-4)


def test_encoder_attention_mask_is_combined_with_the_mitigation():
    Nk, c1, lengths = 77, 1.25, [12, 20]
    sample, ehs = inputs(Nk)
    user = torch.ones(2 * N, Nk, dtype=torch.bool)
    user[:, 3:6] = False  # the caller masks keys 3-5 of every row
    user[N + 1, 9] = False  # and key 9 of the second conditional row
    unet = tiny_unet("sd1")
    with torch.no_grad():
        plain = unet(sample, 10, encoder_hidden_states=ehs, encoder_attention_mask=user).sample
        with attnmem.patch(unet, mitigate=attnmem.Mitigation(bos_scale=c1)) as h:
            h.set_prompts(lengths=lengths, n_rows=N, cfg=True)
            with pytest.warns(UserWarning, match="encoder_attention_mask"):
                got = unet(sample, 10, encoder_hidden_states=ehs, encoder_attention_mask=user)
        rec = h.record
        L = torch.tensor(lengths * 2)  # uncond rows masked with their prompt's L ("official")
        keep = user & (torch.arange(Nk)[None, :] < L[:, None])
        ref_unet, seen = explicit_unet(torch.tensor([1.0] * N + [c1] * N), keep)
        want = ref_unet(sample, 10, encoder_hidden_states=ehs).sample
    assert (got.sample - plain).abs().max() > 1e-3
    torch.testing.assert_close(got.sample, want, atol=1e-4, rtol=1e-4)
    for name, p in seen.items():
        torch.testing.assert_close(rec.attn[0][name].double(), p, atol=1e-5, rtol=1e-4)
        assert (rec.attn[0][name][:, :, 3:6] == 0).all()


def test_strict_mode_refuses_the_fallback():
    sample, ehs = inputs(140)
    unet = tiny_unet("sd1")
    with (
        torch.no_grad(),
        attnmem.patch(unet, mitigate=attnmem.Mitigation(mask="none")) as h,
        attnmem.strict(),
    ):
        h.set_prompts(n_rows=N, cfg=True)
        with pytest.raises(RuntimeError, match="140 text tokens.*strict mode"):
            unet(sample, 10, encoder_hidden_states=ehs)


def test_a_mask_attnmem_cannot_apply_is_reported():
    _, ehs = inputs(77)
    unet = tiny_unet("sd1")
    soft = torch.zeros(2 * N, 1, 77)
    soft[:, :, 5] = -2.0  # a soft bias, not a key mask
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    attn = dict(unet.named_modules())[name]
    with torch.no_grad(), attnmem.patch(unet, mitigate=attnmem.Mitigation(mask="none")) as h:
        h.set_prompts(n_rows=N, cfg=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hs = torch.randn(2 * N, 16, attn.query_dim)
            h.controller.begin_unet_call(2 * N)
            attn.processor(attn, hs, ehs, attention_mask=soft)
            h.controller.end_unet_call()
        assert any("no mitigation, no statistics" in str(w.message) for w in caught)
        with attnmem.strict():
            h.controller.begin_unet_call(2 * N)
            with pytest.raises(RuntimeError, match="not a boolean or 0/-10000 key mask"):
                attn.processor(attn, hs, ehs, attention_mask=soft)
            h.controller.end_unet_call()
