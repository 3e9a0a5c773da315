"""The benchmark suite runs (verification included) in a quick smoke run: tiny UNet, timing off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_suite_smoke():
    env = dict(os.environ, ATTNMEM_BENCH_UNET="tiny")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "bench" / "test_op_bench.py"),
            str(ROOT / "bench" / "test_unet_bench.py"),
            "--benchmark-disable",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
