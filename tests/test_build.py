"""setup.py's decision about the CUDA kernel, without compiling: ATTNMEM_REQUIRE_CUDA=1 fails
the build with the reason, and the compiled module says why it has no CUDA kernel."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnmem import _ext

ROOT = Path(__file__).resolve().parent.parent


def setup_py(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=ROOT,
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_require_cuda_fails_with_the_reason():
    res = setup_py(ATTNMEM_REQUIRE_CUDA="1", ATTNMEM_CPU_ONLY="1")
    assert res.returncode != 0
    assert "ATTNMEM_REQUIRE_CUDA=1 but the CUDA kernel cannot be built: ATTNMEM_CPU_ONLY=1" in (
        res.stderr
    )
    assert setup_py(ATTNMEM_CPU_ONLY="1").returncode == 0  # without the switch: CPU kernel


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_cpu_torch_says_why_there_is_no_cuda_kernel():
    res = setup_py(ATTNMEM_REQUIRE_CUDA="1")
    assert res.returncode != 0 and f"torch {torch.__version__} was built without CUDA" in res.stderr
    if _ext.extension() is not None:
        assert _ext.cuda_not_built() == f"torch {torch.__version__} was built without CUDA"
        from attnmem.info import report

        assert "CUDA kernel: no (not built: torch" in report()
