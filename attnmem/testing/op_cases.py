"""The one table of op test cases and the one tolerance rule for ``attnmem::cross_attention``.

Every kernel test (``tests/test_op.py``, ``tests/test_op_cuda_extra.py``, the CUDA emulator
test) and both op benchmarks (``bench/op_cases.py``, ``bench/gpu_bench.py``) build their inputs
here and judge the kernel's answer with :func:`compare` / :func:`assert_matches_reference`, so
"correct" means the same thing everywhere.

**Shapes** (``(Nq, Nk, D)`` unless said otherwise):

- :data:`SD_LAYERS`: the ``attn2`` layers of SD1.x, SD2.x and SDXL at their native resolution,
  as :class:`SDLayer` ``(model, H, D, Nq)`` with Nk = 77 (the GPU benchmark's table);
- :data:`SD_SHAPES`: the four SD1.x layers as ``(Nq, 77, D)`` (Nq 4096/1024/256/64, D
  40/80/160), :data:`ODD_SHAPES`: partial tiles, few keys, odd head dims;
  :data:`SHAPES` = both;
- :data:`TILING_SHAPES`: ``(B, Nq, H, D, Nk)`` chosen for the CUDA launch plan (many chunks,
  Q prefetch, both key-padding classes, one key).

**Inputs**: :func:`make_qkv` draws q, k, v from a seeded CPU generator in float32 (so CPU, CUDA
and an emulator see the same values), then places them in one of :data:`LAYOUTS` in the
requested dtype and device. :func:`make_masks` gives ``key_len`` / ``bos_scale`` by kind
(:data:`MASKS`). :class:`OpCase` bundles one case and builds its :class:`OpInputs`.

**The tolerance rule** (:data:`TOLERANCES`, one row per dtype), applied by :func:`compare`:

- the reference is :mod:`attnmem.reference` evaluated in float64 on the same (rounded) inputs;
- float32 / float64 output: ``|out - ref| <= atol + rtol |ref|`` elementwise;
- float16 / bfloat16 output (flash-attention's rule): the largest error of ``out`` is at most
  2x PyTorch's own largest error at that dtype, plus a tiny floor. "PyTorch's own" is
  :func:`pytorch_attention`: logits and softmax in float32 (as the op's contract requires:
  SD2-768 logits overflow fp16), P rounded to the dtype and ``P @ V`` as a dtype matmul, which
  is what SDPA and flash attention do;
- statistics are float32 maths on the same inputs whatever the dtype: ``prob_sum / Nq`` and
  ``ent_sum / Nq`` (per-row means, so one tolerance fits every Nq) and ``row_ent`` must be
  within ``atol + rtol |ref|`` of the reference's.

Usage, in a test::

    from attnmem.testing import OpCase, SHAPES, assert_matches_reference

    for shape in SHAPES:
        x = OpCase(*shape, dtype=torch.float16, mask="keylen+bos").inputs("cuda")
        result = attnmem.cross_attention(*x.qkv, **x.kwargs, row_entropy=True)
        assert_matches_reference(result, x, row_entropy=True)   # AssertionError naming the errors

and in a benchmark, which reports instead of raising::

    verdict = compare(result, x)          # Comparison: .ok, .problems, str() for a table cell

``result`` is the op's ``(out, prob_sum, ent_sum, row_ent)``; ``out`` may also come flattened
as ``(B, Nq, H*D)`` and statistics may be ``None`` or empty (then they are not compared).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from attnmem import reference

__all__ = [
    "SDLayer",
    "SD_LAYERS",
    "SD_SHAPES",
    "ODD_SHAPES",
    "SHAPES",
    "TILING_SHAPES",
    "DTYPES",
    "DTYPE_NAMES",
    "LAYOUTS",
    "MASKS",
    "Tolerance",
    "TOLERANCES",
    "OpCase",
    "OpInputs",
    "case_grid",
    "Comparison",
    "make_qkv",
    "make_masks",
    "pytorch_attention",
    "compare",
    "assert_matches_reference",
    "shape_id",
    "dtype_id",
]


# ------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------
class SDLayer(NamedTuple):
    """One UNet level's cross-attention: Nq queries of H heads of dim D over 77 keys."""

    model: str
    H: int
    D: int
    Nq: int


