"""The benchmark suite runs (verification included) in a quick smoke run: tiny UNet, timing off."""

from __future__ import annotations

import json
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


def test_detector_bench_smoke(tmp_path):
    """The harness table runs end to end on the tiny pipeline: every detector and mitigator row,
    its pass counts, and the quality columns read from the testbed validation."""
    from bench import detector_bench

    assert (
        detector_bench.main(
            ["--size", "tiny", "--rounds", "1", "--gen-steps", "2", "--out", str(tmp_path)]
        )
        == 0
    )
    payload = json.loads((tmp_path / "detectors_cpu.json").read_text())
    rows = {r["label"]: r for r in payload["detectors"]}
    assert len(rows) == len(detector_bench.DETECTORS)
    assert rows["sharpness, n = 4"]["jvps"] == 8 and rows["anisotropy, n = 1"]["forwards"] == 4
    assert rows["Wen et al., 50 steps, n = 4 (their default)"]["forwards"] == 400
    assert rows["E, early exit"]["quality"]["key"] == "E"
    assert all(r["relative"] > 0 for r in rows.values())
    mit = {r["spec"]: r for r in payload["mitigators"]}
    assert mit["cfg-delay:mode=static"]["extra_forwards"] == 0
    assert mit["attention:bos_scale=1.25"]["effect"].startswith("memorization")
    assert "| detector |" in (tmp_path / "detectors_cpu.md").read_text()
