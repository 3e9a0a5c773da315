"""attnmem's benchmarks: pytest-benchmark suites and the scripts that write bench/results/.

Not installed with attnmem; run from the repository root, e.g. ``python -m bench.run_op_bench``.
"""
