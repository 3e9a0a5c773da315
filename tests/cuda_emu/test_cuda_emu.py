"""The CUDA kernel's device code, run on the CPU by a host emulator: evidence without a GPU.

``harness.cpp`` compiles ``csrc/cuda/cross_attention_cuda.cuh`` with ``ATTNMEM_CUDA_EMULATOR``:
the seam ``csrc/cuda/cross_attention_cuda_ptx.cuh`` routes the PTX wrappers (cp.async, mma.sync),
the dynamic shared memory and the device assert to ``cuda_emu.h``; everything else is the real
device code. The harness launches it with the launcher's own plan
(``csrc/cuda/cross_attention_cuda_plan.h``). This file writes the inputs, runs the harness and
compares its outputs with :mod:`attnmem.reference` under the project's tolerance rule. Every
case runs under three thread schedules (lowest-first, highest-first, random), which must give
identical bits.

What is covered: every launch plan the launcher can pick on sm_80+ parts (their 99 / 163 /
227 KB shared-memory opt-ins, checked against the harness's enumeration of plans), every
tensor-core head dim and both key classes, the fp32 kernel at any head dim up to 160,
key_len 0 / 1 / partial / Nk, bos_scale, strided / misaligned / expanded / heads-major layouts,
fp16 / bf16 / fp32, multi-chunk statistics, partial tiles, ``stats=False``, ``row_entropy``;
the device asserts; the test-only shared-memory cap; and a mutation check showing that
deliberate bugs make it fail. What it cannot see is listed in ``cuda_emu.h``.

Needs a C++20 compiler (``$CXX``, default g++) and the CUDA headers (``$CUDA_HOME/include``,
default /usr/local/cuda); without them every test is skipped with the reason. Not part of the
default ``pytest`` run (marker ``cuda_emu``): ``make cuda-emu`` runs it.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from attnmem.testing import (
    DTYPE_NAMES,
    LAYOUTS,
    ODD_SHAPES,
    SD_SHAPES,
    TILING_SHAPES,
    OpInputs,
    compare,
    make_masks,
    make_qkv,
)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CSRC_CUDA = ROOT / "csrc" / "cuda"
CUDA_HOME = Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
CXX = os.environ.get("CXX", "g++")

# sharedMemPerBlockOptin of the sm_80+ parts (CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability").
OPTIN_99K = 101376  # sm_86, sm_89, sm_120, sm_121
OPTIN_163K = 166912  # sm_80, sm_87
OPTIN_227K = 232448  # sm_90, sm_100, sm_103
DEVICE_OPTINS = (OPTIN_99K, OPTIN_163K, OPTIN_227K)

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
KERNELS = ("fp16", "bf16", "fp32")  # the tensor-core kernel's two dtypes, the fp32 kernel


def _toolchain_problem() -> str | None:
    if shutil.which(CXX) is None:
        return f"no C++ compiler '{CXX}' on PATH (set CXX)"
    if not (CUDA_HOME / "include" / "cuda_fp16.h").is_file():
        return f"no CUDA headers in {CUDA_HOME / 'include'} (set CUDA_HOME)"
    probe = subprocess.run(
        [CXX, "-std=c++20", "-fsyntax-only", "-x", "c++", "-"],
        input="static_assert(__cplusplus >= 202002L);\n",
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"'{CXX}' does not compile C++20: {probe.stderr.strip()[:200]}"
    return None


_PROBLEM = _toolchain_problem()
pytestmark = [
    pytest.mark.cuda_emu,
    pytest.mark.skipif(_PROBLEM is not None, reason=f"CUDA emulator not built: {_PROBLEM}"),
]


# ------------------------------------------------------------------------------------------
# Building and running the harness
# ------------------------------------------------------------------------------------------
def build_harness(out: Path, cuda_dir: Path = CSRC_CUDA, dims: str | None = None) -> Path:
    """Compile harness.cpp against the device code in ``cuda_dir``; ``dims`` (e.g. "40,64")
    limits the tensor-core instantiations (faster builds for the mutation check)."""
    exe = out / "harness"
    cmd = [CXX, "-std=c++20", "-O1" if dims else "-O2", "-Wall", "-Wextra", "-Werror"]
    cmd += ["-Wno-unknown-pragmas", "-DATTNMEM_CUDA_EMULATOR"]
    if dims:
        cmd.append(f"-DCUDA_EMU_HEAD_DIMS={dims}")
    cmd += [f"-I{cuda_dir}", f"-I{HERE}", f"-I{CUDA_HOME / 'include'}"]
    cmd += [str(HERE / "harness.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise AssertionError(f"building the emulator harness failed:\n{r.stderr[-4000:]}")
    return exe


@pytest.fixture(scope="session")
def harness(tmp_path_factory) -> Path:
    return build_harness(tmp_path_factory.mktemp("cuda_emu"))


@dataclass
class Case:
    """One call of the raw op on the emulated device: the inputs as torch would hand them over,
    the statistics switches, and the device to plan for."""

    name: str
    x: OpInputs
    stats: bool = True
    row_entropy: bool = True
    optin: int = OPTIN_227K  # the device's shared-memory opt-in to plan with
    tpc: int = 0  # > 0: impose tiles_per_cta (reach the chunks of shapes too big to emulate)


def case(name, B, Nq, H, D, Nk, kernel, *, layout="contiguous", mask="with-empty", seed=0, **kw):
    """A Case from the op-case table's inputs (attnmem.testing.make_qkv / make_masks)."""
    qkv = make_qkv(B, Nq, H, D, Nk, dtype=DTYPE_NAMES[kernel], layout=layout, seed=seed)
    scale = kw.pop("scale", None)
    return Case(name, OpInputs(*qkv, *make_masks(B, Nk, mask), scale), **kw)