SD_LAYERS: list[SDLayer] = [
    SDLayer("SD1.x", 8, 40, 4096),  # 512 px: 64x64 latents
    SDLayer("SD1.x", 8, 80, 1024),
    SDLayer("SD1.x", 8, 160, 256),
    SDLayer("SD1.x", 8, 160, 64),
    SDLayer("SD2.x", 5, 64, 9216),  # 768 px: 96x96 latents
    SDLayer("SD2.x", 10, 64, 2304),
    SDLayer("SD2.x", 20, 64, 576),
    SDLayer("SD2.x", 20, 64, 144),
    SDLayer("SDXL", 10, 64, 4096),  # 1024 px: 128x128 latents, attention from level 1
    SDLayer("SDXL", 20, 64, 1024),
]
NK = 77  # CLIP's context length: the keys of every SD cross-attention

SD_SHAPES: list[tuple[int, int, int]] = [
    (layer.Nq, NK, layer.D) for layer in SD_LAYERS if layer.model == "SD1.x"
]
ODD_SHAPES: list[tuple[int, int, int]] = [
    (97, 5, 8),  # partial tiles, few keys, the smallest vector width
    (97, 77, 40),
    (33, 128, 24),  # the most keys the op takes
    (5, 1, 17),  # one key: p = 1 exactly; D not a multiple of anything
    (1, 77, 64),  # one query
]
SHAPES = SD_SHAPES + ODD_SHAPES

# (B, Nq, H, D, Nk) for the CUDA kernel's launch plan (csrc/cuda): tile and chunk boundaries.
TILING_SHAPES: list[tuple[int, int, int, int, int]] = [
    (2, 97, 3, 40, 77),
    (1, 4096, 1, 40, 77),  # many chunks: second-stage reduction
    (2, 4000, 8, 40, 77),  # 8 tiles per CTA: Q prefetch (cp.async double buffer), partial tile
    (2, 64, 8, 160, 77),
    (1, 33, 2, 80, 128),  # Nk > 80: keys padded to 128
    (1, 16, 2, 128, 81),
    (3, 1, 2, 64, 1),
    (2, 300, 5, 64, 5),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_NAMES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}


def shape_id(shape: Sequence[int]) -> str:
    """Test id of an ``(Nq, Nk, D)`` shape: ``Nq4096-Nk77-D40``."""
    return f"Nq{shape[0]}-Nk{shape[1]}-D{shape[2]}"


def dtype_id(dtype: torch.dtype) -> str:
    """Test id of a dtype: ``float16``."""
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------
LAYOUTS = (
    "contiguous",  # (B, N, H, D) contiguous: diffusers' to_q/to_k/to_v outputs viewed per head
    "fused-kv",  # k, v: the two halves of one (B, Nk, 2*H*D) projection (fused kv): row stride 2HD
    "heads-major",  # (B, H, N, D) buffers seen as (B, N, H, D)
    "last-dim-strided",  # every other element along D (stride 2): no vector loads
    "misaligned",  # storage offset of 1 or 3 elements: rows not 16-byte aligned
    "expanded-kv",  # one prompt's k, v shared by the batch: batch stride 0
)
MASKS = (
    "none",  # key_len = bos_scale = None
    "keylen+bos",  # row 0: every key, bos_scale 1.25; row 1: half, bos_scale 0.8; others: none
    "with-empty",  # key_len Nk, half, 0 (fully masked), 1; bos_scale 1.25, 0.5, 2.0, 1.0 (cycled)
)


