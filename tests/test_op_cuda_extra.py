"""CUDA-only behaviour of attnmem::cross_attention (the device x dtype x shape matrix is in
test_op.py): strided and misaligned inputs (vector vs element loads), key padding classes (80 vs
128), masks and BOS rescale, multi-chunk statistics, determinism, empty statistics, streams,
the fp32 kernel's head dims, the raw op's device asserts, the shared-memory cap knob and
concurrent launches.

Shapes, layouts and the tolerance rule come from attnmem.testing (the one op-case table). Every
test is skipped visibly without a GPU or without the compiled CUDA kernel.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from attnmem import _ext, reference
from attnmem.testing import (
    DTYPE_NAMES,
    LAYOUTS,
    TILING_SHAPES,
    OpInputs,
    assert_matches_reference,
    case_grid,
    make_qkv,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and _ext.has_kernel("cuda")),
        reason="needs a CUDA device and attnmem._C built with its CUDA kernel",
    ),
]

DTYPES = ["fp16", "bf16", "fp32"]


def op(*args):
    """The raw compiled op (no wrapper, no fallback): the CUDA kernel itself."""
    return torch.ops.attnmem.cross_attention.default(*args)


def qkv(B, Nq, H, D, Nk, dtype_name, **kw):
    return make_qkv(B, Nq, H, D, Nk, dtype=DTYPE_NAMES[dtype_name], device="cuda", **kw)


def check(x: OpInputs, row_entropy: bool = True):
    """The raw op on x, judged by the one tolerance rule; returns (out, prob_sum, ent_sum)."""
    res = op(*x.raw_args(stats=True, row_entropy=row_entropy))
    assert_matches_reference(res, x, row_entropy=row_entropy)
    return res[:3]


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("shape", TILING_SHAPES, ids=lambda s: "B{}-Nq{}-H{}-D{}-Nk{}".format(*s))
def test_cuda_matches_reference(shape, dtype_name):
    check(OpInputs(*qkv(*shape, dtype_name)))


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_cuda_masks_bos_and_empty_rows(dtype_name):
    q, k, v = qkv(4, 70, 2, 64, 77, dtype_name)
    key_len = torch.tensor([0, 1, 17, 77], device="cuda", dtype=torch.int32)  # any integer dtype
    bos = torch.tensor([1.25, 0.5, 2.0, 1.0], device="cuda")
    out, ps, es = check(OpInputs(q, k, v, key_len, bos))
    assert out[0].abs().max() == 0 and ps[0].abs().max() == 0 and es[0].abs().max() == 0
    assert ps[1, :, 1:].abs().max() == 0  # only key 0 is unmasked
    assert ps[2, :, 17:].abs().max() == 0


@pytest.mark.parametrize(
    "case",
    case_grid([(45, 77, 40)], [torch.float16, torch.bfloat16], layouts=LAYOUTS, H=3),
    ids=lambda c: c.id,
)
def test_cuda_strided_inputs(case):
    """Vector (16-byte) and element loads give the same answer as the reference."""
    check(case.inputs("cuda"))


@pytest.mark.parametrize("dtype_name", DTYPES)
def test_cuda_statistics_bit_identical_run_to_run(dtype_name):
    q, k, v = qkv(2, 3000, 4, 64, 77, dtype_name)
    first = op(q, k, v, None, None, None, True, True)
    for _ in range(3):
        again = op(q, k, v, None, None, None, True, True)
        for a, b in zip(first, again):
            assert torch.equal(a, b)
    # every row's probabilities sum to 1: the per-(b, h) total is Nq
    torch.testing.assert_close(
        first[1].sum(-1), torch.full_like(first[2], 3000.0), rtol=1e-5, atol=0
    )


def test_cuda_empty_statistics_and_row_entropy():
    q, k, v = qkv(2, 50, 2, 80, 77, "fp16")
    out, ps, es, re = op(q, k, v, None, None, None, False, False)
    assert ps.shape == (0,) and es.shape == (0,) and re.shape == (0,)
    assert ps.dtype == es.dtype == re.dtype == torch.float32
    out2, _, _, re2 = op(q, k, v, None, None, None, False, True)
    assert torch.equal(out, out2) and re2.shape == (2, 2, 50)
    empty = op(q[:, :0], k, v, None, None, None, True, True)  # Nq = 0: zero sums
    assert (
        empty[0].shape == (2, 0, 2, 80) and empty[1].abs().sum() == 0 and empty[2].shape == (2, 2)
    )


def test_cuda_large_logits_stay_finite_in_fp16():
    """SD2-768-like magnitudes: q.k exceeds fp16's range, the kernel's fp32 logits do not."""
    q, k, v = qkv(1, 64, 2, 64, 77, "fp16", magnitude=40.0)
    check(OpInputs(q, k, v, scale=1.0))


def test_cuda_unsupported_head_dim_is_refused_then_wrapper_falls_back():
    import attnmem

    q, k, v = qkv(1, 8, 1, 48, 7, "fp16")
    with pytest.raises(RuntimeError, match="head dim"):
        op(q, k, v, None, None, None, True, False)
    assert attnmem.fast_path_reasons(q)
    out = attnmem.cross_attention(q, k, v)[0]
    torch.testing.assert_close(out, reference.cross_attention(q, k, v)[0])


def test_cuda_side_stream_and_second_device_guard():
    q, k, v = qkv(2, 128, 2, 64, 77, "bf16")
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


@pytest.mark.parametrize("D", [8, 24, 72, 100, 152])
def test_cuda_fp32_kernel_takes_any_head_dim(D):
    import attnmem

    q, k, v = qkv(2, 70, 2, D, 77, "fp32")
    assert attnmem.fast_path_reasons(q) == []
    key_len = torch.tensor([77, 20], device="cuda")
    bos = torch.tensor([1.25, 0.8], device="cuda")
    check(OpInputs(q, k, v, key_len, bos))


BAD_VALUES = {  # key_len, bos_scale for a batch of 2 with Nk = 77, as Python source
    "key_len-above-Nk": ("torch.tensor([78, 77], device='cuda')", "None"),
    "key_len-negative": ("torch.tensor([-1, 77], device='cuda')", "None"),
    "bos-nan": ("None", "torch.tensor([1.0, float('nan')], device='cuda')"),
    "bos-inf": ("None", "torch.tensor([float('inf'), 1.0], device='cuda')"),
}


@pytest.mark.parametrize("dtype_name", ["fp16", "fp32"])
@pytest.mark.parametrize("bad", list(BAD_VALUES))
def test_cuda_raw_op_device_asserts_on_bad_values(bad, dtype_name):
    """The raw op (no Python validation) stops at a device assert rather than clamping key_len
    or returning NaN rows. A device assert poisons the CUDA context, so it runs in a child."""
    key_len, bos = BAD_VALUES[bad]
    code = f"""