@dataclass
class Result:
    invariant: bool  # identical bits under the three schedules
    plan: dict
    out: torch.Tensor
    prob_sum: torch.Tensor | None
    ent_sum: torch.Tensor | None
    row_ent: torch.Tensor | None


_PLAN_FIELDS = (
    "f32 nkt tile_rows tiles_per_cta nchunks ctas warps nbuf smem second_stage q_vec k_vec v_vec"
).split()


def _storage_bytes(t: torch.Tensor) -> bytes:
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).numpy().tobytes()


def _encode(i: int, c: Case) -> bytes:
    x = c.x
    B, Nq, H, D = x.q.shape
    Nk = x.k.shape[1]
    scale = 1.0 / math.sqrt(D) if x.scale is None else x.scale  # the launcher's default
    head = struct.pack(
        "<8s13qd",
        b"ATTNCASE",
        i,
        DTYPE_CODE[x.q.dtype],
        B,
        Nq,
        H,
        Nk,
        D,
        c.stats,
        c.row_entropy,
        x.key_len is not None,
        x.bos_scale is not None,
        c.optin,
        c.tpc,
        scale,
    )
    blobs = []
    for t in x.qkv:
        blob = _storage_bytes(t)
        blobs.append(blob)
        head += struct.pack("<6q", len(blob), t.storage_offset(), *t.stride())
    tail = b""
    if x.key_len is not None:
        tail += x.key_len.numpy().astype("<i8").tobytes()
    if x.bos_scale is not None:
        tail += x.bos_scale.numpy().astype("<f4").tobytes()
    return head + b"".join(blobs) + tail


def _decode(data: bytes, cases: list[Case]) -> list[Result]:
    results, pos = [], 0
    for i, c in enumerate(cases):
        if pos == len(data):
            break
        assert data[pos : pos + 8] == b"ATTNRSLT", "corrupt result file"
        fields = struct.unpack_from(f"<{2 + len(_PLAN_FIELDS)}q", data, pos + 8)
        pos += 8 + 8 * len(fields)
        assert fields[0] == i
        plan = dict(zip(_PLAN_FIELDS, fields[2:]))
        B, Nq, H, D = c.x.q.shape
        Nk = c.x.k.shape[1]

        def take(n, dtype):
            nonlocal pos
            nbytes = n * torch.empty(0, dtype=dtype).element_size()
            t = torch.frombuffer(bytearray(data[pos : pos + nbytes]), dtype=dtype)
            pos += nbytes
            return t

        out = take(B * Nq * H * D, c.x.q.dtype).view(B, Nq, H, D)
        ps = take(B * H * Nk, torch.float32).view(B, H, Nk) if c.stats else None
        es = take(B * H, torch.float32).view(B, H) if c.stats else None
        re = take(B * H * Nq, torch.float32).view(B, H, Nq) if c.row_entropy else None
        results.append(Result(bool(fields[1]), plan, out, ps, es, re))
    return results


