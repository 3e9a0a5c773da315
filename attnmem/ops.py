"""The fused cross-attention op: typed wrapper, fake kernel, autograd, fast-path reasons.

``cross_attention`` runs ``torch.ops.attnmem.cross_attention`` (C++ CPU / CUDA kernels) when a
compiled kernel can take the input, and the pure-PyTorch :mod:`attnmem.reference` otherwise.
:func:`fast_path_reasons` lists why the kernel would be refused; under :func:`strict` (or
``ATTNMEM_STRICT=1``) a refusal raises instead of falling back.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from attnmem import _ext, reference

__all__ = [
    "cross_attention",
    "fast_path_reasons",
    "strict",
    "is_strict",
    "validate_inputs",
    "CPU_DTYPES",
    "CUDA_DTYPES",
]

MAX_KEYS = 128
CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# A context variable, so strict() in one thread (or asyncio task) leaves the others alone.
_strict: ContextVar[bool] = ContextVar(
    "attnmem_strict", default=os.environ.get("ATTNMEM_STRICT", "0") == "1"
)
_force_reference = os.environ.get("ATTNMEM_FORCE_REFERENCE", "0") == "1"


@contextlib.contextmanager
def strict(enabled: bool = True) -> Iterator[None]:
    """Within this block, an input the compiled kernels refuse raises ``RuntimeError`` (with every
    reason) instead of silently running the reference. Per thread / task (a ``ContextVar``)."""
    token = _strict.set(enabled)
    try:
        yield
    finally:
        _strict.reset(token)


def is_strict() -> bool:
    """Whether :func:`strict` (or ``ATTNMEM_STRICT=1``) is in force here."""
    return _strict.get()


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------
def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validate_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_len: torch.Tensor | None,
    bos_scale: torch.Tensor | None,
    scale: float | None,
    *,
    check_values: bool = True,
) -> None:
    """Raise ``ValueError`` naming the argument and the expected shape/range on bad input.

    ``check_values`` also checks key_len's range and bos_scale's finiteness, which reads the
    values (a device sync on CUDA).
    """
    for name, t, dims in (
        ("q", q, "(B, Nq, H, D)"),
        ("k", k, "(B, Nk, H, D)"),
        ("v", v, "(B, Nk, H, D)"),
    ):
        if not isinstance(t, torch.Tensor):
            raise ValueError(
                f"cross_attention: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
        if t.dim() != 4:
            raise ValueError(f"cross_attention: {name} must be 4-D {dims}, got shape {_shape(t)}")
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(
            f"cross_attention: k must have shape (B, Nk, H, D) = ({B}, Nk, {H}, {D}) to match q "
            f"{_shape(q)}, got {_shape(k)}"
        )
    if v.shape != k.shape:
        raise ValueError(
            f"cross_attention: v must have the shape of k {_shape(k)}, got {_shape(v)}"
        )
    if not 1 <= Nk <= MAX_KEYS:
        raise ValueError(f"cross_attention: k must have 1 <= Nk <= {MAX_KEYS} keys, got Nk = {Nk}")
    if D < 1:
        raise ValueError(f"cross_attention: head dim D must be >= 1, got {D}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"cross_attention: q must be a floating-point tensor, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"cross_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if k.device != q.device or v.device != q.device:
        raise ValueError(
            f"cross_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if key_len is not None:
        if not isinstance(key_len, torch.Tensor) or key_len.shape != (B,):
            got = _shape(key_len) if isinstance(key_len, torch.Tensor) else type(key_len).__name__
            raise ValueError(f"cross_attention: key_len must have shape (B,) = ({B},), got {got}")
        if (
            key_len.dtype.is_floating_point
            or key_len.dtype.is_complex
            or key_len.dtype == torch.bool
        ):
            raise ValueError(
                f"cross_attention: key_len must be an integer tensor, got {key_len.dtype}"
            )
        if key_len.device != q.device:
            raise ValueError(
                f"cross_attention: key_len must be on {q.device}, got {key_len.device}"
            )
        if check_values and B > 0:
            lo, hi = int(key_len.min()), int(key_len.max())
            if lo < 0 or hi > Nk:
                raise ValueError(
                    f"cross_attention: key_len values must lie in [0, Nk] = [0, {Nk}], "
                    f"got min {lo} max {hi}"
                )
    if bos_scale is not None:
        if not isinstance(bos_scale, torch.Tensor) or bos_scale.shape != (B,):
            got = (
                _shape(bos_scale)
                if isinstance(bos_scale, torch.Tensor)
                else type(bos_scale).__name__
            )
            raise ValueError(f"cross_attention: bos_scale must have shape (B,) = ({B},), got {got}")
        if not bos_scale.dtype.is_floating_point:
            raise ValueError(
                f"cross_attention: bos_scale must be floating point, got {bos_scale.dtype}"
            )
        if bos_scale.device != q.device:
            raise ValueError(
                f"cross_attention: bos_scale must be on {q.device}, got {bos_scale.device}"
            )
        if check_values and B > 0 and not bool(torch.isfinite(bos_scale).all()):
            raise ValueError(f"cross_attention: bos_scale must be finite, got {bos_scale.tolist()}")
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"cross_attention: scale must be finite, got {scale}")


# ------------------------------------------------------------------------------------------
# Fast path selection
# ------------------------------------------------------------------------------------------
@functools.cache
def _capability(index: int | None) -> tuple[int, int]:
    """Compute capability of a CUDA device, read once per device (checked on every call)."""
    return torch.cuda.get_device_capability(index)


@functools.cache
def cuda_target_runs_on(target: str, capability: tuple[int, int]) -> bool:
    """Whether code nvcc built for ``target`` ("sm_90", "sm_90a", "sm_100f", "compute_90") loads
    on a device of this compute capability. Machine code (sm_XY) runs on the same major version
    at an equal or higher minor; "a" targets only on that exact version. PTX (compute_XY) runs
    on that version and every newer one: the driver compiles it when the module loads."""
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", target)
    if m is None:
        return False
    kind, built, suffix = m[1], (int(m[2]), int(m[3])), m[4]
    if suffix == "a":
        return capability == built
    if kind == "sm" or suffix == "f":
        return capability[0] == built[0] and capability[1] >= built[1]
    return capability >= built


def cuda_kernel_reasons(
    dtype: torch.dtype,
    head_dim: int,
    capability: tuple[int, int],
    targets: tuple[str, ...],
    head_dims: tuple[int, ...],
    f32_max_head_dim: int,
) -> list[str]:
    """Why the compiled CUDA kernel would refuse this input on a device of ``capability``, given
    what the extension was built with (``_ext.cuda_targets()``, ``cuda_head_dims()``,
    ``cuda_f32_max_head_dim()``). Empty list: it runs."""
    reasons = []
    major, minor = capability
    if dtype not in CUDA_DTYPES:
        reasons.append(f"CUDA kernel takes float32/float16/bfloat16, got {dtype}")
    elif dtype == torch.float32:
        if not 1 <= head_dim <= f32_max_head_dim:
            reasons.append(
                f"CUDA kernel takes float32 head dims up to {f32_max_head_dim}, got D = {head_dim}"
            )
    elif head_dim not in head_dims:
        reasons.append(
            f"CUDA kernel takes {str(dtype).replace('torch.', '')} head dims {list(head_dims)}, "
            f"got D = {head_dim}"
        )
    if major < 8:
        reasons.append(f"CUDA kernel needs compute capability >= 8.0, device has {major}.{minor}")
    elif not any(cuda_target_runs_on(t, capability) for t in targets):
        reasons.append(
            f"attnmem._C has no CUDA kernel image for compute capability {major}.{minor} (built "
            f"for {', '.join(targets) or 'no target'}); rebuild with "
            f'TORCH_CUDA_ARCH_LIST="{major}.{minor}", or with PTX of an older arch ("9.0+PTX")'
        )
    return reasons


def fast_path_reasons(q: torch.Tensor, k: torch.Tensor | None = None) -> list[str]:
    """Why the compiled kernel would not run these inputs (empty list: it would)."""
    reasons: list[str] = []
    if _force_reference:
        reasons.append("ATTNMEM_FORCE_REFERENCE=1 is set")
    if _ext.extension() is None:
        reasons.append(f"the compiled extension attnmem._C is not loaded ({_ext.load_error()})")
        return reasons
    dev = q.device.type
    if dev == "cpu":
        if q.dtype not in CPU_DTYPES:
            reasons.append(f"CPU kernel takes float32/float16/bfloat16/float64, got {q.dtype}")
    elif dev == "cuda":
        if not _ext.has_kernel("cuda"):
            why = _ext.cuda_not_built()
            reasons.append(
                "attnmem._C was built without the CUDA kernel" + (f" ({why})" if why else "")
            )
        else:
            reasons += cuda_kernel_reasons(
                q.dtype,
                q.shape[-1],
                _capability(q.device.index),
                _ext.cuda_targets(),
                _ext.cuda_head_dims(),
                _ext.cuda_f32_max_head_dim(),
            )
    else:
        reasons.append(f"no compiled kernel for device type '{dev}'")
    return reasons


def _use_kernel(q: torch.Tensor) -> bool:
    reasons = fast_path_reasons(q)
    if reasons and _strict.get():
        raise RuntimeError(
            "attnmem.cross_attention: the compiled kernel cannot run this input: "
            + "; ".join(reasons)
        )
    return not reasons


# ------------------------------------------------------------------------------------------
# Op registration (fake kernel and autograd) when the compiled schema exists
# ------------------------------------------------------------------------------------------
_OP_NAME = "attnmem::cross_attention"


def _op_available() -> bool:
    return _ext.extension() is not None and hasattr(torch.ops.attnmem, "cross_attention")


def _fake(q, k, v, key_len, bos_scale, scale, stats, row_entropy):
    B, Nq, H, D = q.shape
    Nk = k.shape[1]
    out = q.new_empty((B, Nq, H, D))
    f32 = torch.float32
    prob_sum = q.new_empty((B, H, Nk), dtype=f32) if stats else q.new_empty((0,), dtype=f32)
    ent_sum = q.new_empty((B, H), dtype=f32) if stats else q.new_empty((0,), dtype=f32)
    row_ent = q.new_empty((B, H, Nq), dtype=f32) if row_entropy else q.new_empty((0,), dtype=f32)
    return out, prob_sum, ent_sum, row_ent


def _setup_context(ctx, inputs, output):
    q, k, v, key_len, bos_scale, scale, _stats, _row_entropy = inputs
    ctx.has_key_len = key_len is not None
    ctx.has_bos = bos_scale is not None
    ctx.scale = scale
    ctx.save_for_backward(
        q,
        k,
        v,
        key_len if key_len is not None else q.new_empty(0),
        bos_scale if bos_scale is not None else q.new_empty(0),
    )


def _backward(ctx, grad_out, _g_prob_sum, _g_ent_sum, _g_row_ent):
    """Recompute P from (q, k, mask, rescale) and apply the softmax-attention VJP in fp32.

    With s = scale * (q k^T) * f (f_0 = bos_scale, else 1) and P = softmax(s):
      dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dP * P)),  dq = scale (dS * f) K,
      dk = scale (dS * f)^T q.  Masked keys have P = 0, hence dS = 0 there.
    """
    q, k, v, key_len, bos_scale = ctx.saved_tensors
    key_len = key_len if ctx.has_key_len else None
    bos_scale = bos_scale if ctx.has_bos else None
    scale = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(q.shape[-1])
    p, _ = reference.attention_probs(q, k, key_len=key_len, bos_scale=bos_scale, scale=scale)
    mdt = p.dtype
    go = grad_out.to(mdt).permute(0, 2, 1, 3)  # (B, H, Nq, D)
    qf = q.to(mdt).permute(0, 2, 1, 3)
    kf = k.to(mdt).permute(0, 2, 1, 3)
    vf = v.to(mdt).permute(0, 2, 1, 3)
    dv = torch.matmul(p.transpose(-1, -2), go)
    dp = torch.matmul(go, vf.transpose(-1, -2))
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    if bos_scale is not None:
        ds = ds * reference.bos_factor(bos_scale, k.shape[1], mdt)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
    return (
        dq.permute(0, 2, 1, 3).to(q.dtype),
        dk.permute(0, 2, 1, 3).to(k.dtype),
        dv.permute(0, 2, 1, 3).to(v.dtype),
        None,
        None,
        None,
        None,
        None,
    )


if _op_available():
    torch.library.register_fake(_OP_NAME)(_fake)
    torch.library.register_autograd(_OP_NAME, _backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# Public wrapper
# ------------------------------------------------------------------------------------------
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused cross-attention that also returns attention statistics (docs/method.md §2).

    Args:
        q: (B, Nq, H, D) queries, float32/float16/bfloat16 (float64 on CPU); any strides.
        k, v: (B, Nk, H, D) keys and values, same dtype and device, 1 <= Nk <= 128.
        key_len: (B,) integer tensor or None. Keys j >= key_len[b] are masked for batch row b;
            key_len[b] = 0 masks the whole row (output and statistics are zero).
        bos_scale: (B,) float tensor or None. The logit of key 0 is *multiplied* by
            bos_scale[b] (before the mask). If that logit is negative, a factor > 1 lowers
            key 0's attention.
        scale: logit scale, default 1/sqrt(D).
        stats: compute prob_sum and ent_sum (otherwise they are empty tensors).
        row_entropy: also return the entropy of every query row.

    Returns:
        out: (B, Nq, H, D) in q's dtype, contiguous (``out.flatten(2)`` is free).
        prob_sum: (B, H, Nk) float32, sum over queries of the attention probabilities.
        ent_sum: (B, H) float32, sum over queries of each row's entropy (natural log).
        row_ent: (B, H, Nq) float32 when ``row_entropy`` else empty.

    Logits and softmax are computed in fp32 whatever the input dtype. ``out`` is
    differentiable with respect to q, k, v; the statistics are not.
    """
    validate_inputs(
        q, k, v, key_len, bos_scale, scale, check_values=not torch.compiler.is_compiling()
    )
    if key_len is not None and key_len.dtype != torch.int64:
        key_len = key_len.long()
    if bos_scale is not None and bos_scale.dtype != torch.float32:
        bos_scale = bos_scale.float()
    return _dispatch(q, k, v, key_len, bos_scale, scale, stats, row_entropy)


def _dispatch(q, k, v, key_len, bos_scale, scale, stats, row_entropy):
    if _use_kernel(q):
        out, prob_sum, ent_sum, row_ent = torch.ops.attnmem.cross_attention.default(
            q, k, v, key_len, bos_scale, scale, stats, row_entropy
        )
        return out, prob_sum.detach(), ent_sum.detach(), row_ent.detach()
    return reference.cross_attention(
        q,
        k,
        v,
        key_len=key_len,
        bos_scale=bos_scale,
        scale=scale,
        stats=stats,
        row_entropy=row_entropy,
    )


def cross_attention_unchecked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_len: torch.Tensor | None,
    bos_scale: torch.Tensor | None,
    scale: float | None,
    stats: bool,
    row_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op without value checks (no device sync): for callers that built key_len (int64) and
    bos_scale (float32) themselves from validated host values, such as the diffusers processor."""
    return _dispatch(q, k, v, key_len, bos_scale, scale, stats, row_entropy)
