"""Benchmarks live outside the test run: `make bench` (or pytest bench/ --benchmark-only)."""
