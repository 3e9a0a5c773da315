"""A NaN or an infinity in the op's input gives the same answer from every compiled CPU path
and from the reference: the rows it reaches are NaN (output, probabilities, entropy), masked
keys keep probability 0, rows it does not reach are unchanged."""

from __future__ import annotations

import math

import pytest
import torch

import attnmem
from attnmem import _ext, reference

pytestmark = pytest.mark.skipif(_ext.extension() is None, reason="compiled extension not built")

B, Nq, H, D, Nk = 2, 5, 2, 40, 77


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, n, H, D, generator=g).to(dtype) for n in (Nq, Nk, Nk)]


CASES = [
    ("q", (0, 1, 0, 3), math.nan),
    ("q", (1, 2, 1, 0), math.inf),
    ("k", (0, 4, 1, 7), math.nan),  # unmasked key: every row of (b 0, head 1)
    ("k", (1, 3, 0, 2), -math.inf),
    ("k", (0, 70, 0, 1), math.nan),  # masked key (key_len 12 for b 0): no effect
    ("v", (1, 5, 1, 9), math.nan),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("where, index, value", CASES, ids=lambda c: str(c))
def test_kernel_and_reference_agree_on_non_finite_input(cpu_isa, dtype, where, index, value):
    q, k, v = inputs(dtype)
    {"q": q, "k": k, "v": v}[where][index] = value
    key_len = torch.tensor([12, 77])
    bos = torch.tensor([1.25, 1.0])
    got = attnmem.cross_attention(q, k, v, key_len=key_len, bos_scale=bos, row_entropy=True)
    want = reference.cross_attention(q, k, v, key_len=key_len, bos_scale=bos, row_entropy=True)
    for name, g, w in zip(("out", "prob_sum", "ent_sum", "row_ent"), got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w)), name  # the same NaNs
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, equal_nan=True, msg=name)
    masked = where == "k" and index[0] == 0 and index[1] >= 12
    if masked:
        assert not torch.isnan(got[0]).any()  # a masked key is never read
    elif where != "v":
        assert torch.isnan(got[3]).any()  # the reached rows say so
        assert (got[1][0, :, 12:] == 0).all()  # masked keys keep probability 0
