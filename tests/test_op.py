"""attnmem.cross_attention against the reference oracle (attnmem/reference.py).

Shapes, input layouts, masks and the tolerance rule come from attnmem.testing (the one op-case
table): every comparison is against the reference evaluated in float64 on the same (rounded)
inputs; for half precision the output follows flash-attention's rule (the kernel's error is at
most 2x PyTorch's own error at that dtype).
"""

from __future__ import annotations

import pytest
import torch

import attnmem
from attnmem import _ext, ops, reference
from attnmem.testing import (
    DTYPES,
    LAYOUTS,
    SHAPES,
    OpCase,
    OpInputs,
    assert_matches_reference,
    dtype_id,
    make_masks,
    make_qkv,
    shape_id,
)

HAS_C = _ext.extension() is not None
needs_c = pytest.mark.skipif(not HAS_C, reason=f"attnmem._C not loaded: {_ext.load_error()}")


# ------------------------------------------------------------------------------------------
# Kernel vs reference
# ------------------------------------------------------------------------------------------
def check(x: OpInputs, row_entropy: bool = False) -> None:
    """Run the op on x and judge it with the one tolerance rule (attnmem.testing)."""
    res = attnmem.cross_attention(*x.qkv, **x.kwargs, row_entropy=row_entropy)
    assert_matches_reference(res, x, row_entropy=row_entropy)


