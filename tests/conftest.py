"""Shared fixtures: devices (CUDA skipped visibly without a GPU) and CPU instruction-set paths."""

from __future__ import annotations

import pytest
import torch

from attnmem import _ext

HAS_CUDA = torch.cuda.is_available()

# The tests use tiny models: one intra-op thread is as fast as two, and it keeps the suite's
# time steady when the machine is shared (OpenMP threads waiting on a busy core can slow a
# 0.2 s pipeline call to many seconds). Tests of thread behaviour set the count themselves.
torch.set_num_threads(1)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")],
    ),
]


def cpu_isas() -> list[str]:
    """The CPU kernel's paths this machine can run, best first (ATTNMEM_CPU_ISA caps the choice)."""
    best = _ext.build_info().get("cpu_simd_runtime", "generic") if _ext.extension() else "generic"
    order = ["avx512", "avx2", "generic"]
    return order[order.index(best) :] if best in order else ["generic"]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=cpu_isas())
def cpu_isa(request, monkeypatch) -> str:
    monkeypatch.setenv("ATTNMEM_CPU_ISA", request.param)
    return request.param


def pytest_report_header(config) -> list[str]:
    info = _ext.build_info()
    if not info:
        return [f"attnmem._C: not loaded ({_ext.load_error()}); tests run the reference"]
    return [
        f"attnmem._C: cpu paths {cpu_isas()}, cuda kernel {info.get('cuda')}, "
        f"cuda device {HAS_CUDA}"
    ]


@pytest.fixture(scope="module")
def testbed_pipe():
    """The bundled testbed pipeline (what the default model name loads, so its shipped
    calibration file fits it), once per test module, on the CPU in fp32."""
    from attnmem.pipelines import load_pipeline

    return load_pipeline("testbed", torch.device("cpu"), torch.float32)
