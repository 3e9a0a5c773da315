"""CUDA-only behaviour of attnmem::cross_attention (the device x dtype x shape matrix is in
test_op.py): strided and misaligned inputs (vector vs element loads), key padding classes (80 vs
128), masks and BOS rescale, multi-chunk statistics, determinism, empty statistics, streams.

Every test is skipped visibly without a GPU or without the compiled CUDA kernel. Runs under
pytest, or as `python tests/test_op_cuda_extra.py` where pytest is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attnmem import _ext, reference  # noqa: E402

try:
    import pytest

    parametrize = pytest.mark.parametrize
    requires_cuda = pytest.mark.skipif(
        not (torch.cuda.is_available() and _ext.has_kernel("cuda")),
        reason="needs a CUDA device and attnmem._C built with its CUDA kernel",
    )
except ImportError:  # standalone runner below
    pytest = None

    def parametrize(names, values):
        def deco(fn):
            fn.params = [*getattr(fn, "params", []), (names, values)]
            return fn

        return deco

    def requires_cuda(fn):
        return fn


op = torch.ops.attnmem.cross_attention.default if _ext.extension() is not None else None
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Floor of the output tolerance (habit 1: error <= 2x PyTorch's own error at the dtype + floor).
OUT_FLOOR = {"fp16": 1e-3, "bf16": 8e-3, "fp32": 2e-5}


def rand(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)


def torch_out(q, k, v, key_len=None, bos_scale=None, scale=None):
    """The op's math with the dtype's own matmuls: what 'PyTorch's error' means here."""
    p, _ = reference.attention_probs(q, k, key_len=key_len, bos_scale=bos_scale, scale=scale)
    vh = v.transpose(1, 2)
    return torch.matmul(p.to(v.dtype), vh).transpose(1, 2)


def check(q, k, v, dtype_name, key_len=None, bos_scale=None, scale=None, row_entropy=True):
    out, ps, es, re = op(q, k, v, key_len, bos_scale, scale, True, row_entropy)
    kl = None if key_len is None else key_len.long()
    r_out, r_ps, r_es, r_re = reference.cross_attention(
        q, k, v, key_len=kl, bos_scale=bos_scale, scale=scale, stats=True, row_entropy=row_entropy
    )
    B, Nq, H, D = q.shape
    assert out.shape == (B, Nq, H, D) and out.dtype == q.dtype and out.is_contiguous()
    for t in (out, ps, es, re):
        assert torch.isfinite(t).all()
    ref32 = r_out.float()
    err = (out.float() - ref32).abs().max().item()
    t_err = (torch_out(q, k, v, kl, bos_scale, scale).float() - ref32).abs().max().item()
    assert err <= 2 * t_err + OUT_FLOOR[dtype_name], (err, t_err)
    n = max(Nq, 1)
    torch.testing.assert_close(
        ps / n, r_ps / n, atol=2e-4 if dtype_name != "fp32" else 1e-6, rtol=0
    )
    torch.testing.assert_close(
        es / n, r_es / n, atol=5e-3 if dtype_name != "fp32" else 1e-5, rtol=0
    )
    if row_entropy:
        torch.testing.assert_close(re, r_re, atol=2e-2 if dtype_name != "fp32" else 1e-4, rtol=0)
    return out, ps, es


SHAPES = [  # (B, Nq, H, D, Nk): SD shapes and odd ones (partial tiles, both key classes)
    (2, 97, 3, 40, 77),
    (1, 4096, 1, 40, 77),  # many chunks: second-stage reduction
    (2, 4000, 8, 40, 77),  # 8 tiles per CTA: Q prefetch (cp.async double buffer), partial tile
    (2, 64, 8, 160, 77),
    (1, 33, 2, 80, 128),  # Nk > 80: keys padded to 128
    (1, 16, 2, 128, 81),
    (3, 1, 2, 64, 1),
    (2, 300, 5, 64, 5),
]