import torch, attnmem
q, k, v = (torch.randn(2, n, 1, 64, device="cuda").to({DTYPE_NAMES[dtype_name]}) for n in (20, 77, 77))
torch.ops.attnmem.cross_attention(q, k, v, {key_len}, {bos}, None, True, False)
torch.cuda.synchronize()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "device-side assert" in r.stderr, r.stderr[-2000:]


def test_cuda_smem_cap_knob_runs_the_smem_short_plans(monkeypatch):
    """ATTNMEM_CUDA_SMEM_OPTIN_CAP=101376 (a 99 KB part) picks fewer warps / no prefetch for
    D = 160 with 128 keys on an H100/H200; a cap no plan fits is refused by name."""
    x = OpInputs(*qkv(2, 4000, 4, 160, 128, "fp16"))
    monkeypatch.setenv("ATTNMEM_CUDA_SMEM_OPTIN_CAP", "101376")
    check(x)
    monkeypatch.setenv("ATTNMEM_CUDA_SMEM_OPTIN_CAP", "20000")
    with pytest.raises(RuntimeError, match="shared memory per block, the device allows 20000"):
        op(*x.raw_args(stats=True, row_entropy=False))
    monkeypatch.setenv("ATTNMEM_CUDA_SMEM_OPTIN_CAP", "99k")
    with pytest.raises(RuntimeError, match="must be a byte count"):
        op(*x.raw_args(stats=True, row_entropy=False))


def test_cuda_threads_launching_different_smem_sizes_do_not_race():
    """The shared-memory attribute is set once per (device, kernel) to the largest size: host
    threads launching one kernel with different plans never see an invalid argument (setting
    it per launch to that launch's size let them race)."""
    shapes = [(2, 4000, 8, 160, 128), (1, 16, 1, 160, 128), (2, 4000, 8, 40, 77), (1, 8, 1, 40, 77)]
    inputs = [qkv(*s, "fp16") for s in shapes]
    expect = [op(*x, None, None, None, True, False) for x in inputs]
    torch.cuda.synchronize()  # the workers' streams read these
    errors = []

    def worker(i):
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                for _ in range(50):
                    got = op(*inputs[i], None, None, None, True, False)
                torch.cuda.current_stream().synchronize()
            assert torch.equal(got[0], expect[i][0]) and torch.equal(got[1], expect[i][1])
        except Exception as e:  # raised in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i % len(inputs),)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
