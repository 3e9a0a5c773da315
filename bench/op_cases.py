"""Cross-attention implementations compared by the op benchmark, each returning
(out (B, Nq, H*D), prob_sum (B, H, Nk), ent_sum (B, H)) or just out where it has no statistics.

Shapes and inputs come from attnmem.testing (the one op-case table): the SD1.x cross-attention
layers at 512 px, q (B, Nq, H, D) and k/v (B, Nk, H, D) in diffusers' layout, exactly what an
attention processor receives. Every contender is verified with the table's tolerance rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import attnmem
from attnmem.testing import SD_LAYERS, OpInputs, assert_matches_reference, make_qkv

# SD1.x cross-attention shapes at 512 px (64x64 latents): (Nq, D) per UNet resolution level.
SD1_SHAPES = [(layer.Nq, layer.D) for layer in SD_LAYERS if layer.model == "SD1.x"]
B, H, NK = 2, 8, 77


def make_inputs(Nq: int, D: int, dtype=torch.float32, device="cpu", seed=0):
    return make_qkv(B, Nq, H, D, NK, dtype=dtype, device=device, seed=seed)


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
    """Check a case with attnmem.testing's tolerance rule before it is timed."""
    res = CASES[name](q, k, v)
    assert_matches_reference(res if isinstance(res, tuple) else (res,), OpInputs(q, k, v))