@requires_cuda
@parametrize("dtype_name", list(DTYPES))
@parametrize("shape", SHAPES)
def test_cuda_matches_reference(shape, dtype_name):
    B, Nq, H, D, Nk = shape
    dt = DTYPES[dtype_name]
    q, k, v = (
        rand(B, Nq, H, D, dtype=dt),
        rand(B, Nk, H, D, dtype=dt, seed=1),
        rand(B, Nk, H, D, dtype=dt, seed=2),
    )
    check(q, k, v, dtype_name)


@requires_cuda
@parametrize("dtype_name", list(DTYPES))
def test_cuda_masks_bos_and_empty_rows(dtype_name):
    dt = DTYPES[dtype_name]
    B, Nq, H, D, Nk = 4, 70, 2, 64, 77
    q, k, v = (
        rand(B, Nq, H, D, dtype=dt),
        rand(B, Nk, H, D, dtype=dt, seed=1),
        rand(B, Nk, H, D, dtype=dt, seed=2),
    )
    key_len = torch.tensor([0, 1, 17, 77], device="cuda", dtype=torch.int32)  # any integer dtype
    bos = torch.tensor([1.25, 0.5, 2.0, 1.0], device="cuda")
    out, ps, es = check(q, k, v, dtype_name, key_len=key_len, bos_scale=bos)
    assert out[0].abs().max() == 0 and ps[0].abs().max() == 0 and es[0].abs().max() == 0
    assert ps[1, :, 1:].abs().max() == 0  # only key 0 is unmasked
    assert ps[2, :, 17:].abs().max() == 0


@requires_cuda
@parametrize("dtype_name", ["fp16", "bf16"])
@parametrize(
    "layout", ["diffusers-view", "heads-major", "last-dim-strided", "misaligned", "expanded-kv"]
)
def test_cuda_strided_inputs(layout, dtype_name):
    """Vector (16-byte) and element loads give the same answer as the reference."""
    dt = DTYPES[dtype_name]
    B, Nq, H, D, Nk = 2, 45, 3, 40, 77
    if layout == "diffusers-view":
        q = rand(B, Nq, H * D, dtype=dt).view(B, Nq, H, D)
        k = rand(B, Nk, H * D, dtype=dt, seed=1).view(B, Nk, H, D)
        v = rand(B, Nk, H * D, dtype=dt, seed=2).view(B, Nk, H, D)
    elif layout == "heads-major":
        q = rand(B, H, Nq, D, dtype=dt).transpose(1, 2)
        k = rand(B, H, Nk, D, dtype=dt, seed=1).transpose(1, 2)
        v = rand(B, H, Nk, D, dtype=dt, seed=2).transpose(1, 2)
    elif layout == "last-dim-strided":
        q = rand(B, Nq, H, 2 * D, dtype=dt)[..., ::2]
        k = rand(B, Nk, H, 2 * D, dtype=dt, seed=1)[..., ::2]
        v = rand(B, Nk, H, 2 * D, dtype=dt, seed=2)[..., 1::2]
    elif layout == "misaligned":
        q = rand(B * Nq * H * D + 1, dtype=dt)[1:].view(B, Nq, H, D)
        k = rand(B * Nk * H * D + 3, dtype=dt, seed=1)[3:].view(B, Nk, H, D)
        v = rand(B * Nk * H * D + 1, dtype=dt, seed=2)[1:].view(B, Nk, H, D)
    else:  # one prompt's keys shared by the batch (stride 0)
        q = rand(B, Nq, H, D, dtype=dt)
        k = rand(1, Nk, H, D, dtype=dt, seed=1).expand(B, Nk, H, D)
        v = rand(1, Nk, H, D, dtype=dt, seed=2).expand(B, Nk, H, D)
    check(q, k, v, dtype_name)