def run_cases(exe: Path, cases: list[Case], work: Path, env: dict | None = None):
    """Run the harness on ``cases``; returns (results of the cases that ran, the process)."""
    src, dst = work / "cases.bin", work / "results.bin"
    src.write_bytes(b"".join(_encode(i, c) for i, c in enumerate(cases)))
    proc = subprocess.run(
        [str(exe), "run", str(src), str(dst)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    data = dst.read_bytes() if dst.exists() else b""
    return _decode(data, cases), proc


def _stopped(proc, cases: list[Case]) -> str:
    """Which case the emulator stopped in, and why."""
    started = [ln for ln in proc.stderr.splitlines() if ln.startswith("case ")]
    where = cases[int(started[-1].split()[1])].name if started else "?"
    why = [ln for ln in proc.stderr.splitlines() if not ln.startswith("case ")]
    return f"harness exit {proc.returncode} in case {where}: " + " | ".join(why[-5:])


def mismatches(c: Case, r: Result) -> list[str]:
    """Every way the emulated result differs from the reference (the project's tolerance rule,
    attnmem.testing.compare) or from the contract's exact promises; empty when it matches."""
    result = (r.out, r.prob_sum, r.ent_sum, r.row_ent)
    bad = list(compare(result, c.x, row_entropy=c.row_entropy).problems)
    if not r.invariant:
        bad.append("bits differ between thread schedules")
    if c.x.key_len is not None and not bad:
        for b, kl in enumerate(c.x.key_len.tolist()):
            if kl == 0 and r.out[b].abs().max() != 0:
                bad.append(f"batch {b} has key_len 0 but a non-zero output")
            if c.stats and r.prob_sum[b, :, kl:].abs().sum() != 0:
                bad.append(f"batch {b}: probability on keys >= key_len {kl}")
            if c.stats and kl == 0 and r.ent_sum[b].abs().max() != 0:
                bad.append(f"batch {b} has key_len 0 but non-zero entropy")
    return bad


def check(exe: Path, cases: list[Case], work: Path, env: dict | None = None) -> list[Result]:
    """Run ``cases`` and fail with every mismatch (case name and what differs)."""
    results, proc = run_cases(exe, cases, work, env)
    problems = [
        f"{c.name}: {'; '.join(m)}" for c, r in zip(cases, results) if (m := mismatches(c, r))
    ]
    if proc.returncode != 0:
        problems.append(_stopped(proc, cases))
    assert not problems, f"{len(problems)} of {len(cases)} cases fail:\n" + "\n".join(problems)
    return results


@pytest.fixture(scope="session")
def head_dims(harness) -> tuple[tuple[int, ...], int]:
    """(tensor-core head dims, the fp32 kernel's largest D), as the harness was compiled."""
    r = subprocess.run([str(harness), "dims"], capture_output=True, text=True, check=True)
    dims, f32_max = r.stdout.splitlines()
    return tuple(int(d) for d in dims.split()), int(f32_max)


def runs(kernel: str, D: int, head_dims) -> bool:
    dims, f32_max = head_dims
    return 1 <= D <= f32_max if kernel == "fp32" else D in dims


# ------------------------------------------------------------------------------------------
# Every launch plan
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlanLine:
    kernel: str  # fp16 / bf16 / fp32
    D: int  # the cheapest input that reaches the plan
    Nk: int
    tpc: int
    warps: int
    nbuf: int
    smem: int
    optin: int

    @property
    def key(self) -> tuple:
        inst = (0, 0) if self.kernel == "fp32" else (self.D, 5 if self.Nk <= 80 else 8)
        return (self.kernel, *inst, self.tpc, self.warps, self.nbuf)


def launch_plans(exe: Path) -> list[PlanLine]:
    r = subprocess.run(
        [str(exe), "plans", *map(str, DEVICE_OPTINS)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    return [PlanLine(ln.split()[1], *map(int, ln.split()[2:])) for ln in r.stdout.splitlines()]


def result_key(c: Case, r: Result) -> tuple:
    kernel = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[c.x.q.dtype]
    p = r.plan
    inst = (0, 0) if p["f32"] else (c.x.q.shape[-1], p["nkt"])
    return (kernel, *inst, p["tiles_per_cta"], p["warps"], p["nbuf"])


F32_DIMS = (1, 8, 17, 24, 40, 72, 100)  # any D <= 160 runs the fp32 kernel
NK_FOR_CLASS = {5: (77, 80, 5, 33), 8: (128, 81, 97)}


def plan_cases(plans: list[PlanLine]) -> list[Case]:
    """Two cases per plan (16-byte vector loads, and element loads of misaligned rows), each
    one full chunk plus a chunk of one partial tile: several warps, the prefetch ring, a partial
    tile and the second stage of the statistics all run."""
    cases = []
    for i, p in enumerate(plans):
        tile = 8 if p.kernel == "fp32" else 16
        D, Nk = p.D, p.Nk
        if p.kernel == "fp32" and p.warps == min(p.tpc, 4):  # the smem-rich plan: any D fits
            D, Nk = F32_DIMS[i % len(F32_DIMS)], (77, 128, 5, 33)[i % 4]
        elif p.kernel != "fp32":
            choices = NK_FOR_CLASS[5 if Nk <= 80 else 8]
            Nk = choices[i % len(choices)]
        Nq = p.tpc * tile + tile // 2 + 3
        for layout in ("contiguous", "misaligned"):
            name = f"{p.kernel}-D{D}-Nk{Nk}-tpc{p.tpc}-W{p.warps}-nbuf{p.nbuf}-optin{p.optin}"
            mask = "keylen+bos" if i % 2 else "none"
            kw = dict(layout=layout, mask=mask, seed=i, optin=p.optin, tpc=p.tpc)
            cases.append(case(f"{name}-{layout}", 1, Nq, 1, D, Nk, p.kernel, **kw))
    return cases


def test_every_launch_plan_matches_reference(harness, tmp_path):
    """Every plan the launcher can pick on an sm_80+ part (99, 163 and 227 KB opt-ins)."""
    plans = launch_plans(harness)
    assert {p.kernel for p in plans} == set(KERNELS) and len(plans) >= 100, plans
    cases = plan_cases(plans)
    results = check(harness, cases, tmp_path)
    covered = {result_key(c, r) for c, r in zip(cases, results)}
    missing = [p for p in plans if p.key not in covered]
    assert not missing, f"{len(missing)} plans not reached: {missing[:5]}"
    vec = {c.name: (r.plan["q_vec"], r.plan["k_vec"]) for c, r in zip(cases, results)}
    assert all(v == (0, 0) for n, v in vec.items() if n.endswith("misaligned"))
    assert all(v == (1, 1) for n, v in vec.items() if n.endswith("contiguous") and "fp32" not in n)


# ------------------------------------------------------------------------------------------
# The op-case table's shapes, every head dim and key class, layouts, switches
# ------------------------------------------------------------------------------------------
def launcher_plan(exe: Path, kernel: str, B, Nq, H, D, Nk, optin=OPTIN_227K) -> dict:
    """The plan the launcher picks for this shape (asked from the shared plan header)."""
    args = [str(exe), "plan", kernel, *map(str, (B, Nq, H, D, Nk, optin))]
    words = subprocess.run(args, capture_output=True, text=True, check=True).stdout.split()
    return {k: int(v) for k, v in zip(words[::2], words[1::2])}


MAX_EMULATED_ROWS = 16384  # B * H * Nq beyond which one (b, h) stands for the whole shape


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", TILING_SHAPES, ids=lambda s: "B{}-Nq{}-H{}-D{}-Nk{}".format(*s))
def test_tiling_shapes(harness, tmp_path, shape, kernel):
    """The table's shapes for the launch plan, with the shape-chosen plan of a 227 KB part.
    A CTA's work depends only on the plan, not on B and H: a shape too large to emulate runs
    on one (b, h) with the full shape's chunking (the launcher's, from the harness)."""
    B, Nq, H, D, Nk = shape
    want = launcher_plan(harness, kernel, *shape)
    if B * H * Nq > MAX_EMULATED_ROWS:
        c = case("tiling-one-head", 1, Nq, 1, D, Nk, kernel, tpc=want["tiles_per_cta"])
    else:
        c = case("tiling", *shape, kernel)
    (r,) = check(harness, [c], tmp_path)
    assert {k: r.plan[k] for k in want} == want


SHAPE_CASES = [(k, s) for s in SD_SHAPES + ODD_SHAPES for k in KERNELS]


@pytest.mark.parametrize(
    "kernel,shape", SHAPE_CASES, ids=[f"{k}-Nq{s[0]}-Nk{s[1]}-D{s[2]}" for k, s in SHAPE_CASES]
)
def test_sd_and_odd_shapes(harness, head_dims, tmp_path, kernel, shape):
    """The table's SD1.x and odd shapes (one batch row and head: the emulator is slow). A head
    dim without a tensor-core kernel must be refused by the launcher (the wrapper then runs
    the reference)."""
    Nq, Nk, D = shape
    c = case("shape", 1, Nq, 1, D, Nk, kernel, mask="keylen+bos")
    if runs(kernel, D, head_dims):
        check(harness, [c], tmp_path)
    else:
        _, proc = run_cases(harness, [c], tmp_path)
        assert proc.returncode == 3 and f"the launcher refuses D = {D}" in proc.stderr


MATRIX = [
    *[(k, D, Nk) for k in ("fp16", "bf16") for D in (40, 64, 80, 128, 160) for Nk in (77, 128)],
    *[("fp32", D, Nk) for D in (*F32_DIMS, 128, 152, 160) for Nk in (77, 128)],
]


@pytest.mark.parametrize("kernel,D,Nk", MATRIX, ids=[f"{k}-D{D}-Nk{n}" for k, D, n in MATRIX])
def test_every_head_dim_and_key_class(harness, head_dims, tmp_path, kernel, D, Nk):
    """key_len Nk / half / 0 / 1 with bos_scale 1.25 / 0.5 / 2.0 / 1.0 over a batch of 4, two
    heads, Nq not a multiple of the tile, several chunks."""
    assert runs(kernel, D, head_dims)
    (r,) = check(harness, [case("matrix", 4, 37, 2, D, Nk, kernel, seed=D + Nk)], tmp_path)
    assert r.plan["nchunks"] > 1 and r.plan["second_stage"]


def test_the_matrix_has_every_head_dim(head_dims):
    dims, f32_max = head_dims
    assert {D for k, D, _ in MATRIX if k == "fp16"} == set(dims) and f32_max == 160


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(harness, tmp_path, layout, kernel):
    (r,) = check(harness, [case(f"{layout}", 2, 45, 3, 40, 77, kernel, layout=layout)], tmp_path)
    vec = layout in ("contiguous", "fused-kv", "heads-major", "expanded-kv")
    assert (r.plan["q_vec"], r.plan["k_vec"], r.plan["v_vec"]) == (vec, vec, vec)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("stats,row_entropy", [(False, True), (False, False), (True, False)])
def test_statistics_switches(harness, tmp_path, kernel, stats, row_entropy):
    c = case("switches", 2, 50, 2, 64, 77, kernel, stats=stats, row_entropy=row_entropy)
    (r,) = check(harness, [c], tmp_path)
    assert not r.plan["second_stage"] or stats


def test_large_logits_stay_finite_in_fp16(harness, tmp_path):
    """SD2-768-like magnitudes: q.k exceeds fp16's range; the kernel's logits are fp32."""
    q, k, v = make_qkv(1, 64, 2, 64, 77, dtype=torch.float16, seed=5, magnitude=40.0)
    check(harness, [Case("large-logits", OpInputs(q, k, v, scale=1.0))], tmp_path)


# ------------------------------------------------------------------------------------------
# Device asserts, the shared-memory cap, the plan bound
# ------------------------------------------------------------------------------------------
BAD_INPUTS = [
    ("key_len-above-Nk", torch.tensor([77, 78]), None, "key_len values must lie in [0, Nk]"),
    ("key_len-negative", torch.tensor([-1, 5]), None, "key_len values must lie in [0, Nk]"),
    ("bos-nan", None, torch.tensor([1.0, float("nan")]), "bos_scale must be finite"),
    ("bos-inf", None, torch.tensor([float("inf"), 1.0]), "bos_scale must be finite"),
]


@pytest.mark.parametrize("kernel", ["fp16", "fp32"])
@pytest.mark.parametrize("what,key_len,bos,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_device_asserts_on_bad_values(harness, tmp_path, kernel, what, key_len, bos, message):
    """The raw op never answers silently wrong: out-of-range key_len and non-finite bos_scale
    stop the kernel with a device assert (the Python wrapper raises ValueError before that)."""
    q, k, v = make_qkv(2, 20, 1, 64, 77, dtype=DTYPE_NAMES[kernel])
    results, proc = run_cases(harness, [Case(what, OpInputs(q, k, v, key_len, bos))], tmp_path)
    assert proc.returncode == 4 and not results, proc.stderr
    assert f"EMU DEVICE ASSERT: cross_attention: {message}" in proc.stderr


def test_smem_cap_knob_picks_the_smaller_parts_plan(harness, tmp_path):
    """ATTNMEM_CUDA_SMEM_OPTIN_CAP on a 227 KB device gives the plan of a 99 KB part."""
    rich = case("uncapped", 1, 280, 1, 160, 128, "fp16", optin=OPTIN_227K, tpc=16)
    short = Case("99KB", rich.x, optin=OPTIN_99K, tpc=16)
    (a,) = check(harness, [rich], tmp_path)
    (b,) = check(harness, [short], tmp_path)
    cap = {"ATTNMEM_CUDA_SMEM_OPTIN_CAP": str(OPTIN_99K)}
    (capped,) = check(harness, [rich], tmp_path, env=cap)
    assert (a.plan["warps"], a.plan["nbuf"]) == (4, 2)
    assert capped.plan == b.plan and (b.plan["warps"], b.plan["nbuf"]) == (2, 1)
    assert torch.equal(capped.out, b.out)
    _, proc = run_cases(harness, [rich], tmp_path, env={"ATTNMEM_CUDA_SMEM_OPTIN_CAP": "99k"})
    assert proc.returncode != 0 and "not a byte count" in proc.stderr


def test_plan_enumeration_respects_the_attribute_bound(harness):
    """`harness plans` fails if any plan needs more shared memory than max_plan_smem(), the
    size the launcher sets once per (device, instantiation), or if that bound is above the
    device's opt-in."""
    r = subprocess.run(
        [str(harness), "plans", *map(str, DEVICE_OPTINS)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------------------
# Mutation check: deliberate bugs in the device code must make the emulator test fail
# ------------------------------------------------------------------------------------------
CUH = "cross_attention_cuda.cuh"
# (name, old text, new text): each old text must occur exactly once, so the list follows the
# source; a mutant that no longer applies or builds fails this test rather than counting as
# caught.
MUTANTS = [
    (
        "qk-a-fragment-swap",
        "{lds32(qa), lds32(qa + 8 * KSTR), lds32(qa + 8),\n                             lds32(qa + 8 * KSTR + 8)}",
        "{lds32(qa), lds32(qa + 8), lds32(qa + 8 * KSTR),\n                             lds32(qa + 8 * KSTR + 8)}",
    ),
    (
        "qk-b-fragment-swap",
        "Ops::mma(S[nt], a, lds32(kb), lds32(kb + 8));",
        "Ops::mma(S[nt], a, lds32(kb + 8), lds32(kb));",
    ),
    (
        "pv-a-fragment-swap",
        "Ops::pack(S[2 * kt][2], S[2 * kt][3]),\n                               Ops::pack(S[2 * kt + 1][0], S[2 * kt + 1][1]),",
        "Ops::pack(S[2 * kt + 1][0], S[2 * kt + 1][1]),\n                               Ops::pack(S[2 * kt][2], S[2 * kt][3]),",
    ),
    (
        "missing-barrier-after-kv-staging",
        "  __syncthreads();\n\n  const bool stats = p.slot_p != nullptr;\n  float psum[NT][2];",
        "\n  const bool stats = p.slot_p != nullptr;\n  float psum[NT][2];",
    ),
    (
        "missing-barrier-before-slot-sum",
        "  if (lane == 0) red_e[warp] = e;\n  __syncthreads();",
        "  if (lane == 0) red_e[warp] = e;",
    ),
    (
        "missing-barrier-f32-staging",
        "    Ks[j * L.kstr + d] = j < p.Nk ? kbh[j * p.ks[1] + d * p.ks[3]] : 0.0f;\n  }\n  __syncthreads();",
        "    Ks[j * L.kstr + d] = j < p.Nk ? kbh[j * p.ks[1] + d * p.ks[3]] : 0.0f;\n  }",
    ),
    (
        "missing-cp-async-wait-prefetch",
        "      cp_async_wait<1>();  // everything but the newest group: tile `it` has landed",
        "",
    ),
    ("missing-cp-async-wait-single", "      cp_async_wait<0>();\n", ""),
    (
        "cp-async-wait-too-shallow",
        "cp_async_wait<1>();  // everything but the newest group",
        "cp_async_wait<2>();  // everything but the newest group",
    ),
    (
        "missing-syncwarp-out-staged",
        "      sts32(buf + (g + 8) * KSTR + nd * 8 + 2 * t, Ops::pack(O[nd][2], O[nd][3]));\n    }\n    __syncwarp();",
        "      sts32(buf + (g + 8) * KSTR + nd * 8 + 2 * t, Ops::pack(O[nd][2], O[nd][3]));\n    }",
    ),
    (
        "missing-syncwarp-cp-async-visible",
        "    __syncwarp();  // other lanes' copies of this tile are visible\n",
        "",
    ),
    (
        "missing-syncwarp-buffer-free",
        "    __syncwarp();  // buf is free for the load issued at the top of iteration it + 1\n",
        "",
    ),
    (
        "missing-syncwarp-f32-qtile",
        "      qtile[idx] = i < p.Nq ? qbh[i * p.qs[1] + d * p.qs[3]] : 0.0f;\n    }\n    __syncwarp();",
        "      qtile[idx] = i < p.Nq ? qbh[i * p.qs[1] + d * p.qs[3]] : 0.0f;\n    }",
    ),
    ("bos-on-wrong-key", "          if (j == 0) {\n", "          if (j == 1) {\n"),
    ("bos-on-wrong-key-f32", "if (j == 0) x *= w.bos;", "if (j == 1) x *= w.bos;"),
    (
        "mask-off-by-one",
        "const bool keep = nt * 8 + 2 * t + c < w.kl;",
        "const bool keep = nt * 8 + 2 * t + c <= w.kl;",
    ),
    ("partial-key-tile-dropped", "const int nkt = (w.kl + 15) / 16;", "const int nkt = w.kl / 16;"),
    ("row-validity-off-by-one", "valid1 = r0 + g + 8 < p.Nq;", "valid1 = r0 + g + 8 <= p.Nq;"),
    ("entropy-log2-factor", "logf(l0) - kLn2 * (t0 * inv0)", "logf(l0) - (t0 * inv0)"),
    (
        "second-stage-skips-last-chunk",
        "for (int c = 0; c < nchunks; ++c) acc += slot_p[",
        "for (int c = 0; c + 1 < nchunks; ++c) acc += slot_p[",
    ),
    (
        "warp-sum-one-level-short",
        "for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync",
        "for (int o = 16; o > 1; o >>= 1) x += __shfl_xor_sync",
    ),
]
# Mutants the emulator cannot catch, and why; kept so that the count is honest and the test
# notices if a better emulator starts catching them (strict xfail).
SURVIVORS = {
    "missing-syncwarp-q-read-done": (
        "    __syncwarp();  // every lane is done reading Q from buf\n",
        "",
        "every lane's reads of the Q tile feed an mma.sync that precedes the PV mma.sync, a "
        "warp rendezvous in the emulator: only racecheck on a GPU can judge this barrier",
    ),
}


def mutation_cases() -> list[Case]:
    """Small cases that reach every path the mutants touch (D = 40 and fp32 only)."""
    cases = []
    for k in ("fp16", "bf16"):
        cases.append(case(f"{k}-masks", 4, 37, 1, 40, 77, k, seed=1))
        for layout in ("contiguous", "misaligned"):  # cp.async and element loads
            # prefetch ring: 4 tiles per warp, so each buffer is refilled while in use nearby
            kw = dict(layout=layout, seed=2, tpc=16)
            cases.append(case(f"{k}-tpc16-{layout}", 2, 270, 1, 40, 77, k, **kw))
            # 2 tiles per warp without prefetch: only on a short opt-in
            kw = dict(layout=layout, mask="none", seed=4, optin=30000, tpc=8)
            cases.append(case(f"{k}-tpc8-nbuf1-{layout}", 1, 140, 1, 40, 77, k, **kw))
        cases.append(case(f"{k}-tpc4-nk128", 4, 70, 1, 40, 128, k, seed=3, tpc=4))
    for D, Nk in ((40, 77), (24, 128)):
        cases.append(case(f"fp32-D{D}", 4, 30, 1, D, Nk, "fp32", seed=5, tpc=2))
    return cases


def _all_mutants() -> dict[str, tuple[str, str]]:
    return {name: (old, new) for name, old, new in MUTANTS} | {
        name: (old, new) for name, (old, new, _) in SURVIVORS.items()
    }


@pytest.fixture(scope="session")
def mutant_harnesses(tmp_path_factory) -> dict[str, Path | Exception]:
    """Every mutant's harness, built in parallel ($CUDA_EMU_JOBS jobs, default: every core)."""
    base = tmp_path_factory.mktemp("mutants")

    def build(name: str, old: str, new: str) -> Path:
        work = base / name
        shutil.copytree(CSRC_CUDA, work / "cuda")
        src = (work / "cuda" / CUH).read_text()
        n = src.count(old)
        assert n == 1, f"mutant {name}: its text occurs {n} times in {CUH}"
        (work / "cuda" / CUH).write_text(src.replace(old, new))
        return build_harness(work, work / "cuda", dims="40")

    jobs = int(os.environ.get("CUDA_EMU_JOBS", "0")) or os.cpu_count() or 1
    built: dict[str, Path | Exception] = {}
    with ThreadPoolExecutor(jobs) as pool:
        futures = {n: pool.submit(build, n, o, w) for n, (o, w) in _all_mutants().items()}
        for name, f in futures.items():
            try:
                built[name] = f.result()
            except Exception as e:  # reported by that mutant's test
                built[name] = e
    return built


def _mutant_params():
    params = [pytest.param(name, id=name) for name, _, _ in MUTANTS]
    for name, (_, _, why) in SURVIVORS.items():
        params.append(pytest.param(name, id=name, marks=pytest.mark.xfail(strict=True, reason=why)))
    return params


def test_mutation_cases_pass_unmutated(harness, tmp_path):
    check(harness, mutation_cases(), tmp_path)


@pytest.mark.parametrize("name", _mutant_params())
def test_mutant_is_caught(mutant_harnesses, tmp_path, name):
    exe = mutant_harnesses[name]
    if isinstance(exe, Exception):
        raise exe
    cases = mutation_cases()
    results, proc = run_cases(exe, cases, tmp_path)
    caught = proc.returncode != 0 or any(mismatches(c, r) for c, r in zip(cases, results))
    assert caught, f"mutant {name} passes every case: the emulator test cannot see it"
