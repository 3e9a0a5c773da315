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

    # --requality refills the quality columns from the validation, leaving the timings alone.
    measured = json.loads((tmp_path / "detectors_cpu.json").read_text())
    for r in payload["detectors"]:
        r["quality"] = None
    for r in payload["mitigators"]:
        r["effect"] = None
    (tmp_path / "detectors_cpu.json").write_text(json.dumps(payload))
    (tmp_path / "detectors_cpu.md").write_text("")
    assert detector_bench.main(["--requality", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "detectors_cpu.json").read_text()) == measured
    assert "| detector |" in (tmp_path / "detectors_cpu.md").read_text()
    assert detector_bench.main(["--requality", "--out", str(tmp_path / "none")]) == 1


def test_quality_finds_a_field_mitigator_by_guidance_and_spec(tmp_path):
    from bench.quality import mitigation_quality

    path = tmp_path / "validation.json"
    mitigation = {
        "g7.5_none": {"mem_rate": [0.6, 0.5, 0.7]},
        "g7.5_cfg-delay:mode=static": {"mem_rate": [0.2, 0.1, 0.3], "neg_corr_vs_plain": 0.9},
        "g7.5_c1_1.25": {"mem_rate": [0.1, 0.0, 0.2]},
    }
    path.write_text(json.dumps({"summary": {"mitigation": mitigation}}))
    effect = mitigation_quality("cfg-delay:mode=static", path=path)
    assert effect == "memorization 0.60 → 0.20; held-out r with unmitigated 0.90"
    assert mitigation_quality("attention:bos_scale=1.25", path=path) == "memorization 0.60 → 0.10"
    assert mitigation_quality("prompt-opt", path=path) is None