@requires_cuda
@parametrize("dtype_name", list(DTYPES))
def test_cuda_statistics_bit_identical_run_to_run(dtype_name):
    dt = DTYPES[dtype_name]
    q, k, v = (
        rand(2, 3000, 4, 64, dtype=dt),
        rand(2, 77, 4, 64, dtype=dt, seed=1),
        rand(2, 77, 4, 64, dtype=dt, seed=2),
    )
    first = op(q, k, v, None, None, None, True, True)
    for _ in range(3):
        again = op(q, k, v, None, None, None, True, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    # every row's probabilities sum to 1: the per-(b, h) total is Nq
    torch.testing.assert_close(
        first[1].sum(-1), torch.full_like(first[2], 3000.0), rtol=1e-5, atol=0
    )


@requires_cuda
def test_cuda_empty_statistics_and_row_entropy():
    q, k, v = (
        rand(2, 50, 2, 80, dtype=torch.float16),
        rand(2, 77, 2, 80, dtype=torch.float16),
        rand(2, 77, 2, 80, dtype=torch.float16),
    )
    out, ps, es, re = op(q, k, v, None, None, None, False, False)
    assert ps.shape == (0,) and es.shape == (0,) and re.shape == (0,)
    assert ps.dtype == es.dtype == re.dtype == torch.float32
    out2, _, _, re2 = op(q, k, v, None, None, None, False, True)
    assert torch.equal(out, out2) and re2.shape == (2, 2, 50)
    empty = op(q[:, :0], k, v, None, None, None, True, True)  # Nq = 0: zero sums
    assert (
        empty[0].shape == (2, 0, 2, 80) and empty[1].abs().sum() == 0 and empty[2].shape == (2, 2)
    )


@requires_cuda
def test_cuda_large_logits_stay_finite_in_fp16():
    """SD2-768-like magnitudes: q.k exceeds fp16's range, the kernel's fp32 logits do not."""
    q = rand(1, 64, 2, 64, dtype=torch.float16, scale=40.0)
    k = rand(1, 77, 2, 64, dtype=torch.float16, scale=40.0, seed=1)
    v = rand(1, 77, 2, 64, dtype=torch.float16, seed=2)
    check(q, k, v, "fp16", scale=1.0)


@requires_cuda
def test_cuda_unsupported_head_dim_is_refused_then_wrapper_falls_back():
    import attnmem

    q, k, v = (
        rand(1, 8, 1, 48, dtype=torch.float16),
        rand(1, 7, 1, 48, dtype=torch.float16),
        rand(1, 7, 1, 48, dtype=torch.float16),
    )
    try:
        op(q, k, v, None, None, None, True, False)
    except RuntimeError as e:
        assert "head dim" in str(e)
    else:
        raise AssertionError("D = 48 should be refused by the CUDA kernel")
    assert attnmem.fast_path_reasons(q)
    out = attnmem.cross_attention(q, k, v)[0]
    torch.testing.assert_close(out, reference.cross_attention(q, k, v)[0])


@requires_cuda
def test_cuda_side_stream_and_second_device_guard():
    q, k, v = (
        rand(2, 128, 2, 64, dtype=torch.bfloat16),
        rand(2, 77, 2, 64, dtype=torch.bfloat16),
        rand(2, 77, 2, 64, dtype=torch.bfloat16),
    )
    expect = op(q, k, v, None, None, None, True, False)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = op(q, k, v, None, None, None, True, False)
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(expect, got):
        assert torch.equal(a, b)
    if torch.cuda.device_count() > 1:  # q on cuda:1 while cuda:0 is current
        q1, k1, v1 = q.to("cuda:1"), k.to("cuda:1"), v.to("cuda:1")
        got1 = op(q1, k1, v1, None, None, None, True, False)
        assert got1[0].device == q1.device
        torch.testing.assert_close(got1[0].cpu(), expect[0].cpu())


def _main() -> int:
    """Minimal runner for machines without pytest."""
    if not (torch.cuda.is_available() and _ext.has_kernel("cuda")):
        print("SKIPPED: needs a CUDA device and attnmem._C built with its CUDA kernel")
        return 0
    failed = ran = 0
    for name, fn in sorted(globals().items()):
        if not (name.startswith("test_") and callable(fn)):
            continue
        combos = [{}]
        for names, values in getattr(fn, "params", []):
            combos = [dict(c, **{names: v}) for c in combos for v in values]
        for kw in combos:
            ran += 1
            try:
                fn(**kw)
            except Exception as e:  # report and go on
                failed += 1
                print(f"FAIL {name}{kw}: {type(e).__name__}: {e}")
    print(f"{ran - failed}/{ran} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
