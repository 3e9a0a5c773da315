"""bench/gpu_check.sh's control flow, run here with stand-in tools (no GPU): each stage's
verdict, which stage the summary names when one fails, skips after a failed build, the exit
status, and at most 8 files in $OUT (what a lent machine sends back).

The stand-ins answer like the real tools (nvidia-smi, nvcc, compute-sanitizer, python with
torch and pytest); the STUB_* variables choose what each one reports. What runs on the GPU
(the conformance program, the build, the sanitizer, the tests, the benchmark) is not tested
here: only that the script reads their outcomes right.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

STUBS = {
    "nvidia-smi": """#!/bin/bash
case "$*" in
  *compute_cap,driver*) echo "NVIDIA H200 (stand-in), 9.0, 580.00, 143771 MiB" ;;
  *compute_cap*) echo "9.0" ;;
  *) echo "stand-in nvidia-smi" ;;
esac
""",
    "nvcc": """#!/bin/bash
out=""; while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done
[ "${STUB_NVCC_RC:-0}" = 0 ] || { echo "nvcc: error" >&2; exit 1; }
printf '#!/bin/bash\\necho "PASS mma (stand-in)"\\nexit ${STUB_CONFORMANCE_RC:-0}\\n' >"$out"
chmod +x "$out"
""",
    "compute-sanitizer": """#!/bin/bash
[ "${@: -1}" = true ] && exit 0   # the option probe
case "$*" in *"--tool ${STUB_SAN_TOOL:-none}"*) rc=${STUB_SAN_RC:-0} ;; *) rc=0 ;; esac
if [ "${STUB_SAN_UNSUPPORTED:-0}" = 1 ]; then echo "========= Error: Device not supported"; exit 1; fi
if [ "$rc" = 97 ]; then echo "========= ERROR SUMMARY: 3 errors"; exit 97; fi
echo "========= ERROR SUMMARY: 0 errors"; exit "$rc"
""",
    "python3": """#!/bin/bash
case "$*" in
  "-c import torch"|"-c import pytest") exit 0 ;;
  -c*include*) echo /nonexistent/include ;;
  -c*sysconfig*) echo /nonexistent/site ;;
  -c*) echo "torch 0.0 (stand-in)" ;;
  "setup.py build_ext --inplace") echo building; exit "${STUB_BUILD_RC:-0}" ;;
  -) cat >/dev/null; exit "${STUB_LOAD_RC:-0}" ;;
  "-m pytest"*) echo "${STUB_TESTS_LINE:-12 passed in 1.00s}"; exit "${STUB_TESTS_RC:-0}" ;;
  "-m bench.gpu_small_cases") echo "9/9 small cases match the reference" ;;
  "-m bench.gpu_bench"*)
    out=$4; echo "{}" >"$out/gpu_bench.json"; echo "| table |" >"$out/gpu_bench.md"
    exit "${STUB_BENCH_RC:-0}" ;;
  "-m bench.run_unet_bench"*)
    while [ "$1" != --out ]; do shift; done
    echo "{}" >"$2/unet_gpu.json" && echo "| unet table |" >"$2/unet_gpu.md" ;;
  *) echo "stand-in python3: unexpected $*" >&2; exit 99 ;;
