"""Pure-PyTorch oracle of ``attnmem::cross_attention`` (docs/method.md §2).

Every kernel test and benchmark compares against this file, and ``attnmem.cross_attention``
falls back to it when no compiled kernel can run an input. It materializes the
(B, H, Nq, Nk) probability tensor on purpose: clarity over speed.

Math per row (b, h, i), all in fp32 (fp64 for fp64 inputs):

    s_j  = scale * <q_i, k_j>
    s_0 <- bos_scale[b] * s_0                 (a multiplication, not an addition)
    s_j <- -inf for j >= key_len[b]           (a select, after the rescale)
    s_j <- -inf where key_mask[b, j] is False (reference only: any boolean key mask)
    p    = softmax(s)                         (a fully masked row gives p = 0, not NaN)
    out_i     = sum_j p_j v_j
    entropy_i = -sum_j p_j ln p_j             (0 ln 0 = 0)
    a NaN or infinite unmasked logit          -> the row's p (unmasked keys), out and entropy
                                                 are NaN

Statistics: prob_sum[b, h, j] = sum_i p_ij, ent_sum[b, h] = sum_i entropy_i,
row_ent[b, h, i] = entropy_i. They are detached (not differentiable); ``out`` is.

Beyond the compiled op's contract, the reference takes any number of keys and an arbitrary
boolean ``key_mask``: the diffusers processor falls back to it for long-prompt embeddings
(more than 128 keys) and for an ``encoder_attention_mask``, so mitigation and statistics apply
there too.
"""

from __future__ import annotations

import math

import torch

__all__ = ["cross_attention", "attention_probs", "bos_factor"]


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def bos_factor(bos_scale: torch.Tensor, Nk: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, Nk) multipliers of the logits: bos_scale[b] at key 0, 1 elsewhere. Used by the
    forward (s * f) and by the backward of the compiled op (dS * f)."""
    factor = torch.ones(bos_scale.shape[0], 1, 1, Nk, dtype=dtype, device=bos_scale.device)
    factor[:, 0, 0, 0] = bos_scale.to(dtype)
    return factor


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    key_len: torch.Tensor | None = None,
    bos_scale: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(p, s)``: probabilities and masked logits, both (B, H, Nq, Nk) in fp32/fp64.

    ``s`` holds -inf at masked keys. Rows with every key masked have ``p = 0``. ``key_mask``:
    (B, Nk) bool, False = masked (on top of ``key_len``).
    """
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    mdt = _math_dtype(q.dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    qf = q.to(mdt).permute(0, 2, 1, 3)  # (B, H, Nq, D)
    kf = k.to(mdt).permute(0, 2, 1, 3)  # (B, H, Nk, D)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if bos_scale is not None:
        s = s * bos_factor(bos_scale, Nk, mdt)
    keep = None
    if key_len is not None:
        keep = torch.arange(Nk, device=q.device)[None, :] < key_len.to(q.device).long()[:, None]
    if key_mask is not None:
        km = key_mask.to(device=q.device, dtype=torch.bool)
        keep = km if keep is None else keep & km
    # A NaN or infinite logit among a row's unmasked keys makes the whole row NaN (the
    # kernels do the same; max() and exp() would otherwise treat it inconsistently).
    bad = ~torch.isfinite(s)
    if keep is not None:
        bad = bad & keep[:, None, None, :]
    bad_row = bad.any(dim=-1, keepdim=True)
    if keep is not None:
        s = torch.where(keep[:, None, None, :], s, torch.full_like(s, -math.inf))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = torch.where(denom > 0, e / denom.clamp_min(torch.finfo(mdt).tiny), torch.zeros_like(e))
    nan_at = bad_row if keep is None else bad_row & keep[:, None, None, :]  # masked stay 0
    p = torch.where(nan_at, torch.full_like(p, math.nan), p)
    return p, s


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_len: torch.Tensor | None = None,
    bos_scale: torch.Tensor | None = None,
    scale: float | None = None,
    stats: bool = True,
    row_entropy: bool = False,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference implementation of the op contract.

    q: (B, Nq, H, D); k, v: (B, Nk, H, D) (any Nk >= 1); key_mask: (B, Nk) bool or None.
    Returns (out, prob_sum, ent_sum, row_ent) with out (B, Nq, H, D) in q's dtype, prob_sum
    (B, H, Nk) fp32, ent_sum (B, H) fp32 and row_ent (B, H, Nq) fp32. Statistics that were not
    asked for come back as empty tensors.
    """
    p, s = attention_probs(
        q, k, key_len=key_len, bos_scale=bos_scale, scale=scale, key_mask=key_mask
    )
    vf = v.to(p.dtype).permute(0, 2, 1, 3)  # (B, H, Nk, D)
    out = torch.matmul(p, vf).permute(0, 2, 1, 3).to(q.dtype).contiguous()
    empty = q.new_empty((0,), dtype=torch.float32)
    prob_sum = ent_sum = row_ent = empty
    if stats or row_entropy:
        with torch.no_grad():
            pd = p.detach()
            plogp = torch.where(
                pd == 0, 0.0, pd * torch.log(pd.clamp_min(torch.finfo(pd.dtype).tiny))
            )  # a NaN row stays NaN
            ent = -plogp.sum(dim=-1)  # (B, H, Nq)
            if stats:
                prob_sum = pd.sum(dim=2).float()
                ent_sum = ent.sum(dim=-1).float()
            if row_entropy:
                row_ent = ent.float()
    return out, prob_sum, ent_sum, row_ent
