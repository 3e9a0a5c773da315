"""Cross-attention implementations compared by the op benchmark, each returning
(out (B, Nq, H*D), prob_sum (B, H, Nk), ent_sum (B, H)) or just out where it has no statistics.

Inputs come in diffusers' layout: q (B, Nq, H, D), k/v (B, Nk, H, D) as views of the
(B, N, H*D) projections, exactly what an attention processor receives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attnmem

# SD1.x cross-attention shapes at 512 px (64x64 latents): (Nq, D) per UNet resolution level.
SD1_SHAPES = [(4096, 40), (1024, 80), (256, 160), (64, 160)]
B, H, NK = 2, 8, 77


def make_inputs(Nq: int, D: int, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Nq, H * D, generator=g).view(B, Nq, H, D)
    k = torch.randn(B, NK, H * D, generator=g).view(B, NK, H, D)
    v = torch.randn(B, NK, H * D, generator=g).view(B, NK, H, D)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def attnmem_stats(q, k, v):
    out, prob_sum, ent_sum, _ = attnmem.cross_attention(q, k, v)
    return out.flatten(2), prob_sum, ent_sum


def sdpa_no_stats(q, k, v):
    """What diffusers' AttnProcessor2_0 does: transpose views to (B, H, N, D), SDPA, back."""
    Bq, Nq, Hq, D = q.shape
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(Bq, Nq, Hq * D)


def eager_stats(q, k, v):
    """Materialize P (B, H, Nq, Nk) like diffusers' AttnProcessor, then the same statistics."""
    Bq, Nq, Hq, D = q.shape
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    p = torch.softmax((qh @ kh.transpose(-1, -2)) * D**-0.5, dim=-1)
    out = (p @ vh).transpose(1, 2).reshape(Bq, Nq, Hq * D)
    prob_sum = p.sum(dim=2)
    ent_sum = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1).sum(dim=-1)
    return out, prob_sum, ent_sum


CASES = {
    "attnmem+stats": attnmem_stats,
    "sdpa (no stats)": sdpa_no_stats,
    "eager+stats": eager_stats,
}


def verify(name: str, q, k, v) -> None:
    """Check a case against attnmem.reference before it is timed."""
    ref_out, ref_ps, ref_es, _ = attnmem.reference.cross_attention(
        q.double(), k.double(), v.double()
    )
    res = CASES[name](q, k, v)
    out = res[0] if isinstance(res, tuple) else res
    torch.testing.assert_close(out.double(), ref_out.flatten(2), atol=1e-4, rtol=1e-4)
    if isinstance(res, tuple):
        nq = q.shape[1]
        torch.testing.assert_close(res[1].double() / nq, ref_ps.double() / nq, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(res[2].double() / nq, ref_es.double() / nq, atol=1e-4, rtol=1e-5)