esac
""",
}


@pytest.fixture
def run_check(tmp_path):
    shutil.copytree(
        ROOT / "bench", tmp_path / "repo" / "bench", ignore=shutil.ignore_patterns("results")
    )
    bin_dir, cuda_bin = tmp_path / "bin", tmp_path / "cuda" / "bin"  # PATH and $CUDA_HOME/bin
    bin_dir.mkdir()
    cuda_bin.mkdir(parents=True)
    for name, text in STUBS.items():
        path = (cuda_bin if name in ("nvcc", "compute-sanitizer") else bin_dir) / name
        path.write_text(text)
        path.chmod(stat.S_IRWXU)
    for tool in ("bash", "git", "timeout", "date", "tee", "cat", "grep", "tail", "mkdir", "rm"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for tool in ("mktemp", "dirname", "nproc", "head", "tr", "chmod"):
        if shutil.which(tool):
            (bin_dir / tool).symlink_to(shutil.which(tool))

    def run(**stub_env):
        out = tmp_path / "out"
        shutil.rmtree(out, ignore_errors=True)
        env = {"PATH": str(bin_dir), "OUT": str(out), "HOME": str(tmp_path)}
        env["CUDA_HOME"] = str(tmp_path / "cuda")
        env.update({k: str(v) for k, v in stub_env.items()})
        r = subprocess.run(
            ["bash", str(tmp_path / "repo" / "bench" / "gpu_check.sh")],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        summary = (out / "summary.txt").read_text()
        files = sorted(p.name for p in out.iterdir())
        return r.returncode, summary, files

    return run


def stage_lines(summary: str) -> dict[str, str]:
    lines = [ln.split("STAGE ", 1)[1] for ln in summary.splitlines() if "] STAGE " in ln]
    return dict(ln.split(": ", 1) for ln in lines)


def test_all_stages_pass(run_check):
    rc, summary, files = run_check()
    assert rc == 0, summary
    assert stage_lines(summary) == {
        s: "PASS" for s in ("conformance", "build", "sanitizer", "tests", "bench")
    }
    assert "every stage PASSED" in summary
    assert len(files) <= 8 and "summary.txt" in files and "gpu_bench.json" in files


def test_failed_build_skips_what_needs_it_and_is_named(run_check):
    rc, summary, _ = run_check(STUB_BUILD_RC=1)
    stages = stage_lines(summary)
    assert rc == 1
    assert stages["conformance"] == "PASS" and stages["build"].startswith("FAIL")
    assert all(stages[s] == "SKIP (no build)" for s in ("sanitizer", "tests", "bench"))
    assert "FAILED in: build" in summary


def test_conformance_failure_is_named(run_check):
    rc, summary, _ = run_check(STUB_CONFORMANCE_RC=1)
    assert rc == 1 and stage_lines(summary)["conformance"].startswith("FAIL")
    assert "FAILED in: conformance" in summary


def test_kernel_that_does_not_load_fails_the_build(run_check):
    rc, summary, _ = run_check(STUB_LOAD_RC=1)
    assert rc == 1 and "does not load" in stage_lines(summary)["build"]


def test_detection_stage_keeps_within_eight_files(run_check):
    rc, summary, files = run_check(DETECTION=1)
    assert rc == 0 and stage_lines(summary)["detection"] == "PASS", summary
    assert "| unet table |" in summary and "unet_gpu.json" in files and len(files) <= 8, files


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_sanitizer_findings_fail_the_stage(run_check, tool):
    rc, summary, _ = run_check(STUB_SAN_TOOL=tool, STUB_SAN_RC=97)
    assert rc == 1 and stage_lines(summary)["sanitizer"].startswith(f"FAIL ({tool}")
    assert f"{tool} FOUND ERRORS" in summary


def test_sanitizer_refusing_the_device_is_a_skip_not_a_pass(run_check):
    rc, summary, _ = run_check(STUB_SAN_UNSUPPORTED=1)
    assert rc == 2 and stage_lines(summary)["sanitizer"].startswith("SKIP")
    assert "SKIPPED: sanitizer" in summary


@pytest.mark.parametrize(
    "stub",
    [
        {"STUB_TESTS_RC": 1, "STUB_TESTS_LINE": "1 failed, 11 passed in 1.00s"},
        {"STUB_TESTS_LINE": "40 skipped in 1.00s"},  # nothing ran on the GPU
    ],
)
def test_failed_or_skipped_cuda_tests_fail_the_stage(run_check, stub):
    rc, summary, _ = run_check(**stub)
    assert rc == 1 and stage_lines(summary)["tests"].startswith("FAIL")


def test_bench_verification_failure_is_named(run_check):
    rc, summary, _ = run_check(STUB_BENCH_RC=1)
    assert rc == 1 and "FAILED in: bench" in summary


def test_no_python_with_torch_fails_at_once(run_check, tmp_path):
    os.remove(tmp_path / "bin" / "python3")
    rc, summary, _ = run_check()
    assert rc == 1 and "no python with torch" in summary


def test_small_cases_dry_run_on_the_cpu_kernel(capsys):
    """The sanitizer stage's calls run and meet the project's tolerance rule on the CPU kernel."""
    from bench import gpu_small_cases

    assert gpu_small_cases.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"{len(gpu_small_cases.CASES)}/{len(gpu_small_cases.CASES)} small cases match" in out