def _place(x: torch.Tensor, layout: str, dtype: torch.dtype, device, offset: int) -> torch.Tensor:
    """``x`` (B, N, H, D) float32 on the CPU, stored in ``layout`` as ``dtype`` on ``device``."""
    if layout == "contiguous":
        return x.to(device=device, dtype=dtype)
    if layout == "heads-major":
        return x.transpose(1, 2).contiguous().to(device=device, dtype=dtype).transpose(1, 2)
    if layout == "last-dim-strided":
        buf = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=dtype, device=device)
        buf[..., offset % 2 :: 2] = x.to(device=device, dtype=dtype)
        return buf[..., offset % 2 :: 2]
    if layout == "misaligned":
        flat = torch.zeros(x.numel() + offset, dtype=dtype, device=device)
        flat[offset:] = x.flatten().to(device=device, dtype=dtype)
        return flat[offset:].view(x.shape)
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def make_qkv(
    B: int,
    Nq: int,
    H: int,
    D: int,
    Nk: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    layout: str = "contiguous",
    seed: int = 0,
    magnitude: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, Nq, H, D) and k, v (B, Nk, H, D): standard normal values times ``magnitude``.

    The values come from a CPU generator seeded with ``seed``, in float32, so every device and
    every layout but ``expanded-kv`` (whose k, v repeat batch row 0) holds the same numbers;
    they are then rounded to ``dtype`` and stored on ``device`` in ``layout`` (see
    :data:`LAYOUTS`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Nq, H * D, generator=g).view(B, Nq, H, D) * magnitude
    k = torch.randn(B, Nk, H * D, generator=g).view(B, Nk, H, D) * magnitude
    v = torch.randn(B, Nk, H * D, generator=g).view(B, Nk, H, D)
    if layout == "expanded-kv":
        k, v = (t[:1].to(device=device, dtype=dtype).expand(B, Nk, H, D) for t in (k, v))
        return q.to(device=device, dtype=dtype), k, v
    if layout == "fused-kv":
        kv = torch.cat([k.flatten(2), v.flatten(2)], dim=-1).to(device=device, dtype=dtype)
        k, v = (t.view(B, Nk, H, D) for t in kv.chunk(2, dim=-1))
        return q.to(device=device, dtype=dtype), k, v
    return (
        _place(q, layout, dtype, device, offset=1),
        _place(k, layout, dtype, device, offset=3),
        _place(v, layout, dtype, device, offset=1),
    )


