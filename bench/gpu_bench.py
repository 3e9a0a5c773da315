"""GPU benchmark of attnmem.cross_attention at Stable Diffusion cross-attention shapes.

Compares, per case (model, batch, heads, head dim, queries, dtype; 77 keys):
  attnmem        torch.ops.attnmem.cross_attention with statistics (prob_sum, ent_sum)
  attnmem-nostat the same op with stats=False
  sdpa-flash / sdpa-efficient / sdpa-cudnn
                 F.scaled_dot_product_attention with one backend pinned, no statistics
                 (a backend that refuses the case is reported as n/a)
  sdpa+stats     the best SDPA backend plus a second pass that recomputes P for the statistics
  eager+stats    explicit attention that materializes P (the official code's way)
  copy           a device-to-device copy moving as many bytes as attnmem (bandwidth ceiling)
Every case is first verified against attnmem.reference (and for bit-identical statistics over
two runs); timings use CUDA events around each call with the L2 cache flushed before it.

Writes gpu_bench.json and gpu_bench.md (device, torch version, git commit) to --out (default
$OUT, else bench/results) and prints the table last.

  python -m bench.gpu_bench                 # on a GPU, from the repository root
  python -m bench.gpu_bench --dry-run       # anywhere: case list + a tiny verification on CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import attnmem
from attnmem import _ext
from attnmem.testing import DTYPE_NAMES, SD_LAYERS, OpInputs, compare, make_qkv
from bench.machine import git_commit

ROOT = Path(__file__).resolve().parents[1]

NK = 77
# The attn2 layers of each UNet level (model, heads, head dim, queries): attnmem.testing's table.
SHAPES = SD_LAYERS
DTYPES = {name: DTYPE_NAMES[name] for name in ("fp16", "bf16", "fp32")}
SDPA_BACKENDS = ("flash", "efficient", "cudnn")


@dataclass
class Case:
    model: str
    B: int
    H: int
    D: int
    Nq: int
    dtype: str
    Nk: int = NK
    verify: str = ""
    times_us: dict[str, float | None] = field(default_factory=dict)
    attnmem_gbps: float | None = None
    copy_gbps: float | None = None

    @property
    def name(self) -> str:
        return f"{self.model} B{self.B} H{self.H} D{self.D} Nq{self.Nq} {self.dtype}"


def build_cases(batches: list[int], dtypes: list[str]) -> list[Case]:
    return [
        Case(model, b, h, d, nq, dt_name)
        for dt_name in dtypes
        for b in batches
        for model, h, d, nq in SHAPES
    ]


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------
class Timer:
    """Median of CUDA-event timings of fn(), flushing L2 (a 256 MB write) before every call."""

    def __init__(self, min_reps: int, target_ms: float):
        self.min_reps = min_reps
        self.target_ms = target_ms
        self.flush_buf = torch.empty(64 * 1024 * 1024, dtype=torch.int32, device="cuda")

    def __call__(self, fn: Callable[[], object]) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        est_ms = (time.perf_counter() - t0) * 1e3 / 3
        reps = max(self.min_reps, min(200, int(self.target_ms / max(est_ms, 1e-3))))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            self.flush_buf.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
        return times[len(times) // 2] * 1e3  # microseconds


# ------------------------------------------------------------------------------------------
# The contenders. q, k, v are (B, N, H, D) views of (B, N, H*D) projections, as in diffusers.
# ------------------------------------------------------------------------------------------
def make_inputs(c: Case, device: str, seed: int = 0):
    return make_qkv(c.B, c.Nq, c.H, c.D, c.Nk, dtype=DTYPES[c.dtype], device=device, seed=seed)


def attnmem_fn(q, k, v, stats: bool):
    op = torch.ops.attnmem.cross_attention.default
    B, Nq, H, D = q.shape

    def fn():
        out, prob_sum, ent_sum, _ = op(q, k, v, None, None, None, stats, False)
        return out.reshape(B, Nq, H * D), prob_sum, ent_sum

    return fn


def sdpa_fn(q, k, v, backend: str | None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, Nq, H, D = q.shape
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    pinned = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }

    def fn():
        if backend is None:
            o = F.scaled_dot_product_attention(qh, kh, vh)
        else:
            with sdpa_kernel([pinned[backend]]):
                o = F.scaled_dot_product_attention(qh, kh, vh)
        return o.transpose(1, 2).reshape(B, Nq, H * D)  # what diffusers hands to to_out

    return fn


def stats_pass(qh, kh, scale):
    """prob_sum (B, H, Nk) and ent_sum (B, H) from an explicit fp32 P."""
    p = torch.softmax(torch.matmul(qh, kh.transpose(-1, -2)).float() * scale, dim=-1)
    return p.sum(2), torch.special.entr(p).sum(-1).sum(-1), p


def sdpa_stats_fn(q, k, v, backend: str | None):
    attn = sdpa_fn(q, k, v, backend)
    qh, kh = q.transpose(1, 2), k.transpose(1, 2)
    scale = 1.0 / math.sqrt(q.shape[-1])

    def fn():
        out = attn()
        prob_sum, ent_sum, _ = stats_pass(qh, kh, scale)
        return out, prob_sum, ent_sum

    return fn


def eager_fn(q, k, v):
    B, Nq, H, D = q.shape
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    scale = 1.0 / math.sqrt(D)

    def fn():
        prob_sum, ent_sum, p = stats_pass(qh, kh, scale)
        out = torch.matmul(p.to(vh.dtype), vh)
        return out.transpose(1, 2).reshape(B, Nq, H * D), prob_sum, ent_sum

    return fn


# ------------------------------------------------------------------------------------------
# Verification: attnmem.testing's tolerance rule (the kernel's error is at most 2x PyTorch's own)
# ------------------------------------------------------------------------------------------
def verify(c: Case, q, k, v) -> str:
    op = torch.ops.attnmem.cross_attention.default
    first = op(q, k, v, None, None, None, True, False)
    verdict = compare(first, OpInputs(q, k, v))
    _, ps2, es2, _ = op(q, k, v, None, None, None, True, False)
    if not (torch.equal(first[1], ps2) and torch.equal(first[2], es2)):
        verdict.problems.append("statistics differ between two runs")
    return str(verdict)


# ------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------
def run_case(c: Case, timer: Timer) -> None:
    q, k, v = make_inputs(c, "cuda")
    c.verify = verify(c, q, k, v)
    t = c.times_us
    if c.verify.startswith("ok"):
        t["attnmem"] = timer(attnmem_fn(q, k, v, True))
        t["attnmem-nostat"] = timer(attnmem_fn(q, k, v, False))
    best_name, best = None, math.inf
    for be in SDPA_BACKENDS:
        try:
            fn = sdpa_fn(q, k, v, be)
            fn()
            t[f"sdpa-{be}"] = timer(fn)
        except RuntimeError:  # the backend refuses this shape / dtype / device
            t[f"sdpa-{be}"] = None
            continue
        if t[f"sdpa-{be}"] < best:
            best_name, best = be, t[f"sdpa-{be}"]
    t["sdpa-best"] = best if best_name else None
    t["sdpa+stats"] = timer(sdpa_stats_fn(q, k, v, best_name))
    t["eager+stats"] = timer(eager_fn(q, k, v))
    src = torch.empty_like(q.reshape(-1))
    dst = torch.empty_like(src)
    t["copy"] = timer(lambda: dst.copy_(src))
    esz = q.element_size()
    moved = (q.numel() + k.numel() + v.numel() + q.numel()) * esz  # q, k, v read; out written
    if t.get("attnmem"):
        c.attnmem_gbps = moved / (t["attnmem"] * 1e-6) / 1e9
    c.copy_gbps = 2 * src.numel() * esz / (t["copy"] * 1e-6) / 1e9


def fmt(x: float | None, nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def markdown(cases: list[Case], meta: dict) -> str:
    lines = [
        f"# attnmem GPU benchmark — {meta['device']}",
        "",
        f"torch {meta['torch']} (CUDA {meta['cuda']}), attnmem commit {meta['commit']}, {meta['date']}.",
        "Times are medians in µs (CUDA events, L2 flushed). Nk = 77. `vs best` = attnmem / fastest "
        "pinned SDPA backend (no statistics); `vs eager` = eager+stats / attnmem; `% copy` = "
        "attnmem GB/s (q+k+v+out bytes) / device-to-device copy GB/s.",
        "",
        "| case | attnmem | no stats | flash | efficient | cudnn | sdpa+stats | eager+stats | "
        "vs best | vs eager | GB/s | % copy | verify |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        t = c.times_us
        vs_best = ratio(t.get("attnmem"), t.get("sdpa-best"))
        vs_eager = ratio(t.get("eager+stats"), t.get("attnmem"))
        pct = ratio(c.attnmem_gbps, c.copy_gbps)
        lines.append(
            f"| {c.name} | {fmt(t.get('attnmem'))} | {fmt(t.get('attnmem-nostat'))} | "
            f"{fmt(t.get('sdpa-flash'))} | {fmt(t.get('sdpa-efficient'))} | {fmt(t.get('sdpa-cudnn'))} | "
            f"{fmt(t.get('sdpa+stats'))} | {fmt(t.get('eager+stats'))} | {fmt(vs_best, 2)}x | "
            f"{fmt(vs_eager, 1)}x | {fmt(c.attnmem_gbps, 0)} | "
            f"{'n/a' if pct is None else f'{100 * pct:.0f}%'} | {c.verify} |"
        )
    lines += ["", "Targets (reported, not asserted):"]
    lines += [f"- {line}" for line in targets(cases)]
    return "\n".join(lines) + "\n"


def targets(cases: list[Case]) -> list[str]:
    out = []
    a = [
        (c, ratio(c.times_us.get("attnmem"), c.times_us.get("sdpa-best")))
        for c in cases
        if c.Nq >= 1024
    ]
    a = [(c, r) for c, r in a if r is not None]
    if a:
        worst = max(a, key=lambda x: x[1])
        hit = sum(r <= 1.1 for _, r in a)
        out.append(
            f"attnmem <= 1.1x best SDPA at Nq >= 1024: {hit}/{len(a)} cases "
            f"(worst {worst[1]:.2f}x, {worst[0].name})"
        )
    b = [
        (c, ratio(c.times_us.get("eager+stats"), c.times_us.get("attnmem")))
        for c in cases
        if c.Nq == 4096
    ]
    b = [(c, r) for c, r in b if r is not None]
    if b:
        worst = min(b, key=lambda x: x[1])
        hit = sum(r >= 4 for _, r in b)
        out.append(
            f">= 4x faster than eager+stats at Nq = 4096: {hit}/{len(b)} cases "
            f"(worst {worst[1]:.1f}x, {worst[0].name})"
        )
    d = [(c, ratio(c.attnmem_gbps, c.copy_gbps)) for c in cases if c.B == 16 and c.Nq == 4096]
    d = [(c, r) for c, r in d if r is not None]
    if d:
        worst = min(d, key=lambda x: x[1])
        hit = sum(r >= 0.5 for _, r in d)
        out.append(
            f">= 50% of copy bandwidth at B = 16, Nq = 4096: {hit}/{len(d)} cases "
            f"(worst {100 * worst[1]:.0f}%, {worst[0].name})"
        )
    fails = [c.name for c in cases if not c.verify.startswith("ok")]
    out.append(f"verification failures: {', '.join(fails) if fails else 'none'}")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    ap.add_argument("--batches", default="2,16", help="comma-separated batch sizes (default 2,16)")
    ap.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp16, bf16, fp32")
    ap.add_argument("--models", default="", help="comma-separated subset of SD1.x, SD2.x, SDXL")
    ap.add_argument("--min-reps", type=int, default=10)
    ap.add_argument(
        "--target-ms", type=float, default=30.0, help="time spent timing each contender"
    )
    ap.add_argument(
        "--max-seconds", type=float, default=240.0, help="stop starting new cases after this"
    )
    ap.add_argument(
        "--dry-run", action="store_true", help="list the cases, verify one tiny case on CPU"
    )
    ap.add_argument("--require-gpu", action="store_true", help="fail (exit 2) when there is no GPU")
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad:
        ap.error(f"unknown dtype(s) {bad}; choose from {list(DTYPES)}")
    args.models = [m for m in args.models.split(",") if m]
    known = {s[0] for s in SHAPES}
    if any(m not in known for m in args.models):
        ap.error(f"--models takes a subset of {sorted(known)}")
    return args


def dry_run(cases: list[Case]) -> int:
    dims = set(_ext.build_info().get("cuda_head_dims", []))
    print(f"{len(cases)} cases (Nk = {NK}); CUDA kernel compiled: {_ext.has_kernel('cuda')}")
    for c in cases:
        note = "" if not dims or c.D in dims else "  (head dim not in the CUDA kernel's list!)"
        print(f"  {c.name}{note}")
    tiny = Case("tiny", 2, 3, 40, 97, "fp32")
    q, k, v = make_inputs(tiny, "cpu")
    if _ext.extension() is not None:
        print(f"CPU verification of {tiny.name}: {verify(tiny, q, k, v)}")
    else:
        print(f"attnmem._C not loaded ({_ext.load_error()}): CPU verification skipped")
    print("dry run: no GPU timing done")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = build_cases(args.batches, args.dtypes)
    if args.models:
        cases = [c for c in cases if c.model in args.models]
    if args.dry_run:
        return dry_run(cases)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; nothing timed (use --dry-run to check the script)")
        return 2 if args.require_gpu else 0
    if not _ext.has_kernel("cuda"):
        print(
            f"gpu_bench: attnmem._C has no CUDA kernel (build_info: {_ext.build_info()}, "
            f"load error: {_ext.load_error()})"
        )
        return 2
    meta = {
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "attnmem": attnmem.__version__,
        "build_info": _ext.build_info(),
    }
    torch.backends.cuda.matmul.allow_tf32 = False
    timer = Timer(args.min_reps, args.target_ms)
    t_start = time.perf_counter()
    done: list[Case] = []
    for c in cases:
        if time.perf_counter() - t_start > args.max_seconds:
            print(
                f"time budget of {args.max_seconds:.0f} s spent: {len(cases) - len(done)} cases not run"
            )
            meta["truncated"] = True
            break
        try:
            run_case(c, timer)
        except torch.cuda.OutOfMemoryError:
            c.verify = "skipped: out of memory"
        torch.cuda.empty_cache()  # the case's tensors died with run_case's frame
        print(
            f"{c.name}: attnmem {fmt(c.times_us.get('attnmem'))} us, best sdpa "
            f"{fmt(c.times_us.get('sdpa-best'))} us, {c.verify}",
            flush=True,
        )
        done.append(c)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(done, meta)
    payload = {"meta": meta, "cases": [asdict(c) | {"name": c.name} for c in done]}
    (out / "gpu_bench.json").write_text(json.dumps(payload, indent=2))
    (out / "gpu_bench.md").write_text(md)
    print()
    print(md)
    return 1 if any(c.verify.startswith("FAIL") for c in done) else 0


if __name__ == "__main__":
    sys.exit(main())
