"""pytest-benchmark cases of the UNet-level benchmark. The committed table comes from
bench/run_unet_bench.py (interleaved rounds); this file runs the same verified cases under
pytest-benchmark. ATTNMEM_BENCH_UNET=tiny selects a small UNet (the smoke run of `make test`)."""

from __future__ import annotations

import os

import pytest

from bench.unet_cases import Cases, build_unet

SIZE = os.environ.get("ATTNMEM_BENCH_UNET", "sd1")


@pytest.fixture(scope="module")
def cases():
    c = Cases(build_unet(SIZE))
    c.verify(atol=1e-3)
    return c


@pytest.mark.parametrize(
    "case",
    [
        "plain",
        "attnmem_stats",
        "official_stats",
        "e_early_exit",
        "wen_n4",
        "attnmem_mitigated",
        "official_mitigated",
    ],
)
def test_unet_case(benchmark, cases, case):
    benchmark.group = f"unet-{SIZE}"
    benchmark.pedantic(
        cases.timed()[case],
        rounds=3 if SIZE == "sd1" else 5,
        iterations=1,
        warmup_rounds=0 if SIZE == "sd1" else 1,
    )