@pytest.mark.parametrize("mask", ["none", "keylen+bos"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(device, dtype, shape, mask):
    check(OpCase(*shape, dtype=dtype, mask=mask).inputs(device), row_entropy=True)


@pytest.mark.parametrize(
    "shape", [(4096, 77, 40), (97, 77, 80), (97, 5, 8), (33, 128, 24)], ids=shape_id
)
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=dtype_id)
def test_cpu_paths_match_reference(cpu_isa, dtype, shape):
    """Every CPU instruction-set path (AVX-512, AVX2, portable) against the reference."""
    case = OpCase(*shape, B=3, dtype=dtype, mask="with-empty", seed=1)  # key_len Nk, Nk/2, 0
    check(case.inputs("cpu"), row_entropy=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strided_inputs(device, layout):
    x = OpCase(130, 77, 40, H=3, layout=layout, mask="keylen+bos").inputs(device)
    check(x)
    # also a query with a non-unit stride along D next to keys and values of this layout
    q2 = make_qkv(2, 130, 3, 40, 77, device=device, layout="last-dim-strided", seed=1)[0]
    check(x._replace(q=q2))


def test_layouts_hold_the_same_values_in_the_strides_they_name():
    ref = make_qkv(2, 9, 3, 8, 5)
    for layout in LAYOUTS:
        q, k, v = make_qkv(2, 9, 3, 8, 5, layout=layout)
        assert torch.equal(q, ref[0])
        if layout == "expanded-kv":
            assert k.stride(0) == v.stride(0) == 0 and torch.equal(k[1], ref[1][0])
        else:
            assert torch.equal(k, ref[1]) and torch.equal(v, ref[2])
        assert q.is_contiguous() == (layout not in ("heads-major", "last-dim-strided")), layout
    assert make_qkv(2, 9, 3, 8, 5, layout="fused-kv")[1].stride(1) == 2 * 3 * 8
    assert make_qkv(2, 9, 3, 8, 5, layout="last-dim-strided")[0].stride(-1) == 2
    assert make_qkv(2, 9, 3, 8, 5, layout="misaligned")[1].storage_offset() == 3


def test_custom_scale(device):
    check(OpCase(50, 9, 16, scale=0.3).inputs(device))


def test_fully_masked_rows_are_zero(device):
    q, k, v = make_qkv(2, 64, 2, 40, 77, device=device)
    key_len = torch.tensor([0, 77], device=device)
    out, prob_sum, ent_sum, row_ent = attnmem.cross_attention(
        q, k, v, key_len=key_len, row_entropy=True
    )
    for t in (out, prob_sum, ent_sum, row_ent):
        assert torch.isfinite(t).all()
    assert (out[0] == 0).all() and (prob_sum[0] == 0).all() and (ent_sum[0] == 0).all()
    assert (row_ent[0] == 0).all()
    # the unmasked batch row is a proper distribution per query
    torch.testing.assert_close(
        prob_sum[1].sum(-1), torch.full((2,), 64.0, device=device), rtol=1e-5, atol=1e-3
    )


def test_bos_scale_one_is_no_rescale(device):
    q, k, v = make_qkv(2, 100, 2, 40, 77, device=device)
    a = attnmem.cross_attention(q, k, v, bos_scale=torch.ones(2, device=device))
    b = attnmem.cross_attention(q, k, v)
    c = attnmem.cross_attention(q, k, v, key_len=torch.tensor([77, 77], device=device))
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_bos_scale_is_a_multiplication(device):
    """With all logits of key 0 made negative, bos_scale > 1 must lower key 0's attention (docs/method.md §5)."""
    q, k, v = make_qkv(1, 64, 1, 8, 5, device=device)
    q = q.abs()
    k = k.clone()
    k[:, 0] = -1.0  # <q_i, k_0> < 0 for every row
    base = attnmem.cross_attention(q, k, v)[1][0, 0, 0]
    up = attnmem.cross_attention(q, k, v, bos_scale=torch.tensor([1.5], device=device))[1][0, 0, 0]
    assert up < base


def test_stats_flags(device):
    q, k, v = make_qkv(2, 20, 2, 8, 5, device=device)
    out, ps, es, re = attnmem.cross_attention(q, k, v, stats=False)
    assert ps.numel() == 0 and es.numel() == 0 and re.numel() == 0
    out2, ps2, es2, re2 = attnmem.cross_attention(q, k, v, stats=True, row_entropy=True)
    assert (
        torch.equal(out, out2)
        and ps2.shape == (2, 2, 5)
        and es2.shape == (2, 2)
        and re2.shape == (2, 2, 20)
    )
    torch.testing.assert_close(re2.sum(-1), es2, rtol=1e-5, atol=1e-5)


def test_empty_query(device):
    q, k, v = make_qkv(2, 0, 2, 8, 5, device=device)
    out, ps, es, _ = attnmem.cross_attention(q, k, v)
    assert out.shape == (2, 0, 2, 8) and (ps == 0).all() and (es == 0).all()


def test_inference_mode_and_no_grad(device):
    q, k, v = make_qkv(2, 20, 2, 8, 5, device=device)
    ref = attnmem.cross_attention(q, k, v)
    with torch.inference_mode():
        a = attnmem.cross_attention(q, k, v)
    with torch.no_grad():
        b = attnmem.cross_attention(q, k, v)
    for x, y, z in zip(ref, a, b):
        assert torch.equal(x, y) and torch.equal(x, z)


# ------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------
def test_bit_identical_across_thread_counts():
    q, k, v = make_qkv(2, 1000, 3, 40, 77, device="cpu")
    key_len, bos = make_masks(2, 77, "keylen+bos", "cpu")
    old = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            runs.append(
                attnmem.cross_attention(q, k, v, key_len=key_len, bos_scale=bos, row_entropy=True)
            )
    finally:
        torch.set_num_threads(old)
    for other in runs[1:]:
        for x, y in zip(runs[0], other):
            assert torch.equal(x, y)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_cuda_bit_identical_run_to_run(dtype):
    q, k, v = make_qkv(16, 4096, 8, 40, 77, dtype=dtype, device="cuda")
    key_len, bos = make_masks(16, 77, "keylen+bos", "cuda")
    a = attnmem.cross_attention(q, k, v, key_len=key_len, bos_scale=bos, row_entropy=True)
    b = attnmem.cross_attention(q, k, v, key_len=key_len, bos_scale=bos, row_entropy=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------------
# Autograd, opcheck, torch.compile
# ------------------------------------------------------------------------------------------
@needs_c
def test_gradcheck_float64_with_mask_and_rescale():
    g = torch.Generator().manual_seed(3)
    B, Nq, H, D, Nk = 3, 5, 2, 4, 6
    q, k, v = (
        torch.randn(B, n, H, D, generator=g, dtype=torch.float64, requires_grad=True)
        for n in (Nq, Nk, Nk)
    )
    key_len = torch.tensor([6, 3, 0])
    bos = torch.tensor([1.3, 0.7, 1.0])
    assert not ops.fast_path_reasons(
        q
    )  # the compiled op (with its autograd formula) is what we check

    def f(q, k, v):
        return attnmem.cross_attention(q, k, v, key_len=key_len, bos_scale=bos)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_grad_matches_reference_float32(device):
    q, k, v = make_qkv(2, 70, 2, 40, 77, device=device)
    key_len, bos = make_masks(2, 77, "keylen+bos", device)
    gout = torch.randn_like(q)
    grads = []
    for fn in (attnmem.cross_attention, reference.cross_attention):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out, prob_sum, _, _ = fn(*leaves, key_len=key_len, bos_scale=bos)
        assert not prob_sum.requires_grad  # statistics are not differentiable
        out.backward(gout)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@needs_c
def test_opcheck():
    q, k, v = make_qkv(2, 33, 2, 8, 5, device="cpu")
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    key_len = torch.tensor([5, 2])
    bos = torch.tensor([1.25, 1.0])
    for args in [
        (q, k, v, key_len, bos, None, True, True),
        (q, k, v, None, None, 0.5, False, False),
    ]:
        torch.library.opcheck(torch.ops.attnmem.cross_attention.default, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    q, k, v = make_qkv(2, 64, 2, 40, 77, device="cpu")
    key_len, bos = make_masks(2, 77, "keylen+bos", "cpu")

    def f(q, k, v, key_len, bos):
        out, prob_sum, ent_sum, _ = attnmem.cross_attention(q, k, v, key_len=key_len, bos_scale=bos)
        return out * 2, prob_sum / q.shape[1], ent_sum

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    for x, y in zip(compiled(q, k, v, key_len, bos), f(q, k, v, key_len, bos)):
        torch.testing.assert_close(x, y)


# ------------------------------------------------------------------------------------------
# Fallback and reasons
# ------------------------------------------------------------------------------------------
def test_fallback_without_extension(monkeypatch):
    q, k, v = make_qkv(2, 20, 2, 8, 5, device="cpu")
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_error", "ImportError: simulated")
    reasons = ops.fast_path_reasons(q)
    assert reasons and "not loaded" in reasons[0] and "simulated" in reasons[0]
    check(OpInputs(q, k, v))
    with ops.strict(), pytest.raises(RuntimeError, match="cannot run this input.*not loaded"):
        attnmem.cross_attention(q, k, v)


def test_strict_mode_is_per_thread(monkeypatch):
    """strict() in one thread does not make another thread's calls raise."""
    import threading

    q, k, v = make_qkv(2, 20, 2, 8, 5)
    monkeypatch.setattr(_ext, "_C", None)  # every call would need the reference
    monkeypatch.setattr(_ext, "_error", "ImportError: simulated")
    entered, release = threading.Event(), threading.Event()

    def strict_elsewhere():
        with ops.strict():
            entered.set()
            release.wait(30)

    t = threading.Thread(target=strict_elsewhere)
    t.start()
    try:
        assert entered.wait(30)
        check(OpInputs(q, k, v))  # not strict here: the reference runs
    finally:
        release.set()
        t.join()


@needs_c
def test_no_reasons_for_supported_cpu_input():
    for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert ops.fast_path_reasons(torch.empty(1, 2, 1, 8, dtype=dt)) == []


def test_info_runs():
    from attnmem import info

    text = info.report()
    assert "attnmem" in text and "fast path" in text


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------
def _good(**over):
    a = dict(
        q=torch.randn(2, 10, 2, 8),
        k=torch.randn(2, 5, 2, 8),
        v=torch.randn(2, 5, 2, 8),
        key_len=torch.tensor([5, 3]),
        bos_scale=torch.tensor([1.0, 1.25]),
    )
    a.update(over)
    return a


BAD = [
    ("q-rank", dict(q=torch.randn(2, 10, 16)), r"q must be 4-D \(B, Nq, H, D\)"),
    ("k-rank", dict(k=torch.randn(2, 5, 16)), r"k must be 4-D"),
    (
        "k-batch",
        dict(k=torch.randn(3, 5, 2, 8), v=torch.randn(3, 5, 2, 8)),
        r"k must have shape \(B, Nk, H, D\) = \(2, Nk, 2, 8\)",
    ),
    ("k-heads", dict(k=torch.randn(2, 5, 3, 8), v=torch.randn(2, 5, 3, 8)), r"k must have shape"),
    ("k-dim", dict(k=torch.randn(2, 5, 2, 4), v=torch.randn(2, 5, 2, 4)), r"k must have shape"),
    ("v-shape", dict(v=torch.randn(2, 6, 2, 8)), r"v must have the shape of k"),
    (
        "too-many-keys",
        dict(k=torch.randn(2, 129, 2, 8), v=torch.randn(2, 129, 2, 8), key_len=None),
        r"Nk <= 128",
    ),
    (
        "no-keys",
        dict(k=torch.randn(2, 0, 2, 8), v=torch.randn(2, 0, 2, 8), key_len=None),
        r"1 <= Nk",
    ),
    ("dtype-mix", dict(k=torch.randn(2, 5, 2, 8, dtype=torch.float64)), r"share one dtype"),
    ("int-q", dict(q=torch.ones(2, 10, 2, 8, dtype=torch.int32)), r"floating-point"),
    ("keylen-shape", dict(key_len=torch.tensor([5])), r"key_len must have shape \(B,\) = \(2,\)"),
    ("keylen-float", dict(key_len=torch.tensor([5.0, 3.0])), r"key_len must be an integer tensor"),
    (
        "keylen-high",
        dict(key_len=torch.tensor([6, 3])),
        r"key_len values must lie in \[0, Nk\] = \[0, 5\]",
    ),
    (
        "keylen-negative",
        dict(key_len=torch.tensor([-1, 3])),
        r"key_len values must lie in \[0, Nk\]",
    ),
    (
        "bos-shape",
        dict(bos_scale=torch.tensor([1.0, 1.0, 1.0])),
        r"bos_scale must have shape \(B,\) = \(2,\)",
    ),
    ("bos-inf", dict(bos_scale=torch.tensor([1.0, float("inf")])), r"bos_scale must be finite"),
    ("bos-nan", dict(bos_scale=torch.tensor([float("nan"), 1.0])), r"bos_scale must be finite"),
    ("bos-int", dict(bos_scale=torch.tensor([1, 1])), r"bos_scale must be floating point"),
]


@pytest.mark.parametrize("name,over,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_value_error(name, over, msg):
    a = _good(**over)
    with pytest.raises(ValueError, match=msg):
        attnmem.cross_attention(
            a["q"], a["k"], a["v"], key_len=a["key_len"], bos_scale=a["bos_scale"]
        )


def test_bad_scale_and_device():
    a = _good()
    with pytest.raises(ValueError, match="scale must be finite"):
        attnmem.cross_attention(a["q"], a["k"], a["v"], scale=float("nan"))
    with pytest.raises(ValueError, match="key_len must be on"):
        attnmem.cross_attention(a["q"], a["k"], a["v"], key_len=torch.tensor([5, 3], device="meta"))
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        attnmem.cross_attention(a["q"], a["k"].to("meta"), a["v"])


@needs_c
@pytest.mark.parametrize(
    "name,over,msg", [b for b in BAD if b[0] != "int-q"], ids=[b[0] for b in BAD if b[0] != "int-q"]
)
def test_bad_input_to_raw_op_raises_runtime_error(name, over, msg):
    """Direct torch.ops calls bypass the wrapper: the C++ checks must catch the same inputs."""
    a = _good(**over)
    bos = a["bos_scale"]
    if name == "bos-int":
        msg = "bos_scale must be float32"
    with pytest.raises(RuntimeError, match=msg.replace("must be an integer", "must be an integer")):
        torch.ops.attnmem.cross_attention.default(
            a["q"], a["k"], a["v"], a["key_len"], bos, None, True, False
        )
