"""pytest-benchmark suite of the op on SD1.x cross-attention shapes (CPU, fp32).

Run through `make bench` (bench/run_op_bench.py writes the results table), or directly:
`pytest bench/test_op_bench.py --benchmark-only`. Each case is verified against
attnmem.reference before it is timed.
"""

from __future__ import annotations

import pytest
import torch

from bench.op_cases import CASES, SD1_SHAPES, make_inputs, verify


@pytest.mark.parametrize("shape", SD1_SHAPES, ids=lambda s: f"Nq{s[0]}-D{s[1]}")
@pytest.mark.parametrize("case", list(CASES))
def test_op(benchmark, case, shape):
    Nq, D = shape
    q, k, v = make_inputs(Nq, D)
    verify(case, q, k, v)
    fn = CASES[case]
    benchmark.group = f"Nq{Nq}-D{D}"
    benchmark.extra_info.update(case=case, Nq=Nq, D=D, threads=torch.get_num_threads())
    with torch.inference_mode():
        benchmark.pedantic(fn, args=(q, k, v), rounds=30, iterations=1, warmup_rounds=3)