def make_masks(
    B: int, Nk: int, kind: str = "keylen+bos", device: str | torch.device = "cpu"
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(key_len (B,) int64, bos_scale (B,) float32)`` of a :data:`MASKS` kind."""
    if kind == "none":
        return None, None
    if kind == "keylen+bos":
        lens = [Nk, max(1, (Nk + 1) // 2)]
        bos = [1.25, 0.8]
        pad_len, pad_bos = Nk, 1.0
    elif kind == "with-empty":
        lens = [Nk, (Nk + 1) // 2, 0, 1]
        bos = [1.25, 0.5, 2.0, 1.0]
        pad_len = pad_bos = None
    else:
        raise ValueError(f"mask kind must be one of {MASKS}, got {kind!r}")
    if pad_len is None:
        lens = [lens[i % len(lens)] for i in range(B)]
        bos = [bos[i % len(bos)] for i in range(B)]
    else:
        lens = (lens + [pad_len] * B)[:B]
        bos = (bos + [pad_bos] * B)[:B]
    return (
        torch.tensor(lens, dtype=torch.int64, device=device),
        torch.tensor(bos, dtype=torch.float32, device=device),
    )


class OpInputs(NamedTuple):
    """One call's arguments: ``op(*x.qkv, **x.kwargs)``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_len: torch.Tensor | None = None
    bos_scale: torch.Tensor | None = None
    scale: float | None = None

    @property
    def qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q, self.k, self.v

    @property
    def kwargs(self) -> dict:
        """Keyword arguments of :func:`attnmem.cross_attention`."""
        return {"key_len": self.key_len, "bos_scale": self.bos_scale, "scale": self.scale}

    def raw_args(self, stats: bool = True, row_entropy: bool = False) -> tuple:
        """Positional arguments of ``torch.ops.attnmem.cross_attention.default``."""
        return (*self.qkv, self.key_len, self.bos_scale, self.scale, stats, row_entropy)


@dataclass(frozen=True)
class OpCase:
    """One case of the table: shape, dtype, layout, masks, seed and logit magnitude."""

    Nq: int
    Nk: int
    D: int
    B: int = 2
    H: int = 2
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    mask: str = "none"
    seed: int = 0
    magnitude: float = 1.0
    scale: float | None = None

    @property
    def id(self) -> str:
        """Readable test id: ``B2-Nq97-H2-D40-Nk77-float16-heads-major[-keylen+bos]``."""
        shape = f"B{self.B}-Nq{self.Nq}-H{self.H}-D{self.D}-Nk{self.Nk}"
        mask = "" if self.mask == "none" else f"-{self.mask}"
        return f"{shape}-{dtype_id(self.dtype)}-{self.layout}{mask}"

    def inputs(self, device: str | torch.device = "cpu") -> OpInputs:
        q, k, v = make_qkv(
            self.B,
            self.Nq,
            self.H,
            self.D,
            self.Nk,
            dtype=self.dtype,
            device=device,
            layout=self.layout,
            seed=self.seed,
            magnitude=self.magnitude,
        )
        key_len, bos = make_masks(self.B, self.Nk, self.mask, device)
        return OpInputs(q, k, v, key_len, bos, self.scale)


def case_grid(
    shapes: Iterable[Sequence[int]],
    dtypes: Iterable[torch.dtype] = DTYPES,
    *,
    layouts: Iterable[str] = ("contiguous",),
    masks: Iterable[str] = ("none",),
    B: int = 2,
    H: int = 2,
) -> list[OpCase]:
    """Every combination of ``(Nq, Nk, D)`` shapes, dtypes, layouts and mask kinds."""
    return [
        OpCase(Nq, Nk, D, B=B, H=H, dtype=dt, layout=lay, mask=m)
        for (Nq, Nk, D) in shapes
        for dt in dtypes
        for lay in layouts
        for m in masks
    ]


# ------------------------------------------------------------------------------------------
# The tolerance rule
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """Bounds for one dtype. ``out``: (atol, rtol), or None for the 2x-PyTorch rule with
    ``out_floor``; ``stats`` for prob_sum / Nq and ent_sum / Nq; ``row_ent`` for row entropies."""

    out: tuple[float, float] | None
    stats: tuple[float, float]
    row_ent: tuple[float, float]
    out_floor: float = 0.0


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(out=(1e-10, 1e-10), stats=(1e-6, 1e-6), row_ent=(1e-5, 1e-6)),
    torch.float32: Tolerance(out=(2e-5, 1e-5), stats=(1e-4, 1e-5), row_ent=(1e-3, 1e-5)),
    # Statistics are fp32 maths on the rounded inputs, so half inputs keep the fp32 bounds.
    torch.float16: Tolerance(out=None, out_floor=1e-6, stats=(1e-4, 1e-5), row_ent=(1e-3, 1e-5)),
    torch.bfloat16: Tolerance(out=None, out_floor=1e-6, stats=(1e-4, 1e-5), row_ent=(1e-3, 1e-5)),
}


def pytorch_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_len: torch.Tensor | None = None,
    bos_scale: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """The op's output as plain PyTorch computes it at q's dtype: "PyTorch's own" answer.

    Logits and softmax in float32 (the op's contract), P rounded to the dtype, ``P @ V`` a
    matmul in the dtype. Returns (B, Nq, H, D) in q's dtype.
    """
    p, _ = reference.attention_probs(q, k, key_len=key_len, bos_scale=bos_scale, scale=scale)
    out = torch.matmul(p.to(v.dtype), v.transpose(1, 2).to(p.device))
    return out.transpose(1, 2)


@dataclass
class Comparison:
    """What :func:`compare` found: the output errors and every broken bound (empty: ok)."""

    out_err: float
    own_err: float | None  # PyTorch's own error (half precision only)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        if self.problems:
            return "FAIL: " + "; ".join(self.problems)
        own = "" if self.own_err is None else f", torch {self.own_err:.1e}"
        return f"ok (out err {self.out_err:.1e}{own})"


