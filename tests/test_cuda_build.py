"""When the CUDA fast path is taken or refused, checked without a GPU: the device's compute
capability against what the extension was compiled to (build_info's nvcc targets), the head
dims of each kernel, and the default architecture list of the build.

The device side of the same behaviour (a B200 / RTX 50xx falling back instead of raising
"no kernel image") needs a GPU: see tests/test_op_cuda_extra.py and bench/gpu_check.sh.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from attnmem import ops

ROOT = Path(__file__).resolve().parent.parent
HEAD_DIMS = (40, 64, 80, 128, 160)
DEFAULT_TARGETS = ("sm_80", "compute_90", "sm_90")  # what "8.0;9.0+PTX" builds


@pytest.mark.parametrize(
    "target,capability,runs",
    [
        ("sm_80", (8, 0), True),
        ("sm_80", (8, 6), True),  # machine code runs on a later minor of its major version
        ("sm_80", (9, 0), False),  # ... never on another major
        ("sm_86", (8, 0), False),
        ("sm_90", (10, 0), False),
        ("sm_90", (12, 0), False),
        ("compute_90", (9, 0), True),  # PTX is compiled by the driver for any newer device
        ("compute_90", (10, 0), True),
        ("compute_90", (12, 0), True),
        ("compute_90", (8, 9), False),
        ("sm_90a", (9, 0), True),  # arch-specific: that exact version only
        ("sm_100a", (10, 3), False),
        ("sm_100f", (10, 3), True),  # family-specific: later minors of the major
        ("sm_100f", (12, 0), False),
        ("sm_120", (12, 1), True),
        ("bogus", (9, 0), False),
    ],
)
def test_cuda_target_runs_on(target, capability, runs):
    assert ops.cuda_target_runs_on(target, capability) is runs


def reasons(dtype=torch.float16, D=64, capability=(9, 0), targets=DEFAULT_TARGETS):
    return ops.cuda_kernel_reasons(dtype, D, capability, targets, HEAD_DIMS, 160)


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0)])
def test_default_build_runs_on_every_sm80_and_newer_device(capability):
    assert reasons(capability=capability) == []


@pytest.mark.parametrize("capability", [(10, 0), (12, 0)])
def test_device_newer_than_every_target_falls_back_with_a_reason(capability):
    """A build without PTX (e.g. TORCH_CUDA_ARCH_LIST="8.0;9.0") on a B200 or an RTX 50xx:
    the wrapper runs the reference and says why, instead of the kernel raising."""
    (why,) = reasons(capability=capability, targets=("sm_80", "sm_90"))
    major, minor = capability
    assert f"no CUDA kernel image for compute capability {major}.{minor}" in why
    assert "sm_80, sm_90" in why and "TORCH_CUDA_ARCH_LIST" in why


def test_pre_ampere_device_is_refused():
    (why,) = reasons(capability=(7, 5))
    assert "needs compute capability >= 8.0" in why


@pytest.mark.parametrize("D", [1, 8, 24, 72, 100, 152, 160])
def test_fp32_kernel_takes_any_head_dim_up_to_160(D):
    assert reasons(dtype=torch.float32, D=D) == []


def test_fp32_head_dim_above_160_and_half_head_dims_off_the_list_are_refused():
    (why,) = reasons(dtype=torch.float32, D=161)
    assert "float32 head dims up to 160" in why
    (why,) = reasons(dtype=torch.float16, D=72)
    assert "float16 head dims [40, 64, 80, 128, 160], got D = 72" in why
    (why,) = reasons(dtype=torch.float64)
    assert "float32/float16/bfloat16" in why


def test_setup_builds_ptx_for_its_newest_arch_by_default():
    """Without PTX the default build has no kernel image for compute capability 10.x / 12.x."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    value = next(
        node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(getattr(t, "id", None) == "DEFAULT_CUDA_ARCHS" for t in node.targets)
    )
    archs = value.split(";")
    newest = max(archs, key=lambda a: tuple(int(x) for x in a.split("+")[0].split(".")))
    assert newest.endswith("+PTX"), value