def _excess(name: str, got: torch.Tensor, want: torch.Tensor, tol: tuple[float, float]):
    """A message when ``|got - want| <= atol + rtol |want|`` fails somewhere, else None."""
    atol, rtol = tol
    if not got.numel():
        return None
    if not bool(torch.isfinite(got).all()):
        return f"{name} is not finite"
    diff = (got.double() - want.double()).abs()
    excess = diff - (atol + rtol * want.double().abs())
    if excess.max() <= 0:
        return None
    i = int(excess.argmax())
    return (
        f"{name} err {diff.max().item():.3g} > atol {atol:g} + rtol {rtol:g} |ref| at "
        f"{int((excess > 0).sum())} of {diff.numel()} elements (worst: got "
        f"{got.flatten()[i].item():.6g}, ref {want.flatten()[i].item():.6g})"
    )


def _stat(name: str, got: torch.Tensor, want: torch.Tensor, n: int, tol: tuple[float, float]):
    if tuple(got.shape) != tuple(want.shape):
        return f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if got.dtype != torch.float32:
        return f"{name} must be float32, got {got.dtype}"
    return _excess(name if n == 1 else f"{name}/Nq", got.to(want.device) / n, want / n, tol)


def compare(
    result: Sequence[torch.Tensor | None], x: OpInputs, *, row_entropy: bool = False
) -> Comparison:
    """Judge an op result against the float64 reference with :data:`TOLERANCES`.

    ``result`` = ``(out, prob_sum, ent_sum, row_ent)``; ``out`` alone, or statistics ``None``
    / empty, for implementations without them. ``row_entropy``: also compare ``row_ent``.
    Also checks the output contract: q's dtype, shape (B, Nq, H, D) (or its flattened
    (B, Nq, H*D)), contiguous, finite; statistics float32 of the right shapes.
    """
    out, prob_sum, ent_sum, row_ent = (list(result) + [None] * 4)[:4]
    q, k, v = x.qkv
    B, Nq, H, D = q.shape
    ref = reference.cross_attention(
        q.double(),
        k.double(),
        v.double(),
        key_len=x.key_len,
        bos_scale=x.bos_scale,
        scale=x.scale,
        row_entropy=row_entropy,
    )
    tol = TOLERANCES[q.dtype]
    problems: list[str] = []
    if out.dtype != q.dtype:
        problems.append(f"out has dtype {out.dtype}, expected q's {q.dtype}")
    if tuple(out.shape) not in ((B, Nq, H, D), (B, Nq, H * D)):
        problems.append(f"out has shape {tuple(out.shape)}, expected {(B, Nq, H, D)}")
        return Comparison(math.inf, None, problems)
    if not out.is_contiguous():
        problems.append("out is not contiguous")
    out64 = out.reshape(B, Nq, H, D).double()
    err = (out64 - ref[0]).abs().max().item() if out.numel() else 0.0
    own = None
    if tol.out is None:
        if not bool(torch.isfinite(out64).all()):
            problems.append("out is not finite")
        own_out = pytorch_attention(q, k, v, x.key_len, x.bos_scale, x.scale).double()
        own = (own_out - ref[0]).abs().max().item() if out.numel() else 0.0
        if not err <= 2 * own + tol.out_floor:
            problems.append(
                f"out err {err:.3g} > 2x PyTorch's own {own:.3g} + {tol.out_floor:g} "
                f"({dtype_id(q.dtype)})"
            )
    else:
        bad = _excess("out", out64, ref[0], tol.out)
        if bad:
            problems.append(bad)
    n = max(Nq, 1)  # sums over Nq rows: compare per-row means so one tolerance fits every Nq
    for name, got, want in (("prob_sum", prob_sum, ref[1]), ("ent_sum", ent_sum, ref[2])):
        if got is not None and got.numel():
            bad = _stat(name, got, want, n, tol.stats)
            if bad:
                problems.append(bad)
    if row_entropy and row_ent is not None:
        bad = _stat("row_ent", row_ent, ref[3], 1, tol.row_ent)
        if bad:
            problems.append(bad)
    return Comparison(err, own, problems)


def assert_matches_reference(
    result: Sequence[torch.Tensor | None], x: OpInputs, *, row_entropy: bool = False
) -> Comparison:
    """:func:`compare`, raising ``AssertionError`` with every problem found."""
    c = compare(result, x, row_entropy=row_entropy)
    assert c.ok, str(c)
    return c
